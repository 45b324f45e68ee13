"""Chinchilla scaling-law fit, approach 3 of Hoffmann et al. (2022).

    L(N, D) = E + A / N^alpha + B / D^beta

N: parameters, D: training tokens. As in the paper we fit in log space with
a = log A, b = log B, e = log E, so that

    log L_hat = LSE(a - alpha log N, b - beta log D, e)

and minimise the Huber loss (delta 1e-3) between log L_hat and log L with L-BFGS-B
from the best points of a grid of initialisations. Confidence intervals come from
a bootstrap: resample the points with replacement, refit, take percentiles.

Under C = 6 N D the compute-optimal allocation is
    N_opt(C) = G (C/6)^a,  D_opt(C) = (C/6)^b / G,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),  G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from titans_scale.errors import DataError

__all__ = ["ChinchillaFit", "FitInputError", "fit_chinchilla", "huber_objective", "percentile_interval"]

N_PARAMS = 5  # (a, b, e, alpha, beta)
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

# Hoffmann et al.'s initialisation grid (alpha, beta, e, a, b): 5 * 5 * 6 * 6 * 6 = 5400 points.
# Every point is scored in one vectorised pass; L-BFGS then starts from the n_init best.
_GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
_GRID_E = np.arange(-1.0, 1.51, 0.5)
_GRID_LOGAMP = np.arange(0.0, 25.1, 5.0)
# Exponents outside [0, 5] are physically meaningless; bounding them stops L-BFGS from
# wandering along the flat (a, alpha) valley into overflow.
_EXPONENT_BOUNDS = (0.0, 5.0)


class FitInputError(DataError):
    """Bad input to a scaling-law fit (message names the argument and the fix); the CLI prints
    it as one line."""


def as_positive_array(name: str, values: Any) -> np.ndarray:
    """1-D float64 array of finite, strictly positive values, or a one-line FitInputError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FitInputError(f"{name}: expected a sequence of numbers ({exc})") from None
    if arr.ndim != 1:
        raise FitInputError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FitInputError(
            f"{name}[{i}] = {arr[i]!r}: every value must be finite and > 0 (drop or fix that run)"
        )
    return arr


def percentile_interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    """Central bootstrap percentile interval at level ci; (nan, nan) without samples."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(samples, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class ChinchillaFit:
    """Fitted L(N, D) = E + A/N^alpha + B/D^beta with bootstrap percentile intervals.

    Intervals are (nan, nan) when the fit ran without bootstrap.
    `samples` holds the bootstrap refits, one row (E, A, B, alpha, beta) per success.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    E_ci: tuple[float, float]
    A_ci: tuple[float, float]
    B_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    a_ci: tuple[float, float]  # interval of the N_opt exponent a
    b_ci: tuple[float, float]  # interval of the D_opt exponent b
    objective: float  # mean Huber loss / delta at the optimum
    n_points: int
    n_bootstrap: int  # successful bootstrap refits
    ci: float = 0.95
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)), repr=False, compare=False)

    # Compute-optimal allocation under C = 6 N D.
    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a: beta / (alpha + beta); nan if both exponents are 0."""
        s = self.alpha + self.beta
        return self.beta / s if s > 0 else math.nan

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b: alpha / (alpha + beta); nan if both exponents are 0."""
        s = self.alpha + self.beta
        return self.alpha / s if s > 0 else math.nan

    @property
    def G(self) -> float:
        """N_opt = G (C/6)^a. nan when an exponent is 0 (no finite optimum)."""
        if not (self.alpha > 0 and self.beta > 0):
            return math.nan
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def predict(self, N: Any, D: Any) -> np.ndarray | float:
        """Fitted loss at (N, D); broadcasts like numpy."""
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        out = self.E + self.A / N**self.alpha + self.B / D**self.beta
        return float(out) if out.ndim == 0 else out

    def optimal_N(self, C: Any) -> np.ndarray | float:
        """Loss-minimising parameter count for compute C = 6 N D (FLOPs)."""
        out = self.G * (np.asarray(C, dtype=np.float64) / 6.0) ** self.a
        return float(out) if out.ndim == 0 else out

    def optimal_D(self, C: Any) -> np.ndarray | float:
        """Loss-minimising token count for compute C = 6 N D (FLOPs)."""
        out = (np.asarray(C, dtype=np.float64) / 6.0) ** self.b / self.G
        return float(out) if out.ndim == 0 else out

    def optimal_loss(self, C: Any) -> np.ndarray | float:
        """Fitted loss of the compute-optimal model at compute C."""
        return self.predict(self.optimal_N(C), self.optimal_D(C))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no bootstrap samples)."""
        out: dict[str, Any] = {}
        for name in PARAM_NAMES + ("a", "b"):
            out[name] = getattr(self, name)
            out[f"{name}_ci"] = list(getattr(self, f"{name}_ci"))
        out.update(objective=self.objective, n_points=self.n_points,
                   n_bootstrap=self.n_bootstrap, ci=self.ci)
        return out

    def __str__(self) -> str:
        def fmt(name: str) -> str:
            lo, hi = getattr(self, f"{name}_ci")
            return f"{name}={getattr(self, name):.4g} [{lo:.4g}, {hi:.4g}]"

        names = PARAM_NAMES + ("a", "b")
        return (f"L(N,D) = E + A/N^alpha + B/D^beta ({self.n_points} points, "
                f"{self.n_bootstrap} bootstrap fits, {self.ci:.0%} CI): "
                + ", ".join(fmt(n) for n in names))


# ---------------------------------------------------------------------------------------
# Objective: theta = (a, b, e, alpha, beta); x = log N, y = log D, t = log L.


def _log_pred(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, tuple]:
    """log L_hat and the softmax weights (w1, w2, w3) of its three terms (for the gradient).

    theta may be (5,) or (G, 5); the results have shape (n,) or (G, n).
    """
    theta = np.asarray(theta)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(N_PARAMS))
    t1, t2 = a - alpha * x, b - beta * y
    m = np.maximum(np.maximum(t1, t2), e)  # stable log-sum-exp
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    return m + np.log(s), (w1 / s, w2 / s, w3 / s)


def huber_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, t: np.ndarray,
                    delta: float) -> np.ndarray | float:
    """Mean Huber(log L_hat - log L) / delta. Dividing by delta keeps values near the
    residual size (~1e-2) instead of ~1e-5, so L-BFGS's tolerances behave."""
    r = _log_pred(theta, x, y)[0] - t
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta)
    return h.mean(axis=-1)


def _objective_and_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray, t: np.ndarray,
                        delta: float) -> tuple[float, np.ndarray]:
    lp, w = _log_pred(theta, x, y)
    r = lp - t
    ar = np.abs(r)
    f = np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta).mean()
    g = np.clip(r / delta, -1.0, 1.0) / r.size  # d f / d log L_hat
    w1, w2, w3 = w
    grad = np.array([g @ w1, g @ w2, g @ w3, -(g @ (w1 * x)), -(g @ (w2 * y))])
    return float(f), grad


def _init_grid() -> np.ndarray:
    rows = itertools.product(_GRID_LOGAMP, _GRID_LOGAMP, _GRID_E, _GRID_ALPHA, _GRID_ALPHA)
    return np.array(list(rows), dtype=np.float64)  # columns (a, b, e, alpha, beta)


_GRID = _init_grid()


def _best_starts(x: np.ndarray, y: np.ndarray, t: np.ndarray, delta: float, k: int) -> np.ndarray:
    scores = huber_objective(_GRID, x, y, t, delta)
    scores = np.where(np.isfinite(scores), scores, np.inf)
    k = min(k, len(_GRID))
    idx = np.argpartition(scores, k - 1)[:k]
    return _GRID[idx[np.argsort(scores[idx])]]


def _minimise(starts: np.ndarray, x: np.ndarray, y: np.ndarray, t: np.ndarray,
              delta: float) -> tuple[np.ndarray, float] | None:
    """Run L-BFGS-B from every start, return the lowest finite optimum (or None)."""
    bounds = [(None, None)] * 3 + [_EXPONENT_BOUNDS] * 2
    best: tuple[np.ndarray, float] | None = None
    for theta0 in starts:
        try:
            with np.errstate(all="ignore"):
                res = minimize(_objective_and_grad, theta0, args=(x, y, t, delta), jac=True,
                               method="L-BFGS-B", bounds=bounds,
                               options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        except (ArithmeticError, ValueError, np.linalg.LinAlgError):
            continue
        # A line-search stop (res.success False) at a Huber kink is still a usable optimum;
        # only non-finite results are discarded.
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
            if best is None or res.fun < best[1]:
                best = (res.x.copy(), float(res.fun))
    return best


def _to_params(theta: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([math.exp(e), math.exp(a), math.exp(b), alpha, beta])


def fit_chinchilla(
    N: Any,
    D: Any,
    loss: Any,
    *,
    n_init: int = 64,
    bootstrap: int = 200,
    bootstrap_inits: int = 4,
    seed: int = 0,
    huber_delta: float = 1e-3,
    ci: float = 0.95,
) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. approach 3).

    N, D, loss: equal-length sequences of positive numbers (parameters, tokens, final loss).
    n_init: L-BFGS starts, the best-scoring points of the 5400-point initialisation grid.
    bootstrap: number of resample-and-refit rounds for the intervals (0: no intervals).
    bootstrap_inits: grid starts per bootstrap refit, on top of the full-data optimum.
    """
    N = as_positive_array("N", N)
    D = as_positive_array("D", D)
    loss = as_positive_array("loss", loss)
    if not (len(N) == len(D) == len(loss)):
        raise FitInputError(
            f"N, D, loss: lengths differ ({len(N)}, {len(D)}, {len(loss)}); pass one value per run"
        )
    if len(N) < N_PARAMS:
        raise FitInputError(
            f"N, D, loss: {len(N)} points cannot determine {N_PARAMS} parameters; "
            f"pass at least {N_PARAMS} runs (ideally several times more)"
        )
    n_distinct = len({(n, d) for n, d in zip(N.tolist(), D.tolist())})
    if n_distinct < N_PARAMS:
        raise FitInputError(
            f"N, D: only {n_distinct} distinct (N, D) pairs; {N_PARAMS} parameters need at least "
            f"{N_PARAMS} different model sizes / token counts"
        )
    if n_init < 1:
        raise FitInputError(f"n_init={n_init}: must be >= 1")
    if bootstrap < 0 or bootstrap_inits < 0:
        raise FitInputError(f"bootstrap={bootstrap}, bootstrap_inits={bootstrap_inits}: must be >= 0")
    if not huber_delta > 0:
        raise FitInputError(f"huber_delta={huber_delta}: must be > 0")
    if not 0 < ci < 1:
        raise FitInputError(f"ci={ci}: must be in (0, 1), e.g. 0.95")

    # L-BFGS-B calls BLAS on 5x5 matrices thousands of times; a multi-threaded BLAS on a
    # busy machine turns each call into a thread hand-off (measured 20x slower), so pin to 1.
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(N, D, loss, n_init=n_init, bootstrap=bootstrap, bootstrap_inits=bootstrap_inits,
                    seed=seed, huber_delta=huber_delta, ci=ci)


def _fit(N: np.ndarray, D: np.ndarray, loss: np.ndarray, *, n_init: int, bootstrap: int,
         bootstrap_inits: int, seed: int, huber_delta: float, ci: float) -> ChinchillaFit:
    x, y, t = np.log(N), np.log(D), np.log(loss)
    best = _minimise(_best_starts(x, y, t, huber_delta, n_init), x, y, t, huber_delta)
    if best is None:
        raise RuntimeError("fit_chinchilla: L-BFGS failed from every initialisation")
    theta, objective = best
    params = _to_params(theta)
    if np.any(np.isclose(theta[3:], _EXPONENT_BOUNDS[0]) | np.isclose(theta[3:], _EXPONENT_BOUNDS[1])):
        warnings.warn(f"fit_chinchilla: an exponent sits on its bound {_EXPONENT_BOUNDS} "
                      f"(alpha={theta[3]:.3g}, beta={theta[4]:.3g}); the data may not constrain it",
                      stacklevel=3)

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(N), len(N))
        if len(np.unique(idx)) < N_PARAMS:  # a degenerate resample cannot be fitted
            continue
        bx, by, bt = x[idx], y[idx], t[idx]
        starts = theta[None]
        if bootstrap_inits:
            starts = np.concatenate([starts, _best_starts(bx, by, bt, huber_delta, bootstrap_inits)])
        res = _minimise(starts, bx, by, bt, huber_delta)
        if res is not None:
            samples.append(_to_params(res[0]))
    samples_arr = np.array(samples).reshape(-1, N_PARAMS)
    if bootstrap and len(samples_arr) < bootstrap // 2:
        warnings.warn(f"fit_chinchilla: only {len(samples_arr)}/{bootstrap} bootstrap refits "
                      "succeeded; intervals are unreliable", stacklevel=3)

    s_alpha, s_beta = samples_arr[:, 3], samples_arr[:, 4]
    with np.errstate(all="ignore"):
        s_a = s_beta / (s_alpha + s_beta)  # NaN where both are 0: dropped by the interval
    return ChinchillaFit(
        **{name: float(v) for name, v in zip(PARAM_NAMES, params)},
        **{f"{name}_ci": percentile_interval(samples_arr[:, i], ci) for i, name in enumerate(PARAM_NAMES)},
        a_ci=percentile_interval(s_a, ci),
        b_ci=percentile_interval(1.0 - s_a, ci),
        objective=objective,
        n_points=len(N),
        n_bootstrap=len(samples_arr),
        ci=ci,
        samples=samples_arr,
    )
