"""Scaling-law figures as PNG files.

Uses matplotlib's object API (Figure + Agg canvas) rather than pyplot, so it never
touches the global backend or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from titans_scale.sweep.fit import ChinchillaFit, FitInputError
from titans_scale.sweep.isoflop import IsoFlopFit, as_runs, group_by_budget

__all__ = ["plot_frontier", "plot_isoflop", "plot_loss_curves"]

_DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _sci(x: float) -> str:
    """3.2e+19 -> '3.2e19'."""
    return f"{x:.2g}".replace("e+", "e")


def _plain_log_y(ax: Any) -> None:
    """Label a log loss axis 2, 3, 4 rather than 2x10^0: losses span less than a decade."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 4, 5, 6, 8)))
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)


def _ci(ci: tuple[float, float]) -> str:
    return "" if any(math.isnan(v) for v in ci) else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def plot_loss_curves(
    runs: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    xlabel: str = "tokens",
    title: str = "Training loss",
) -> Path:
    """Loss against tokens (or steps) for each run: {name: [(tokens, loss), ...]}.

    Both axes are logarithmic; points with tokens <= 0 or a non-finite loss are dropped.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise FitInputError("runs: expected a non-empty mapping {run name: [(tokens, loss), ...]}")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for i, (name, curve) in enumerate(runs.items()):
        xy = np.asarray(curve, dtype=np.float64).reshape(-1, 2)
        keep = (xy[:, 0] > 0) & np.isfinite(xy).all(axis=1) & (xy[:, 1] > 0)
        if not keep.any():
            raise FitInputError(f"runs[{name!r}]: no point with tokens > 0 and a finite positive loss")
        color = cmap(i / max(len(runs) - 1, 1) * 0.9)
        ax.plot(xy[keep, 0], xy[keep, 1], color=color, lw=1.4, label=str(name))
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss", title=title)
    _plain_log_y(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=1 + len(runs) // 12, loc="upper right")
    return _save(fig, path)


def plot_isoflop(runs: Iterable[Any], fit: IsoFlopFit, path: str | Path, *,
                 budget_rtol: float = 1e-3) -> Path:
    """Left: loss vs N per compute budget with each parabola and its minimum.
    Right: the minima N_opt(C), D_opt(C) and the fitted power laws."""
    groups = group_by_budget(runs, budget_rtol)
    fits = {bf.C: bf for bf in fit.budgets}
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    cmap, norm = colormaps["plasma"], LogNorm(min(c for c, _ in groups), max(c for c, _ in groups) * 1.0001)

    for C, g in groups:
        color = cmap(0.85 * norm(C))
        N = np.array([r.N for r in g])
        loss = np.array([r.loss for r in g])
        bf = next((f for c, f in fits.items() if abs(c - C) <= budget_rtol * C), None)
        if bf is None:  # left out of the fit (no bracketed minimum)
            ax.scatter(N, loss, facecolors="none", edgecolors=color, s=28,
                       label=f"C={_sci(C)} (left out)")
            continue
        ax.scatter(N, loss, color=color, s=28, label=f"C={_sci(C)}")
        grid = np.geomspace(N.min() / 1.3, N.max() * 1.3, 200)
        ax.plot(grid, bf.loss_at(grid), color=color, lw=1.2)
        ax.scatter([bf.N_opt], [bf.loss_opt], marker="*", s=160, color=color, edgecolors="black",
                   linewidths=0.6, zorder=3)
    ax.scatter([], [], marker="*", s=120, color="white", edgecolors="black", label="parabola minimum")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOP profiles")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")

    Cs = np.array([bf.C for bf in fit.budgets])
    Cline = np.geomspace(Cs.min() / 3, Cs.max() * 3, 100)
    ax2.scatter(Cs, [bf.N_opt for bf in fit.budgets], color="tab:blue", label="N_opt (parameters)")
    ax2.plot(Cline, fit.optimal_N(Cline), color="tab:blue",
             label=f"N_opt ∝ C^a, a = {fit.a:.3f}{_ci(fit.a_ci)}")
    ax2.scatter(Cs, [bf.D_opt for bf in fit.budgets], color="tab:orange", marker="s", label="D_opt (tokens)")
    ax2.plot(Cline, fit.optimal_D(Cline), color="tab:orange",
             label=f"D_opt ∝ C^b, b = {fit.b:.3f}{_ci(fit.b_ci)}")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt, D_opt",
            title="Compute-optimal allocation (approach 2)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize="small")
    return _save(fig, path)


def _frontier_band(samples: np.ndarray, C: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Percentile band of the compute-optimal loss over bootstrap samples (E, A, B, alpha, beta)."""
    if len(samples) < 10:
        return None
    E, A, B, al, be = (samples[:, i, None] for i in range(5))
    with np.errstate(all="ignore"):
        G = (al * A / (be * B)) ** (1 / (al + be))
        N = G * (C / 6) ** (be / (al + be))
        D = (C / 6) ** (al / (al + be)) / G
        L = E + A / N**al + B / D**be
    lo, hi = np.nanquantile(L, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    return lo, hi


def plot_frontier(fit: ChinchillaFit, runs: Iterable[Any], path: str | Path) -> Path:
    """Left: contours of the fitted L(N, D), iso-FLOP lines, the compute-optimal frontier
    and the measured runs coloured by their loss. Right: loss vs compute, the fitted
    frontier L(N_opt(C), D_opt(C)) (with its bootstrap band) and the measured runs."""
    rs = as_runs(runs)
    N = np.array([r.N for r in rs])
    D = np.array([r.D for r in rs])
    C = np.array([r.C for r in rs])
    loss = np.array([r.loss for r in rs])

    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    Ng = np.geomspace(N.min() / 3, N.max() * 3, 200)
    Dg = np.geomspace(D.min() / 3, D.max() * 3, 200)
    L = fit.predict(Ng[None, :], Dg[:, None])
    norm = LogNorm(min(L.min(), loss.min()), max(np.quantile(L, 0.9), loss.max()))
    levels = np.geomspace(norm.vmin, norm.vmax, 16)
    cs = ax.contourf(Ng, Dg, np.clip(L, norm.vmin, norm.vmax), levels=levels, norm=norm,
                     cmap="viridis", alpha=0.85)
    ax.contour(Ng, Dg, L, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
    # Iso-FLOP lines C = 6 N D, one per decade across the plotted box.
    lo, hi = math.floor(math.log10(6 * Ng[0] * Dg[0])), math.ceil(math.log10(6 * Ng[-1] * Dg[-1]))
    for k in range(lo, hi + 1):
        ax.plot(Ng, 10.0**k / (6 * Ng), color="grey", ls=":", lw=0.8)
    Cf = np.geomspace(6 * Ng[0] * Dg[0], 6 * Ng[-1] * Dg[-1], 200)
    ax.plot(fit.optimal_N(Cf), fit.optimal_D(Cf), color="red", lw=2,
            label=f"compute-optimal: N ∝ C^{fit.a:.2f}, D ∝ C^{fit.b:.2f}")
    ax.plot([], [], color="grey", ls=":", label="iso-FLOP lines (C = 6ND, per decade)")
    ax.scatter(N, D, c=loss, norm=norm, cmap="viridis", edgecolors="black", s=36, zorder=3,
               label="runs (colour: measured loss)")
    ax.set(xscale="log", yscale="log", xlim=(Ng[0], Ng[-1]), ylim=(Dg[0], Dg[-1]),
           xlabel="parameters N", ylabel="tokens D", title="Fitted L(N, D) (approach 3)")
    fig.colorbar(cs, ax=ax, label="loss", ticks=levels[::3], format="%.2f")
    ax.legend(fontsize="small", loc="upper left")

    Cl = np.geomspace(C.min() / 3, C.max() * 3, 200)
    band = _frontier_band(fit.samples, Cl, fit.ci)
    if band is not None:
        ax2.fill_between(Cl, *band, color="red", alpha=0.2, label=f"{fit.ci:.0%} bootstrap band")
    ax2.plot(Cl, fit.optimal_loss(Cl), color="red", lw=2, label="fitted frontier L(N_opt, D_opt)")
    ax2.axhline(fit.E, color="black", ls="--", lw=0.8, label=f"E = {fit.E:.3f}{_ci(fit.E_ci)}")
    sc = ax2.scatter(C, loss, c=N, norm=LogNorm(N.min(), N.max() * 1.0001), cmap="plasma",
                     edgecolors="black", s=30, zorder=3, label="runs")
    fig.colorbar(sc, ax=ax2, label="parameters N")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="final loss",
            title=f"alpha = {fit.alpha:.3f}{_ci(fit.alpha_ci)}, beta = {fit.beta:.3f}{_ci(fit.beta_ci)}")
    _plain_log_y(ax2)
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize="small")
    return _save(fig, path)
