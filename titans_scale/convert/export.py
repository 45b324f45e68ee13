"""Inference export (weights only, optionally bf16) and loading a model from any checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from titans_scale.errors import ConvertError
from titans_scale.model import TitansLM

from .consolidated import write_consolidated
from .layouts import open_checkpoint
from .reader import MODEL, CheckpointReader, stream_tensors

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def export_inference(reader: CheckpointReader, out: str | Path, dtype: torch.dtype | str | None = None,
                     overwrite: bool = False) -> Path:
    """Weights only (no optimizer, trainer state or run config), float weights cast to dtype."""
    return write_consolidated(reader, out, kind="inference", dtype=parse_dtype(dtype), overwrite=overwrite)


def load_model(path: str | Path | CheckpointReader, dtype: torch.dtype | None = None) -> TitansLM:
    """TitansLM with the weights of any checkpoint layout, filled tensor by tensor (eval mode).
    dtype: the parameters' dtype (default: as the model is built, fp32)."""
    reader = path if isinstance(path, CheckpointReader) else open_checkpoint(path)
    model = TitansLM(reader.model_config())
    if dtype is not None:
        model.to(dtype)
    params = model.state_dict(keep_vars=True)
    for info, t in stream_tensors(reader, reader.model_tensors()):
        with torch.no_grad():
            params[info.name[len(MODEL):]].copy_(t)
    return model.eval()


__all__ = ["export_inference", "load_model", "parse_dtype"]
