"""Scaling-law fits (approach 3 and approach 2) on synthetic data with known answers, and the plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from titans_scale.sweep.fit import ChinchillaFit, FitInputError, fit_chinchilla
from titans_scale.sweep.isoflop import Run, as_runs, fit_isoflop, group_by_budget
from titans_scale.sweep.plot import plot_frontier, plot_isoflop, plot_loss_curves

# Hoffmann et al.'s published fit.
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def sweep_grid(seed: int, sigma: float = 0.005) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 runs: 8 model sizes (1e6..1e9) x 5 token counts (1e8..1e11), 0.5% multiplicative noise."""
    N, D = np.meshgrid(np.logspace(6, 9, 8), np.logspace(8, 11, 5))
    N, D = N.ravel(), D.ravel()
    noise = np.exp(np.random.default_rng(seed).normal(0.0, sigma, N.size))
    return N, D, true_loss(N, D) * noise


@pytest.fixture(scope="module")
def fits() -> list[ChinchillaFit]:
    # Few starts and bootstrap rounds keep 10 fits to ~10 s on 2 cores.
    return [fit_chinchilla(*sweep_grid(seed), n_init=16, bootstrap=30, bootstrap_inits=1, seed=seed)
            for seed in range(10)]


# ---------------------------------------------------------------------- approach 3


def test_chinchilla_recovers_exponents(fits):
    for f in fits:
        assert abs(f.alpha - TRUE["alpha"]) < 0.02, f
        assert abs(f.beta - TRUE["beta"]) < 0.02, f
        assert abs(f.a - TRUE_A) < 0.02, f
        assert abs(f.E - TRUE["E"]) < 0.15, f
        assert math.isclose(f.a + f.b, 1.0)
    # Unbiased on average: the mean over draws sits much closer than any single draw.
    assert abs(np.mean([f.alpha for f in fits]) - TRUE["alpha"]) < 0.008
    assert abs(np.mean([f.beta for f in fits]) - TRUE["beta"]) < 0.008


def test_chinchilla_intervals_cover_truth(fits):
    for name in ("alpha", "beta", "E", "A", "B"):
        hits = sum(getattr(f, f"{name}_ci")[0] <= TRUE[name] <= getattr(f, f"{name}_ci")[1] for f in fits)
        assert hits >= 7, f"{name}: 95% interval held the truth in only {hits}/10 draws"
    hits = sum(f.a_ci[0] <= TRUE_A <= f.a_ci[1] for f in fits)
    assert hits >= 7, f"a: interval held the truth in only {hits}/10 draws"
    for f in fits:
        assert f.n_bootstrap == 30 and f.samples.shape == (30, 5)
        lo, hi = f.alpha_ci
        assert lo < f.alpha < hi and hi - lo < 0.1  # an interval, and not a vacuous one


def test_chinchilla_predict_and_optimum(fits):
    f = fits[0]
    N, D, loss = sweep_grid(0)
    np.testing.assert_allclose(f.predict(N, D), true_loss(N, D), rtol=0.01)
    assert isinstance(f.predict(1e8, 1e10), float)
    # optimal_N / optimal_D against a brute-force search along the iso-FLOP line C = 6 N D.
    for C in (1e19, 1e21, 1e23):
        Ns = np.geomspace(1e5, 1e14, 200_001)
        best = Ns[np.argmin(f.predict(Ns, C / (6 * Ns)))]
        assert math.isclose(f.optimal_N(C), best, rel_tol=1e-3)
        assert math.isclose(6 * f.optimal_N(C) * f.optimal_D(C), C, rel_tol=1e-9)
        assert math.isclose(f.optimal_loss(C), f.predict(f.optimal_N(C), f.optimal_D(C)))
    # Exponents of the allocation are the slopes of log N_opt, log D_opt against log C.
    C = np.array([1e19, 1e23])
    assert math.isclose(np.diff(np.log(f.optimal_N(C)))[0] / np.diff(np.log(C))[0], f.a)
    assert math.isclose(np.diff(np.log(f.optimal_D(C)))[0] / np.diff(np.log(C))[0], f.b)
    d = f.to_dict()
    assert d["alpha"] == f.alpha and len(d["beta_ci"]) == 2 and d["n_points"] == 40


def test_chinchilla_exact_data_and_determinism():
    N, D, loss = sweep_grid(0, sigma=0.0)
    f = fit_chinchilla(N, D, loss, n_init=8, bootstrap=4, seed=3)
    for name, value in TRUE.items():
        assert math.isclose(getattr(f, name), value, rel_tol=1e-3), (name, getattr(f, name))
    g = fit_chinchilla(N, D, loss, n_init=8, bootstrap=4, seed=3)
    assert f == g and np.array_equal(f.samples, g.samples)
    h = fit_chinchilla(N, D, loss, n_init=8, bootstrap=0)
    assert h.n_bootstrap == 0 and all(math.isnan(v) for v in h.alpha_ci)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([1e6, 1e7, 1e8, 1e9, 1e10], [1e9] * 4, [3.0] * 5), {}, "lengths differ"),
        (([1e6, 1e7, 1e8, 1e9], [1e9] * 4, [3.0] * 4), {}, "at least 5"),
        (([1e6, 1e7, 1e8, 1e9, 1e6], [1e9] * 5, [3.0] * 5), {}, "4 distinct"),
        (([1e6, -1e7, 1e8, 1e9, 1e10], [1e9] * 5, [3.0] * 5), {}, r"N\[1\]"),
        (([1e6, 1e7, 1e8, 1e9, 1e10], [1e9] * 5, [3.0, 0.0, 3.0, 3.0, 3.0]), {}, r"loss\[1\]"),
        (([1e6, 1e7, 1e8, 1e9, 1e10], [1e9, math.nan, 1e9, 1e9, 1e9], [3.0] * 5), {}, r"D\[1\]"),
        (([[1e6, 1e7]], [1e9], [3.0]), {}, "1-D"),
        ((["x"] * 5, [1e9] * 5, [3.0] * 5), {}, "N: expected"),
        (([1e6, 1e7, 1e8, 1e9, 1e10], [1e9] * 5, [3.0] * 5), {"ci": 1.5}, "ci="),
        (([1e6, 1e7, 1e8, 1e9, 1e10], [1e9] * 5, [3.0] * 5), {"n_init": 0}, "n_init"),
    ],
)
def test_chinchilla_bad_input(args, kwargs, match):
    with pytest.raises(FitInputError, match=match):
        fit_chinchilla(*args, **kwargs)
    assert issubclass(FitInputError, ValueError)


# ---------------------------------------------------------------------- approach 2


def parabola_runs(seed: int, a: float = 0.55, sigma: float = 0.002) -> list[Run]:
    """5 budgets x 9 sizes, loss a parabola in log N centred on N_opt = 0.1 C^a."""
    rng = np.random.default_rng(seed)
    runs = []
    for C in np.logspace(17, 21, 5):
        n_opt = 0.1 * C**a
        # Sizes deliberately off-centre so a fit that returned the middle size would fail.
        for N in n_opt * np.logspace(-0.7, 1.1, 9):
            loss = 4.0 - 0.1 * math.log10(C) + 0.05 * math.log(N / n_opt) ** 2
            runs.append(Run(N, C / (6 * N), C, loss * math.exp(rng.normal(0, sigma))))
    return runs


def test_isoflop_recovers_exponent():
    for seed, a in [(0, 0.55), (1, 0.5), (2, 0.62)]:
        fit = fit_isoflop(parabola_runs(seed, a), bootstrap=200, seed=seed)
        assert abs(fit.a - a) < 0.01, (a, fit.a)
        assert abs(fit.b - (1 - a)) < 0.01  # D = C/(6N) so b = 1 - a
        assert fit.a_ci[0] <= a <= fit.a_ci[1], (a, fit.a_ci)
        assert fit.a_ci[1] - fit.a_ci[0] < 0.05
        assert len(fit.budgets) == 5 and not fit.skipped and fit.n_bootstrap == 200
        for bf in fit.budgets:
            assert math.isclose(bf.N_opt, 0.1 * bf.C**a, rel_tol=0.1)
            assert math.isclose(6 * bf.N_opt * bf.D_opt, bf.C, rel_tol=1e-6)
        assert math.isclose(fit.optimal_N(1e19), 0.1 * 1e19**a, rel_tol=0.1)


def test_isoflop_agrees_with_chinchilla_allocation():
    """Iso-FLOP slices of the true L(N, D): approach 2 finds a = beta / (alpha + beta)."""
    al, be = TRUE["alpha"], TRUE["beta"]
    G = (al * TRUE["A"] / (be * TRUE["B"])) ** (1 / (al + be))
    runs = []
    for C in np.logspace(18, 22, 5):
        n_opt = G * (C / 6) ** TRUE_A
        for N in n_opt * np.logspace(-0.6, 0.6, 7):
            runs.append((N, C / (6 * N), C, true_loss(N, C / (6 * N))))
    fit = fit_isoflop(runs, bootstrap=0)
    assert abs(fit.a - TRUE_A) < 0.01 and math.isnan(fit.a_ci[0])


def test_isoflop_grouping_and_skips():
    runs = parabola_runs(0)
    # Budgets computed as 6ND carry rounding noise: still one group per budget.
    jittered = [r._replace(C=r.C * (1 + 1e-6 * (i % 3))) for i, r in enumerate(runs)]
    assert [len(g) for _, g in group_by_budget(jittered)] == [9] * 5
    # A budget whose loss only falls with N has no bracketed minimum: left out, with a warning.
    C = 1e22
    falling = [Run(N, C / (6 * N), C, 3.0 - 0.1 * math.log(N)) for N in np.logspace(9, 11, 5)]
    with pytest.warns(UserWarning, match="left out"):
        fit = fit_isoflop(runs + falling, bootstrap=20)
    assert len(fit.budgets) == 5 and fit.skipped[0][0] == C
    assert abs(fit.a - 0.55) < 0.01
    with pytest.raises(FitInputError, match="at least 2"):
        fit_isoflop([r for r in runs if r.C == runs[0].C] + falling)
    with pytest.raises(FitInputError, match="bootstrap"):
        fit_isoflop(runs, bootstrap=-1)


def test_as_runs_forms():
    rs = as_runs([(1e6, 1e9, 6e15, 3.0), {"N": 2e6, "D": 1e9, "loss": 2.9}, Run(1e6, 2e9, 1.2e16, 2.8)])
    assert rs[1].C == 6 * 2e6 * 1e9 and all(isinstance(r, Run) for r in rs)
    with pytest.raises(FitInputError, match="runs.loss"):
        as_runs([(1e6, 1e9, 6e15, -3.0)])
    with pytest.raises(FitInputError, match=r"runs\[0\]"):
        as_runs([(1e6, 1e9, 3.0)])
    with pytest.raises(FitInputError, match="empty"):
        as_runs([])


# ---------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=20_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_plots_write_pngs(tmp_path, fits):
    N, D, _ = sweep_grid(0)
    curves = {f"N={n:.0e}": [(0.0, 11.0)] + [(t, float(true_loss(n, t))) for t in np.geomspace(1e6, 1e10, 30)]
              for n in (1e6, 1e7, 1e8)}
    assert_png(plot_loss_curves(curves, tmp_path / "curves.png"))

    runs = parabola_runs(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plots themselves must not warn
        assert_png(plot_isoflop(runs, fit_isoflop(runs, bootstrap=20), tmp_path / "sub" / "iso.png"))
        frontier_runs = [(n, d, None, float(loss)) for n, d, loss in zip(*sweep_grid(0))]
        assert_png(plot_frontier(fits[0], frontier_runs, tmp_path / "frontier.png"))

    with pytest.raises(FitInputError, match="runs"):
        plot_loss_curves({}, tmp_path / "x.png")
    with pytest.raises(FitInputError, match="no point"):
        plot_loss_curves({"r": [(0.0, 3.0)]}, tmp_path / "x.png")
