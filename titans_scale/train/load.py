"""A trained run's model, for the commands that use one (eval, generate)."""

from __future__ import annotations

from pathlib import Path

from titans_scale.config import load_run_config
from titans_scale.errors import CheckpointError
from titans_scale.model import TitansLM
from titans_scale.precision.apply import Precision
from titans_scale.train.checkpoint import CheckpointManager


def load_trained(run_dir: str, overrides=()):
    """The model of a run folder: its saved config and the newest checkpoint's weights."""
    cfg_path = Path(run_dir) / "config.toml"
    if not cfg_path.is_file():
        raise CheckpointError(f"--run-dir '{run_dir}' has no config.toml: is it a training run folder?")
    cfg = load_run_config(str(cfg_path), overrides)
    model = TitansLM(cfg.model)
    model.precision = Precision(model, cfg)          # FP8 layers (and their scales) before loading
    ckpt = CheckpointManager(run_dir)
    folder = ckpt.latest()
    if folder is None:
        raise CheckpointError(f"--run-dir '{run_dir}' has no checkpoint yet; train first")
    ckpt.load_model(folder, model)
    return cfg, model.eval()


__all__ = ["load_trained"]
