"""The consolidated checkpoint: one folder, readable without titans-scale's training stack.

    <out>/model.safetensors        every weight, names as in TitansLM.state_dict()
    <out>/config.json              format + version, the model's full hyper-parameters, the run
                                   config, and a table: per tensor its file, shape, dtype, sha256
    <out>/optimizer.safetensors    (kind "training") optimizer tensors, names as DCP's optim keys
    <out>/trainer.pt               (kind "training") step, scheduler, data position, RNG: a
                                   weights_only torch file, copied byte for byte

kind "training" round-trips a training checkpoint exactly (a run resumed from it continues
the same loss curve); kind "weights" / "inference" carry the weights only (inference may be
cast to bf16). Written tensor by tensor, verified against the table at the end, renamed
into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from titans_scale.config import RunConfig
from titans_scale.config_io import config_from_dict, config_to_dict
from titans_scale.errors import ConvertError
from titans_scale.io.atomic import file_sha256
from titans_scale.io.safe_load import safe_torch_load
from titans_scale.model import ModelConfig

from .atomic import staged_output
from .reader import GROUP_BYTES, MODEL, OPTIM, CheckpointReader, check_model_tensors, stream_tensors
from .safetensors_io import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo, dtype_name, sha256_tensor

FORMAT = "titans-scale-consolidated"
FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"
TRAINER_FILE, CONFIG_FILE = "trainer.pt", "config.json"
KINDS = ("training", "weights", "inference")


# -- optimizer hyper-parameters as JSON (tuples kept as tuples, so a resumed run is identical) --
def _to_json(v: Any, key: str) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_to_json(x, key) for x in v]}
    if isinstance(v, list):
        return [_to_json(x, key) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ConvertError(f"optimizer value '{key}' is a {type(v).__name__}, which the consolidated "
                       "format cannot store (only numbers, strings, booleans, lists, tuples)")


def _from_json(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"__tuple__"}:
        return tuple(_from_json(x) for x in v["__tuple__"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def is_consolidated(path: Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


class ConsolidatedReader(CheckpointReader):
    layout = "consolidated"

    def __init__(self, path: str | Path):
        super().__init__(path)
        cfg_path = self.path / CONFIG_FILE
        try:
            self.config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConvertError(f"'{self.path}' has no {CONFIG_FILE}: not a consolidated checkpoint") from None
        except ValueError:
            raise ConvertError(f"'{cfg_path}' is corrupt (not JSON)") from None
        if self.config.get("format") != FORMAT:
            raise ConvertError(f"'{cfg_path}' is not a {FORMAT} config (format={self.config.get('format')!r})")
        version = self.config.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConvertError(f"'{cfg_path}' has format_version={version!r}; this titans-scale reads "
                               f"versions <= {FORMAT_VERSION}: upgrade titans-scale")
        for name, meta in self.config.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise ConvertError(f"consolidated checkpoint '{self.path}' is missing '{name}'")
            if f.stat().st_size != meta["bytes"]:
                raise ConvertError(f"'{f}' is truncated or altered ({f.stat().st_size} of {meta['bytes']} bytes)")
        self._files: dict[str, SafetensorsFile] = {}
        self._table: dict[str, dict] = self.config.get("tensors", {})
        self._infos: list[TensorInfo] = []
        for key, e in self._table.items():
            if e["file"] not in self._files:
                self._files[e["file"]] = SafetensorsFile(self.path / e["file"])
            stored = self._files[e["file"]].info(e["name"])
            want = TensorInfo(key, tuple(e["shape"]), DTYPES[e["dtype"]])
            if (stored.shape, stored.dtype) != (want.shape, want.dtype):
                raise ConvertError(f"'{self.path / e['file']}': tensor '{e['name']}' is {stored.shape} "
                                   f"{stored.dtype} but {CONFIG_FILE} says {want.shape} {want.dtype} (corrupt)")
            self._infos.append(want)
        for fname, f in self._files.items():
            listed = {e["name"] for e in self._table.values() if e["file"] == fname}
            extra = [i.name for i in f.infos() if i.name not in listed]
            if extra:
                raise ConvertError(f"'{self.path / fname}' holds tensor '{extra[0]}' that {CONFIG_FILE} does not list")
        try:
            self._model = config_from_dict(ModelConfig, self.config["model"])
            run = self.config.get("run_config")
            self._run = config_from_dict(RunConfig, run) if run else None
        except (KeyError, ValueError) as e:
            raise ConvertError(f"'{cfg_path}': bad model/run config ({e})") from None
        check_model_tensors(self._model, self._infos, self.describe())

    @property
    def kind(self) -> str:
        return self.config.get("kind", "weights")

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def _entry(self, key: str) -> dict:
        if key not in self._table:
            raise ConvertError(f"{self.describe()} has no tensor '{key}'")
        return self._table[key]

    def read(self, key: str) -> torch.Tensor:
        e = self._entry(key)
        t = self._files[e["file"]].read(e["name"])
        if sha256_tensor(t) != e["sha256"]:
            raise ConvertError(f"tensor '{e['name']}' in '{self.path / e['file']}' does not match its "
                               "checksum: the file is corrupt")
        return t

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        e = self._entry(key)
        return self._files[e["file"]].read(e["name"], (start, stop))

    def expected_sha256(self, key: str) -> str | None:
        return self._entry(key)["sha256"]

    def model_config(self) -> ModelConfig:
        return self._model

    def run_config(self) -> RunConfig | None:
        return self._run

    def values(self) -> dict[str, Any]:
        return {k: _from_json(v) for k, v in self.config.get("optimizer_values", {}).items()}

    def trainer_state_path(self) -> Path | None:
        p = self.path / TRAINER_FILE
        return p if TRAINER_FILE in self.config.get("files", {}) else None

    def step(self) -> int | None:
        return self.config.get("step")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.dtype.is_floating_point else t


def write_consolidated(reader: CheckpointReader, out: str | Path, *, kind: str | None = None,
                       dtype: torch.dtype | None = None, overwrite: bool = False,
                       group_bytes: int = GROUP_BYTES) -> Path:
    """Stream `reader` into a consolidated folder at `out`; returns `out`.

    kind: "training" (weights + optimizer + trainer state; the default when the source has
    them), "weights" (weights only) or "inference" (weights only, no run config; dtype may
    cast the float weights, e.g. torch.bfloat16). Memory: the largest tensor or group_bytes."""
    kind = kind or ("training" if reader.has_training_state() else "weights")
    if kind not in KINDS:
        raise ConvertError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "training" and not reader.has_training_state():
        raise ConvertError(f"{reader.describe()} has no optimizer/trainer state to keep; use kind='weights'")
    if dtype is not None and kind == "training":
        raise ConvertError("a training checkpoint keeps its stored dtypes; cast only for kind='inference'")
    model_cfg = reader.model_config()
    infos = reader.tensors()
    sections = [(MODEL_FILE, MODEL, [i for i in infos if i.name.startswith(MODEL)])]
    if kind == "training":
        sections.append((OPTIM_FILE, OPTIM, [i for i in infos if i.name.startswith(OPTIM)]))
    table: dict[str, dict] = {}
    with staged_output(out, overwrite, src=reader.path) as tmp:
        for fname, prefix, items in sections:
            stored = [TensorInfo(i.name[len(prefix):], i.shape, dtype if (dtype and i.dtype.is_floating_point)
                                 else i.dtype) for i in items]
            w = SafetensorsWriter(tmp / fname, stored, {"format": FORMAT})
            for (src, t), dst in zip(stream_tensors(reader, items, group_bytes), stored):
                t = _cast(t, dtype)
                table[src.name] = {"file": fname, "name": dst.name, "shape": list(dst.shape),
                                   "dtype": dtype_name(dst.dtype), "sha256": w.write(dst.name, t)}
                del t
            w.close()
        config: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "model": dataclasses.asdict(model_cfg),
            "run_config": None if kind == "inference" or reader.run_config() is None
            else config_to_dict(reader.run_config()),
            "step": None if kind == "inference" else reader.step(),
            "dtype": str(dtype).removeprefix("torch.") if dtype else "as stored",
            "source": {"layout": reader.layout, "path": str(reader.path)},
        }
        if kind == "training":
            config["optimizer_values"] = {k: _to_json(v, k) for k, v in sorted(reader.values().items())}
            src = reader.trainer_state_path()
            safe_torch_load(src)                          # refuse a pickled payload before copying it
            shutil.copyfile(src, tmp / TRAINER_FILE)
        config["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                           for p in sorted(tmp.iterdir()) if p.is_file()}
        config["tensors"] = table
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        verify_consolidated(tmp)
    return Path(out)


def verify_consolidated(path: str | Path) -> None:
    """Re-read a consolidated folder against its table: file sizes, headers, shapes, and every
    tensor's sha256 (hashed from disk in blocks, constant memory)."""
    r = ConsolidatedReader(path)
    for key, e in r._table.items():
        if r._files[e["file"]].sha256(e["name"]) != e["sha256"]:
            raise ConvertError(f"tensor '{e['name']}' in '{Path(path) / e['file']}' does not match its "
                               "checksum after writing (disk error?)")


__all__ = ["ConsolidatedReader", "write_consolidated", "verify_consolidated", "is_consolidated",
           "FORMAT", "FORMAT_VERSION", "KINDS"]
