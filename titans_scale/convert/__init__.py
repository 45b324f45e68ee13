"""Checkpoint conversion: between layouts, to one safetensors file, and to/from titans-pytorch.

    from titans_scale import convert

    r = convert.open_checkpoint("runs/tiny")                 # run folder, step_N, DCP, consolidated
    convert.write_consolidated(r, "out/tiny-consolidated")    # model.safetensors + config.json (+ state)
    convert.write_training_checkpoint(convert.open_checkpoint("out/tiny-consolidated"), "runs/tiny2")
    convert.export_inference(r, "out/tiny-bf16", dtype="bf16")
    convert.export_hf(r, "out/tiny-hf")                       # transformers' AutoModelForCausalLM loads it
    model = convert.load_model("out/tiny-bf16")

Every conversion streams tensor by tensor, verifies checksums at the end, and writes into a
temporary folder renamed into place only when complete. Nothing is unpickled beyond tensors
and plain values (titans_scale.io.safe_load). docs/convert.md has the formats and the titans-pytorch mapping.
"""

from __future__ import annotations

import importlib

# name -> module relative to this package ("..": titans_scale's); imported on first use, so
# `titans-scale --help` (which builds the convert parser) does not import torch.
_API = {
    "open_checkpoint": "layouts", "register_layout": "layouts",
    "CheckpointReader": "reader", "TensorInfo": "reader", "DcpReader": "dcp_reader",
    "ParallelReader": "parallel_reader",
    "ConsolidatedReader": "consolidated", "write_consolidated": "consolidated",
    "verify_consolidated": "consolidated", "FORMAT": "consolidated", "FORMAT_VERSION": "consolidated",
    "write_training_checkpoint": "training", "export_inference": "export", "load_model": "export",
    "SafeFileSystemReader": ".io.safe_load", "SafeLoadPlanner": ".io.safe_load", "safe_torch_load": ".io.safe_load",
    "ConvertError": ".errors", "UnsafeCheckpointError": ".errors", "IncompatibleError": ".errors",
    "import_memory": "titans_pytorch", "export_memory": "titans_pytorch", "TitansPytorchOptions": "titans_pytorch",
    "export_hf": "hf", "HfReader": "hf",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
