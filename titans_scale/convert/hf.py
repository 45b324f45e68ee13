"""Hugging Face model folders: any checkpoint -> one (`convert SRC DST --to hf`), and one back
into a checkpoint (`convert HF_DIR DST --from hf`, by default a training run folder).

    <out>/config.json                TitansConfig: model_type "titans_scale", every ModelConfig field,
                                     auto_map (trust_remote_code), the run config and step
    <out>/model.safetensors          TitansLM's weights as "model.<fqn>" (titans_scale.hf's names, which
                                     are also the reader keys here), streamed tensor by tensor
    <out>/generation_config.json     bos / eos / pad ids
    <out>/modeling_titans_scale.py   what auto_map names (imports titans_scale.hf)
    <out>/tokenizer.json, tokenizer_config.json   the run's tokenizer (titans_scale/hf/tokenizer.py)

Both directions need transformers (the `hf` extra). Like every conversion the folder is staged
and renamed into place only once every tensor was re-read and matched its streamed checksum.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from titans_scale.config import RunConfig
from titans_scale.config_io import config_from_dict, config_to_dict
from titans_scale.errors import ConfigError, ConvertError
from titans_scale.model import ModelConfig

from .atomic import staged_output
from .reader import CheckpointReader, check_model_tensors, stream_tensors
from .safetensors_io import SafetensorsFile, SafetensorsWriter, TensorInfo

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _interop():
    """titans_scale.hf, or one line saying how to install it."""
    if importlib.util.find_spec("transformers") is None:
        raise ConvertError("Hugging Face conversion needs transformers: pip install 'titans-scale[hf]'")
    import titans_scale.hf  # noqa: PLC0415
    return titans_scale.hf


class HfReader(CheckpointReader):
    """A Hugging Face folder written by `--to hf` (or TitansForCausalLM.save_pretrained): one
    model.safetensors or shards listed by model.safetensors.index.json. Anything else (another
    model_type, pickled weights, missing, extra or misshapen tensors, a truncated file) is refused
    in one line naming the file."""

    layout = "hf"

    def __init__(self, path: str | Path):
        super().__init__(path)
        hf = _interop()
        cfg_path = self.path / CONFIG_FILE
        if not self.path.is_dir():
            raise ConvertError(f"'{self.path}' is not a folder: pass a Hugging Face model folder "
                               f"({CONFIG_FILE} + {WEIGHTS_FILE})")
        try:
            self.config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConvertError(f"'{cfg_path}' is missing: not a Hugging Face model folder") from None
        except (ValueError, UnicodeDecodeError):
            raise ConvertError(f"'{cfg_path}' is corrupt (not JSON)") from None
        model_type = self.config.get("model_type") if isinstance(self.config, dict) else None
        if model_type != hf.MODEL_TYPE:
            raise ConvertError(f"'{cfg_path}' describes a {model_type!r} model, not {hf.MODEL_TYPE!r}: only "
                               "titans-scale models convert back into titans-scale checkpoints")
        try:
            self._model = config_from_dict(ModelConfig, {k: self.config[k] for k in hf.MODEL_FIELDS
                                                         if k in self.config})
            run = self.config.get("titans_run_config")
            self._run = config_from_dict(RunConfig, run) if run else None
        except ConfigError as e:
            raise ConvertError(f"'{cfg_path}': {e}") from None
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}             # tensor -> its file's name
        for fname, names in self._weight_files().items():
            f = self._files[fname] = SafetensorsFile(self.path / fname)
            for info in f.infos():
                if names is not None and info.name not in names:
                    raise ConvertError(f"'{self.path / fname}' holds tensor '{info.name}' that {INDEX_FILE} "
                                       "does not list in it")
                self._where[info.name] = fname
            absent = sorted(set(names or ()) - {i.name for i in f.infos()})
            if absent:
                raise ConvertError(f"'{self.path / fname}' lacks tensor '{absent[0]}' that {INDEX_FILE} lists")
        self._infos = [self._files[f].info(n) for n, f in self._where.items()]
        where = f"'{self.path / WEIGHTS_FILE}'" if len(self._files) == 1 else self.describe()
        check_model_tensors(self._model, self._infos, where)

    def _weight_files(self) -> dict[str, set[str] | None]:
        """{file: the tensors the index puts in it, or None for a lone model.safetensors}."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files: dict[str, set[str]] = {}
                for name, fname in weight_map.items():
                    files.setdefault(str(fname), set()).add(name)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise ConvertError(f"'{index}' is corrupt (expected JSON with a weight_map)") from None
            for fname in files:
                if Path(fname).name != fname:
                    raise ConvertError(f"'{index}' names '{fname}', which is not a file in the folder")
            return files
        if (self.path / WEIGHTS_FILE).is_file():
            return {WEIGHTS_FILE: None}
        for pickled in PICKLED_WEIGHTS:
            if (self.path / pickled).is_file():
                raise ConvertError(f"'{self.path / pickled}' holds pickled weights, which titans-scale does not "
                                   "load; save the model with safetensors (save_pretrained's default)")
        raise ConvertError(f"'{self.path / WEIGHTS_FILE}' is missing: the folder has no weights")

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, key: str) -> torch.Tensor:
        return self._file(key).read(key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._file(key).read(key, (start, stop))

    def _file(self, key: str) -> SafetensorsFile:
        if key not in self._where:
            raise ConvertError(f"{self.describe()} has no tensor '{key}'")
        return self._files[self._where[key]]

    def model_config(self) -> ModelConfig:
        return self._model

    def run_config(self) -> RunConfig:
        """The exported run's config; for a folder without one, a default run of this model
        whose tokenizer is the folder's own."""
        if self._run is not None:
            return self._run
        run = RunConfig(model=dataclasses.replace(self._model))
        if self.config.get("titans_tokenizer") != "byte" and (self.path / "tokenizer.json").is_file():
            run.data.tokenizer = str((self.path / "tokenizer.json").resolve())
        return run

    def step(self) -> int | None:
        return self.config.get("titans_step")


def export_hf(reader: CheckpointReader, out: str | Path, *, tokenizer: str | None = None,
              overwrite: bool = False) -> Path:
    """Write `reader`'s weights as a Hugging Face folder at `out` with the tokenizer `tokenizer`
    ("byte" or a tokenizer.json path; default: the run config's data.tokenizer, else "byte")."""
    hf = _interop()
    from transformers import GenerationConfig  # noqa: PLC0415

    run = reader.run_config()
    infos = reader.model_tensors()
    floats = {i.dtype for i in infos if i.dtype.is_floating_point}
    with staged_output(out, overwrite, src=reader.path) as tmp:
        special = hf.save_tokenizer(tokenizer or (run.data.tokenizer if run else "byte"), tmp)
        w = SafetensorsWriter(tmp / WEIGHTS_FILE, infos, {"format": "pt"})
        streamed = {i.name: w.write(i.name, t) for i, t in stream_tensors(reader, infos)}
        w.close()
        config = hf.TitansConfig.from_model_config(
            reader.model_config(), architectures=[hf.TitansForCausalLM.__name__],
            dtype=str(floats.pop()).removeprefix("torch.") if len(floats) == 1 else None,
            titans_run_config=config_to_dict(run) if run is not None else None, titans_step=reader.step(),
            **special)
        config.save_pretrained(str(tmp))
        GenerationConfig(**{k: v for k, v in special.items() if k.endswith("_token_id")}).save_pretrained(str(tmp))
        hf.write_remote_code(tmp)
        _verify(HfReader(tmp), reader, streamed)
    return Path(out)


def _verify(written: HfReader, source: CheckpointReader, streamed: dict[str, str]) -> None:
    """Every written tensor's bytes hash to what was streamed, and to the source's record of it."""
    for key, sha in streamed.items():
        recorded = source.expected_sha256(key)
        if recorded is not None and recorded != sha:
            raise ConvertError(f"source tensor '{key}' does not match its checksum: {source.describe()} is corrupt")
        if written._file(key).sha256(key) != sha:
            raise ConvertError(f"written tensor '{key}' in '{written.path / WEIGHTS_FILE}' does not match the "
                               "source (disk error?)")


__all__ = ["HfReader", "export_hf"]
