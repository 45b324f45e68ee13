"""What one training step reports, whichever engine ran it (train.engine.LocalEngine or
parallel.runtime.ParallelRuntime). Here, below both, because parallel/ never imports train/."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepResult"]


@dataclass
class StepResult:
    loss: float            # mean over the global batch (every rank gets it)
    grad_norm: float       # global norm before clipping (nan when the step was skipped)
    applied: bool          # False: non-finite loss or gradient, the optimizer step was skipped
