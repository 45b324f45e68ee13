"""Scaling-law sweeps: plan, run, collect, fit (Chinchilla approaches 2 and 3), plot."""

from titans_scale.sweep.fit import ChinchillaFit, fit_chinchilla
from titans_scale.sweep.isoflop import IsoFlopFit, fit_isoflop

__all__ = ["ChinchillaFit", "IsoFlopFit", "fit_chinchilla", "fit_isoflop"]
