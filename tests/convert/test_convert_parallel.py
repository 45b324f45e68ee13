"""The parallel trainer's checkpoint (megatron TP=2 x PP=2, 4 gloo ranks under torchrun) through
the converter: TP=2xPP=2 -> consolidated (A) -> TP=1 (a single-process run folder) ->
consolidated (B), with A and B bitwise equal tensor by tensor, and a model loaded from A, from
the TP=1 checkpoint (by the converter and by the trainer's own CheckpointManager) and from B
giving the parallel model's own logits on a fixed batch (fp32, 1e-6). The parallel logits come
from the torchrun job itself (parallel_worker.py: the trained TP x PP model run forward, the
vocabulary-parallel logits gathered over TP and cut to the vocabulary).

Plus: a truncated shard, a missing shard, a wrong vocab_size and a DeepSpeed checkpoint are
refused in one line, and nothing is written at the destination.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import leftovers, logits_of, parallel_micro_run
from titans_scale import convert
from titans_scale.convert.safetensors_io import SafetensorsFile, tensor_bytes

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo run")]

TOL = 1e-6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel_shards") / "shards"


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def parallel_run(request, tmp_path_factory, shards):
    """(run folder, {tokens, logits} of the trained parallel model) for TP=2 x PP=2, 2 steps."""
    return parallel_micro_run(tmp_path_factory.mktemp("parallel_run"), shards, request.param)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    f = SafetensorsFile(folder / "model.safetensors")
    return {i.name: f.read(i.name) for i in f.infos()}


def test_tp2_pp2_to_consolidated_to_tp1_and_back(parallel_run, tmp_path):
    run, ref = parallel_run
    layout = json.loads((run / "checkpoints" / "step_00000002" / "layout.json").read_text())
    assert (layout["tp"], layout["pp"], layout["format"]) == (2, 2, "megatron-dist-checkpointing")

    src = convert.open_checkpoint(run)
    assert src.layout == "megatron" and src.step() == 2 and not src.has_training_state()
    cfg = src.model_config()
    a = convert.write_consolidated(src, tmp_path / "A")
    meta = json.loads((a / "config.json").read_text())
    assert meta["kind"] == "weights" and meta["step"] == 2 and meta["source"]["layout"] == "megatron"
    # the vocabulary padding (259 -> 384 rows under TP=2) is cut
    assert meta["tensors"]["model.embed.weight"]["shape"] == [cfg.vocab_size, cfg.d_model]
    assert ("model.head.weight" in meta["tensors"]) == (not cfg.tie_embeddings)

    # TP=1: the single-process trainer's run folder (a run config without [parallel] splits)
    one = copy.deepcopy(src.run_config())
    one.parallel.tp = one.parallel.pp = one.parallel.microbatches = 1
    tp1_ckpt = convert.write_training_checkpoint(convert.open_checkpoint(a), tmp_path / "tp1", run_config=one)
    tp1 = tmp_path / "tp1"
    assert convert.open_checkpoint(tp1).layout == "training"
    b = convert.write_consolidated(convert.open_checkpoint(tp1), tmp_path / "B")

    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype == torch.float32 and ta[name].shape == tb[name].shape
        assert bytes(tensor_bytes(ta[name])) == bytes(tensor_bytes(tb[name])), f"{name} differs bitwise"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()

    tokens, want = ref["tokens"], ref["logits"]
    assert want.dtype == torch.float32 and want.shape == (*tokens.shape, cfg.vocab_size)
    from titans_scale.model import TitansLM
    from titans_scale.train.checkpoint import CheckpointManager
    trainer_loaded = TitansLM(cfg)
    CheckpointManager(tp1).load_model(tp1_ckpt, trainer_loaded)
    models = {"parallel ckpt": convert.load_model(run), "consolidated A": convert.load_model(a),
              "TP=1": convert.load_model(tp1), "TP=1 via CheckpointManager": trainer_loaded.eval(),
              "consolidated B": convert.load_model(b)}
    for what, model in models.items():
        got = logits_of(model, tokens)
        err = (got - want).abs().max().item()
        assert err <= TOL, f"{what}: logits differ from the TP=2xPP=2 model's by {err:.3e}"


# -- refusals -----------------------------------------------------------------------------------

def _refused(tmp_path, match, path, run_config=None) -> str:
    dst = tmp_path / "out" / "dst"
    with pytest.raises(convert.ConvertError, match=match) as e:
        convert.write_consolidated(convert.open_checkpoint(path, run_config), dst)
    assert "\n" not in str(e.value)
    assert not dst.exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)
    return str(e.value)


def _copy_step(parallel_run, tmp_path) -> Path:
    run, _ = parallel_run
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    return bad / "checkpoints" / "step_00000002"


def test_truncated_shard_is_refused(parallel_run, tmp_path):
    step = _copy_step(parallel_run, tmp_path)
    shard = sorted((step / "model_optim").glob("*.distcp"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    msg = _refused(tmp_path, "truncated", tmp_path / "run")            # the run folder, via its manifest
    assert shard.name in msg
    # without the manifest (the bare model_optim folder): DCP's piece table finds it
    (step / "manifest.json").unlink()
    shutil.move(step / "layout.json", tmp_path / "layout.json")
    run_cfg = convert.open_checkpoint(parallel_run[0]).run_config()
    msg = _refused(tmp_path, "truncated", step / "model_optim", run_cfg)
    assert shard.name in msg


def test_missing_shard_and_corrupt_metadata_are_refused(parallel_run, tmp_path):
    step = _copy_step(parallel_run, tmp_path)
    victim = sorted((step / "model_optim").glob("*.distcp"))[-1]
    victim.unlink()
    assert victim.name in _refused(tmp_path, "missing", step)
    (step / "manifest.json").unlink()
    shutil.move(step / "layout.json", tmp_path / "layout.json")      # the bare model_optim folder
    run_cfg = convert.open_checkpoint(parallel_run[0]).run_config()
    assert victim.name in _refused(tmp_path, "missing", step / "model_optim", run_cfg)   # DCP's piece table
    shutil.move(tmp_path / "layout.json", step / "layout.json")
    (step / "model_optim" / "metadata.json").write_text("{not json")
    _refused(tmp_path, "metadata.json' is missing or corrupt", step)


def test_wrong_vocab_and_deepspeed_are_refused(parallel_run, tmp_path):
    run, _ = parallel_run
    cfg = copy.deepcopy(convert.open_checkpoint(run).run_config())
    cfg.model.vocab_size = 200                                       # pads to 256, not the stored 384
    _refused(tmp_path, "use the run's own config", run, cfg)
    cfg.model.vocab_size = 258                                       # pads to 384 too: cuts a real row
    _refused(tmp_path, "non-zero rows past vocab_size 258", run, cfg)
    step = _copy_step(parallel_run, tmp_path)
    (step / "layout.json").write_text(json.dumps({"engine": "deepspeed", "format": "deepspeed"}))
    (step / "manifest.json").unlink()
    _refused(tmp_path, "DeepSpeed", step)


class _Payload:
    """Unpickling this creates the folder `path` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_object_in_common_pt_is_refused(parallel_run, tmp_path):
    from titans_scale.io.manifest import write_manifest
    step = _copy_step(parallel_run, tmp_path)
    torch.save({"trainer": _Payload(tmp_path / "ran")}, step / "model_optim" / "common.pt")
    write_manifest(step)                                             # checksums rewritten too
    dst = tmp_path / "out"
    with pytest.raises(convert.UnsafeCheckpointError, match="common.pt"):
        convert.write_consolidated(convert.open_checkpoint(step), dst)
    assert not (tmp_path / "ran").exists() and not dst.exists() and not leftovers(tmp_path)
