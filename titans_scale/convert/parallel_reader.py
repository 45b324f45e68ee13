"""Read the parallel trainer's checkpoints (megatron TP x PP x DP, parallel/checkpoint.py).

    <run>/checkpoints/step_N/layout.json        {"engine", "tp", "pp", "vpp", "dp",
                                                 "format": "megatron-dist-checkpointing"}
    <run>/checkpoints/step_N/manifest.json      sizes + sha256 of every file (io/manifest.py)
    <run>/checkpoints/step_N/model_optim/       megatron dist_checkpointing, torch_dist backend:
        .metadata, __<rank>_<i>.distcp          a torch.distributed.checkpoint folder
        metadata.json                           {"sharded_backend": "torch_dist", ...}
        common.pt                               the state every rank shares: optimizer param
                                                groups and the trainer's state (step, data position)

The DCP keys of the weights are already the single-device TitansLM names (each rank saved its
TP shard at its global offset; the pipeline stage never enters a key, and a tied embedding is
stored once, by the first stage), so the folder is assembled tensor by tensor by DcpReader;
this layout maps ``<name>`` -> ``model.<name>``, skips the distributed optimizer's
``optimizer.state.{param,exp_avg,exp_avg_sq}.<name>`` tensors (weights only: its Adam state is
not converted), and cuts the vocabulary padding (layout.padded_vocab_size: a multiple of 128
and of TP) off ``embed.weight`` / ``head.weight``. The padded rows must be zero (they are
never looked up and their logits are masked, so training keeps them at zero): a non-zero row
means the config's vocab_size is not the run's. ``common.pt`` is read with weights_only=True.

Accepted paths: the run folder (its ``checkpoints/latest``), a ``step_N`` folder, or the
``model_optim`` folder itself (with --config, and without the TP check when no layout.json is
beside it). DeepSpeed's checkpoints (engine='deepspeed') are refused: they hold ZeRO
partitions of flat buffers, not named tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from titans_scale.config import RunConfig
from titans_scale.errors import ConvertError
from titans_scale.io.commit import checkpoint_dir
from titans_scale.io.safe_load import allow_metadata_globals, safe_torch_load

from .dcp_reader import DcpReader, _step_of, resolve_run_dir
from .reader import MODEL
from .safetensors_io import TensorInfo

LAYOUT_FILE, MEGATRON_FORMAT = "layout.json", "megatron-dist-checkpointing"
VOCAB_KEYS = (MODEL + "embed.weight", MODEL + "head.weight")

# megatron's torch_dist save planner leaves its cached save plans (plain dataclasses of
# torch.distributed.checkpoint.planner) inside `.metadata`.
allow_metadata_globals(*(("torch.distributed.checkpoint.planner", n)
                         for n in ("SavePlan", "WriteItem", "TensorWriteData", "WriteItemType")))


def _is_dist_ckpt_folder(p: Path) -> bool:
    f = p / "metadata.json"
    if not (f.is_file() and (p / ".metadata").is_file()):
        return False
    try:
        return "sharded_backend" in json.loads(f.read_text())
    except (ValueError, TypeError):
        return False


def _is_step_folder(p: Path) -> bool:
    return (p / LAYOUT_FILE).is_file() and (p / "model_optim").is_dir()


def is_parallel_checkpoint(p: Path) -> bool:
    """A parallel step folder, its model_optim folder, or a run folder whose latest checkpoint is one."""
    if _is_step_folder(p) or _is_dist_ckpt_folder(p):
        return True
    if checkpoint_dir(p).is_dir() and (p / "config.toml").is_file():
        try:
            return _is_step_folder(resolve_run_dir(p))
        except ConvertError:
            return False
    return False


class ParallelReader(DcpReader):
    layout = "megatron"

    def __init__(self, path: str | Path, run_config: RunConfig | None = None):
        p = Path(path)
        if not _is_step_folder(p) and checkpoint_dir(p).is_dir():
            p = resolve_run_dir(p)
        if _is_dist_ckpt_folder(p) and _is_step_folder(p.parent):
            p = p.parent                                   # the model_optim folder of a step folder
        self.saved_layout: dict | None = None
        if _is_step_folder(p):
            try:
                self.saved_layout = json.loads((p / LAYOUT_FILE).read_text())
                fmt = self.saved_layout["format"]
            except (ValueError, TypeError, KeyError):
                raise ConvertError(f"'{p / LAYOUT_FILE}' is not a parallel layout record (corrupt)") from None
            if fmt == "deepspeed":
                raise ConvertError(f"'{p}' was written by the DeepSpeed engine (ZeRO partitions of flat "
                                   "buffers): convert reads the megatron engine's checkpoints only (train with "
                                   "parallel.engine='megatron', or use DeepSpeed's zero_to_fp32 on this one)")
            if fmt != MEGATRON_FORMAT:
                raise ConvertError(f"'{p / LAYOUT_FILE}': unknown checkpoint format {fmt!r}; upgrade titans-scale")
        dist_dir = p / "model_optim" if self.saved_layout is not None else p
        try:
            backend = json.loads((dist_dir / "metadata.json").read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError):
            raise ConvertError(f"'{dist_dir / 'metadata.json'}' is missing or corrupt: the checkpoint is "
                               "partial") from None
        if backend != "torch_dist":
            raise ConvertError(f"'{dist_dir}' uses the dist_checkpointing backend {backend!r}; only "
                               "'torch_dist' (the trainer's) is read")
        self._trim: dict[str, int] = {}
        super().__init__(p, run_config, key_map=self._key_map)
        self.layout = "megatron"
        self._common_state = self._read_common()          # refuses a crafted common.pt before anything is written

    @staticmethod
    def _key_map(key: str) -> str | None:
        if key.startswith("optimizer."):
            return None                                    # distributed-optimizer state: not converted
        return MODEL + key

    # -- vocabulary padding -----------------------------------------------------------------
    def _check_model(self) -> None:
        vocab = self.model_config().vocab_size
        tp = self.saved_layout.get("tp") if self.saved_layout else None
        padded = None
        if tp:
            from titans_scale.parallel.layout import padded_vocab_size  # noqa: PLC0415
            padded = padded_vocab_size(vocab, int(tp))
        for i, info in enumerate(self._infos):
            if info.name not in VOCAB_KEYS or not info.shape or info.shape[0] == vocab:
                continue
            rows = info.shape[0]
            if rows < vocab or (padded is not None and rows != padded):
                want = f"{padded} (vocab_size {vocab} padded for TP={tp})" if padded else f">= {vocab}"
                raise ConvertError(f"{self.describe()}: '{info.name}' has {rows} rows, the model config implies "
                                   f"{want}; use the run's own config")
            self._trim[info.name] = vocab
            self._infos[i] = TensorInfo(info.name, (vocab, *info.shape[1:]), info.dtype)
        super()._check_model()

    def read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        got = super().read_many(keys)
        for key in keys:
            if key in self._trim:
                t, vocab = got[key], self._trim[key]
                if t.shape[0] > vocab and bool(t[vocab:].any()):
                    raise ConvertError(f"{self.describe()}: '{key}' has non-zero rows past vocab_size {vocab} "
                                       "(the padding must be zero): the model config's vocab_size is not the run's")
                got[key] = t[:vocab]                       # leading rows: contiguous, no copy
        return got

    # -- the rest of the interface ------------------------------------------------------------
    def _read_common(self) -> dict:
        f = self.dcp_dir / "common.pt"
        if not f.is_file():
            return {}
        state = safe_torch_load(f)                         # weights_only: refuses pickled objects
        return state if isinstance(state, dict) else {}

    def step(self) -> int | None:
        trainer = self._common_state.get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("step"), int):
            return trainer["step"]
        return _step_of(self.ckpt_dir) if self.ckpt_dir is not None else None

    def trainer_state_path(self) -> Path | None:
        return None                                        # weights only (see the module docstring)

    def describe(self) -> str:
        lay = self.saved_layout
        if lay:
            return (f"megatron TP={lay.get('tp')} x PP={lay.get('pp')} x DP={lay.get('dp')} checkpoint "
                    f"'{self.path}'")
        return f"megatron dist_checkpointing folder '{self.path}'"


__all__ = ["ParallelReader", "is_parallel_checkpoint"]
