"""Fit and plot a collected sweep: <sweep>/fit.json and <sweep>/*.png, one set per variant.

Approach 3 (titans_scale.sweep.fit): L(N, D) = E + A/N^alpha + B/D^beta over every finished
point of a variant; its compute-optimal exponents a = beta/(alpha+beta), b = alpha/(alpha+beta)
assume compute proportional to N D (C = 6ND). Approach 2 (titans_scale.sweep.isoflop, IsoFLOP
designs only): a parabola in log N per compute budget, then N_opt ∝ C^a, D_opt ∝ C^b, with C
the budget in model FLOPs (titans_scale.flops). A stage that the data cannot support (too
few points, no bracketed minimum) is recorded in fit.json with the reason, not raised.

fit.json keeps everything the plots need (bootstrap samples, parabola coefficients), so
`sweep plot` redraws without refitting.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from titans_scale.io.atomic import write_json_atomic
from titans_scale.sweep.collect import RESULTS_FILE, loss_curve, read_results
from titans_scale.sweep.fit import ChinchillaFit, FitInputError, fit_chinchilla
from titans_scale.sweep.isoflop import BudgetFit, IsoFlopFit, Run, fit_isoflop
from titans_scale.sweep.plan import load_plan
from titans_scale.sweep.plot import plot_frontier, plot_isoflop, plot_loss_curves

FIT_FILE = "fit.json"
LOSSES = ("val_loss", "train_loss")


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _pair(x: Any) -> tuple[float, float]:
    return (_nan(x[0]), _nan(x[1]))


def chinchilla_to_json(f: ChinchillaFit) -> dict:
    return {**f.to_dict(), "samples": f.samples.tolist()}


def chinchilla_from_json(d: dict) -> ChinchillaFit:
    names = ("E", "A", "B", "alpha", "beta")
    return ChinchillaFit(**{n: _nan(d[n]) for n in names},
                         **{f"{n}_ci": _pair(d[f"{n}_ci"]) for n in names + ("a", "b")},
                         objective=_nan(d["objective"]), n_points=d["n_points"], n_bootstrap=d["n_bootstrap"],
                         ci=d["ci"], samples=np.array([[_nan(v) for v in row] for row in d["samples"]]).reshape(-1, 5))


def isoflop_to_json(f: IsoFlopFit) -> dict:
    d = f.to_dict()
    for b, bf in zip(d["budgets"], f.budgets):
        b["coeffs"] = list(bf.coeffs)
    return {**d, "samples": f.samples.tolist()}


def isoflop_from_json(d: dict) -> IsoFlopFit:
    budgets = tuple(BudgetFit(C=b["C"], coeffs=tuple(b["coeffs"]), N_opt=b["N_opt"], D_opt=b["D_opt"],
                              loss_opt=b["loss_opt"], n_runs=b["n_runs"]) for b in d["budgets"])
    return IsoFlopFit(a=d["a"], b=d["b"], N_coef=d["N_coef"], D_coef=d["D_coef"], a_ci=_pair(d["a_ci"]),
                      b_ci=_pair(d["b_ci"]), budgets=budgets, skipped=tuple((s["C"], s["why"]) for s in d["skipped"]),
                      n_bootstrap=d["n_bootstrap"], ci=d["ci"],
                      samples=np.array([[_nan(v) for v in row] for row in d["samples"]]).reshape(-1, 2))


def _finished(rows: list[dict], loss: str) -> list[dict]:
    return [r for r in rows if r["status"] == "done" and r.get(loss) is not None]


def _runs(rows: list[dict], loss: str, nominal: bool = False) -> list[Run]:
    """(N, D, C, loss) per run. nominal: C is the IsoFLOP budget (whole steps make the counted
    C differ from it by a fraction of a step), so each budget forms one group for approach 2."""
    return [Run(r["params"], r["tokens"], r["budget"] if nominal else r["flops"], r[loss]) for r in rows]


def _fit_stage(fn, *args, **kw) -> tuple[Any, dict]:
    """Run one fit; returns (fit or None, {"error"?, "warnings"})."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = fn(*args, **kw)
            info: dict = {}
        except FitInputError as e:
            fit, info = None, {"error": str(e)}
    info["warnings"] = [str(w.message) for w in caught]
    return fit, info


def fit_sweep(sweep_dir: str | Path, loss: str = "val_loss", bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit every variant of a collected sweep; writes and returns <sweep>/fit.json's content."""
    if loss not in LOSSES:
        raise FitInputError(f"--loss must be one of {LOSSES}, got {loss!r}")
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    results = sweep_dir / RESULTS_FILE
    if not results.is_file():
        raise FitInputError(f"'{results}' not found; run `titans-scale sweep collect` first")
    rows = read_results(results)
    out: dict = {"sweep": plan.name, "design": plan.design, "loss": loss,
                 "N": "non-embedding parameters", "D": "training tokens",
                 "C": "model FLOPs of training (titans_scale.flops, count='model')",
                 "note": "approach 3's a, b assume C proportional to N*D (C = 6ND); approach 2 uses C as counted",
                 "variants": {}}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        done = _finished([r for r in rows if r["variant"] == variant], loss)
        runs = _runs(done, loss)
        res: dict = {"n_runs": len(runs)}
        f3, info3 = _fit_stage(fit_chinchilla, [r.N for r in runs], [r.D for r in runs], [r.loss for r in runs],
                               bootstrap=bootstrap, seed=seed) if runs else (None, {"error": "no finished runs"})
        res["approach3"] = {**chinchilla_to_json(f3), **info3} if f3 else info3
        if plan.design != "isoflop":
            f2, info2 = None, {"error": "approach 2 needs an IsoFLOP design (compute budgets)"}
        elif runs:
            f2, info2 = _fit_stage(fit_isoflop, _runs(done, loss, nominal=True), bootstrap=bootstrap, seed=seed)
        else:
            f2, info2 = None, {"error": "no finished runs"}
        res["approach2"] = {**isoflop_to_json(f2), **info2} if f2 else info2
        res["compute_optimal"] = {
            name: {"a": f.a, "a_ci": list(f.a_ci), "b": f.b, "b_ci": list(f.b_ci)}
            for name, f in (("approach3", f3), ("approach2", f2)) if f is not None}
        out["variants"][variant] = res
    out = _clean(out)
    write_json_atomic(sweep_dir / FIT_FILE, out)
    return out


def plot_variants(rows: list[dict], loss: str, path: Path) -> Path:
    """Final loss against training compute for every variant, with each variant's lower envelope."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cmap = colormaps["tab10"]
    for i, v in enumerate(variants):
        pts = sorted((r["flops"], r[loss]) for r in rows if r["variant"] == v)
        C, L = np.array(pts).T
        ax.scatter(C, L, color=cmap(i), s=24, label=v)
        ax.plot(C, np.minimum.accumulate(L), color=cmap(i), lw=1.2, drawstyle="steps-post")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (model FLOPs)", ylabel=f"final {loss}",
           title="Loss vs compute per variant (line: best loss at <= C)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")           # losses span < a decade: 3.2, not 3.2x10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """Draw <sweep>/loss_curves_<v>.png, isoflop_<v>.png, frontier_<v>.png and variants.png
    from results.csv, fit.json and the runs' metrics; returns the files written."""
    sweep_dir = Path(sweep_dir)
    plan = load_plan(sweep_dir)
    fit_path = sweep_dir / FIT_FILE
    if not fit_path.is_file():
        raise FitInputError(f"'{fit_path}' not found; run `titans-scale sweep fit` first")
    fits = json.loads(fit_path.read_text(encoding="utf-8"))
    loss = fits["loss"]
    rows = read_results(sweep_dir / RESULTS_FILE)
    written = []
    for variant, res in fits["variants"].items():
        curves = {p.name: c for p in plan.active() if p.variant == variant
                  for c in [loss_curve(sweep_dir, p, plan.tokens_per_step)] if any(t > 0 for t, _ in c)}
        if curves:
            written.append(plot_loss_curves(curves, sweep_dir / f"loss_curves_{variant}.png",
                                            title=f"Training loss: {variant}"))
        done = _finished([r for r in rows if r["variant"] == variant], loss)
        if "E" in res["approach3"]:
            written.append(plot_frontier(chinchilla_from_json(res["approach3"]), _runs(done, loss),
                                         sweep_dir / f"frontier_{variant}.png"))
        if "a" in res["approach2"]:
            runs = _runs(done, loss, nominal=True)
            written.append(plot_isoflop(runs, isoflop_from_json(res["approach2"]),
                                        sweep_dir / f"isoflop_{variant}.png"))
    done = _finished(rows, loss)
    if done:
        written.append(plot_variants(done, loss, sweep_dir / "variants.png"))
    return written
