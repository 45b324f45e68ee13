"""IsoFLOP profiles, approach 2 of Hoffmann et al. (2022).

Runs are grouped by compute budget C. Per budget, fit a parabola loss = c2 x^2 + c1 x + c0
in x = log N; its vertex is N_opt(C). Then fit the power laws N_opt = k_N C^a and
D_opt = k_D C^b by least squares in log-log space. Bootstrap intervals resample the runs
within each budget (with replacement) and redo both steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from titans_scale.sweep.fit import FitInputError, as_positive_array, percentile_interval

__all__ = ["BudgetFit", "IsoFlopFit", "Run", "as_runs", "fit_isoflop", "group_by_budget"]


class Run(NamedTuple):
    """One finished training run: parameters N, tokens D, compute C (FLOPs), final loss."""

    N: float
    D: float
    C: float
    loss: float


def as_runs(runs: Iterable[Any]) -> list[Run]:
    """Normalise runs given as Run, (N, D, C, loss) tuples, mappings or objects with
    attributes N, D, C, loss. C may be None (or missing): it is then 6 N D."""
    out = []
    for i, r in enumerate(runs):
        if isinstance(r, Mapping):
            get = r.get
        elif isinstance(r, (tuple, list)) and not hasattr(r, "_fields"):
            if len(r) != 4:
                raise FitInputError(f"runs[{i}]: expected (N, D, C, loss), got {len(r)} values")
            get = dict(zip(Run._fields, r)).get
        else:
            def get(name: str, _r: Any = r) -> Any:
                return getattr(_r, name, None)
        N, D, C, loss = (get(f) for f in Run._fields)
        if N is None or D is None or loss is None:
            raise FitInputError(f"runs[{i}]: needs N, D and loss (C optional), got {r!r}")
        if C is None:
            C = 6.0 * float(N) * float(D)
        out.append(Run(float(N), float(D), float(C), float(loss)))
    if not out:
        raise FitInputError("runs: empty; pass at least one (N, D, C, loss) run")
    for name in Run._fields:
        as_positive_array(f"runs.{name}", [getattr(r, name) for r in out])
    return out


def group_by_budget(runs: Iterable[Any], rtol: float = 1e-3) -> list[tuple[float, list[Run]]]:
    """Group runs whose C agree within rtol (budgets computed as 6ND differ by rounding).
    Returns [(budget, runs)] sorted by budget; the budget is the group's median C."""
    rs = sorted(as_runs(runs), key=lambda r: r.C)
    groups: list[list[Run]] = [[rs[0]]]
    for r in rs[1:]:
        if r.C <= groups[-1][0].C * (1 + rtol):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [(float(np.median([r.C for r in g])), g) for g in groups]


@dataclass(frozen=True)
class BudgetFit:
    """The parabola loss = c2 (log N)^2 + c1 log N + c0 of one budget and its minimum."""

    C: float
    coeffs: tuple[float, float, float]  # (c2, c1, c0), natural log of N
    N_opt: float
    D_opt: float
    loss_opt: float
    n_runs: int

    def loss_at(self, N: Any) -> np.ndarray:
        return np.polyval(self.coeffs, np.log(np.asarray(N, dtype=np.float64)))


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt = N_coef C^a and D_opt = D_coef C^b fitted through the per-budget minima."""

    a: float
    b: float
    N_coef: float
    D_coef: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    budgets: tuple[BudgetFit, ...]
    skipped: tuple[tuple[float, str], ...]  # (budget, why) left out of the power-law fit
    n_bootstrap: int
    ci: float = 0.95
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 2)), repr=False, compare=False)

    def optimal_N(self, C: Any) -> np.ndarray | float:
        out = self.N_coef * np.asarray(C, dtype=np.float64) ** self.a
        return float(out) if out.ndim == 0 else out

    def optimal_D(self, C: Any) -> np.ndarray | float:
        out = self.D_coef * np.asarray(C, dtype=np.float64) ** self.b
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "a_ci": list(self.a_ci), "b": self.b, "b_ci": list(self.b_ci),
            "N_coef": self.N_coef, "D_coef": self.D_coef, "n_bootstrap": self.n_bootstrap,
            "ci": self.ci,
            "budgets": [{"C": bf.C, "N_opt": bf.N_opt, "D_opt": bf.D_opt,
                         "loss_opt": bf.loss_opt, "n_runs": bf.n_runs} for bf in self.budgets],
            "skipped": [{"C": c, "why": why} for c, why in self.skipped],
        }


def _fit_budget(C: float, N: np.ndarray, D: np.ndarray, loss: np.ndarray,
                require_bracketed: bool) -> BudgetFit | str:
    """The budget's parabola and vertex, or a string saying why it has none."""
    x = np.log(N)
    if len(np.unique(x)) < 3:
        return f"{len(np.unique(x))} distinct model sizes; a parabola needs at least 3"
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if not c2 > 0:
        return "loss is not convex in log N here (no minimum)"
    x_opt = -c1 / (2 * c2)
    if require_bracketed and not x.min() <= x_opt <= x.max():
        with np.errstate(over="ignore"):  # a near-flat parabola puts its vertex at ~1e300
            n_at = float(np.exp(x_opt))
        return (f"minimum at N={n_at:.3g} lies outside the sampled sizes "
                f"[{N.min():.3g}, {N.max():.3g}]; add runs there")
    # D along the budget's own N-D relation (exact for D = C/(6N), and right for other
    # FLOP counts too): a line in log-log space through this budget's runs.
    d1, d0 = np.polyfit(x, np.log(D), 1)
    return BudgetFit(C=C, coeffs=(float(c2), float(c1), float(c0)), N_opt=math.exp(x_opt),
                     D_opt=math.exp(d1 * x_opt + d0), loss_opt=float(np.polyval((c2, c1, c0), x_opt)),
                     n_runs=len(N))


def _power_law(C: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of values = coef * C^exponent, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(C), np.log(values), 1)
    return float(slope), math.exp(intercept)


def fit_isoflop(
    runs: Iterable[Any],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    budget_rtol: float = 1e-3,
    require_bracketed: bool = True,
) -> IsoFlopFit:
    """Approach 2: parabola per compute budget, then N_opt ∝ C^a and D_opt ∝ C^b.

    runs: Run / (N, D, C, loss) records; runs whose C agree within budget_rtol share a budget.
    require_bracketed: leave out budgets whose parabola minimum lies outside their sampled N.
    """
    if bootstrap < 0:
        raise FitInputError(f"bootstrap={bootstrap}: must be >= 0")
    if not 0 < ci < 1:
        raise FitInputError(f"ci={ci}: must be in (0, 1), e.g. 0.95")
    groups = [(C, np.array([(r.N, r.D, r.loss) for r in g]).T) for C, g in group_by_budget(runs, budget_rtol)]

    budgets, skipped, usable = [], [], []
    for C, (N, D, loss) in groups:
        res = _fit_budget(C, N, D, loss, require_bracketed)
        if isinstance(res, BudgetFit):
            budgets.append(res)
            usable.append((C, (N, D, loss)))
        else:
            skipped.append((C, res))
    if len(budgets) < 2:
        why = "; ".join(f"C={c:.3g}: {w}" for c, w in skipped) or "only one budget given"
        raise FitInputError(
            f"runs: {len(budgets)} usable compute budget(s), need at least 2 to fit N_opt ∝ C^a ({why})"
        )
    for c, why in skipped:
        warnings.warn(f"fit_isoflop: budget C={c:.3g} left out: {why}", stacklevel=2)

    Cs = np.array([bf.C for bf in budgets])
    a, N_coef = _power_law(Cs, np.array([bf.N_opt for bf in budgets]))
    b, D_coef = _power_law(Cs, np.array([bf.D_opt for bf in budgets]))

    # Bootstrap: resample runs within each usable budget; a budget whose resample has no
    # bracketed minimum drops out of that round; a round with < 2 budgets fails.
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        mins = []
        for C, (N, D, loss) in usable:
            idx = rng.integers(0, len(N), len(N))
            res = _fit_budget(C, N[idx], D[idx], loss[idx], require_bracketed)
            if isinstance(res, BudgetFit):
                mins.append((C, res.N_opt, res.D_opt))
        if len(mins) >= 2:
            m = np.array(mins)
            samples.append((_power_law(m[:, 0], m[:, 1])[0], _power_law(m[:, 0], m[:, 2])[0]))
    samples_arr = np.array(samples).reshape(-1, 2)
    if bootstrap and len(samples_arr) < bootstrap // 2:
        warnings.warn(f"fit_isoflop: only {len(samples_arr)}/{bootstrap} bootstrap rounds "
                      "succeeded; intervals are unreliable", stacklevel=2)

    return IsoFlopFit(a=a, b=b, N_coef=N_coef, D_coef=D_coef,
                      a_ci=percentile_interval(samples_arr[:, 0], ci),
                      b_ci=percentile_interval(samples_arr[:, 1], ci),
                      budgets=tuple(budgets), skipped=tuple(skipped),
                      n_bootstrap=len(samples_arr), ci=ci, samples=samples_arr)
