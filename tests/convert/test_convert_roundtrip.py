"""Training checkpoint <-> consolidated <-> training checkpoint: bitwise round trips, the same
logits from every converted checkpoint, the trainer's own loaders accept the result, and DCP
checkpoints written by several ranks consolidate to the full tensors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import file_sha, fixed_batch, logits_of, make_run, tiny_model_config, write_micro
from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale import convert
from titans_scale.cli import main as cli_main
from titans_scale.model import TitansLM
from titans_scale.train.checkpoint import CheckpointManager
from titans_scale.train.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    run, cfg, model, opt = make_run(root)
    return root, run, cfg, model, opt


def test_training_checkpoint_to_consolidated(source, tmp_path):
    _, run, cfg, model, _ = source
    out = convert.write_consolidated(convert.open_checkpoint(run), tmp_path / "c")
    weights = load_file(out / "model.safetensors")             # safetensors' own reader
    assert set(weights) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == convert.FORMAT and meta["format_version"] == convert.FORMAT_VERSION
    assert meta["kind"] == "training" and meta["step"] == 2
    assert meta["model"]["layers"] == cfg.model.layers and meta["model"]["chunk_size"] == cfg.model.chunk_size
    assert meta["run_config"]["optim"]["lr"] == cfg.optim.lr
    e = meta["tensors"]["model.embed.weight"]
    assert e["shape"] == list(model.embed.weight.shape) and e["dtype"] == "F32"
    assert e["sha256"] == hashlib.sha256(model.embed.weight.detach().numpy().tobytes()).hexdigest()
    optim = load_file(out / "optimizer.safetensors")
    assert any(k.endswith(".exp_avg_sq") for k in optim)
    assert meta["optimizer_values"]["optim.param_groups.0.betas"] == {"__tuple__": [0.9, 0.95]}
    assert torch.allclose(logits_of(convert.load_model(out), fixed_batch(cfg.model)),
                          logits_of(model, fixed_batch(cfg.model)), rtol=0, atol=1e-6)


def test_consolidated_training_consolidated_is_bitwise_and_logits_match(source, tmp_path):
    _, run, cfg, model, opt = source
    c1 = convert.write_consolidated(convert.open_checkpoint(run), tmp_path / "c1")
    run2 = tmp_path / "run2"
    ckpt = convert.write_training_checkpoint(convert.open_checkpoint(c1), run2, block_bytes=16384)
    assert len(list((ckpt / "model_optim").glob("*.distcp"))) > 3       # blocked: several files
    c2 = convert.write_consolidated(convert.open_checkpoint(run2), tmp_path / "c2")
    for f in ("model.safetensors", "optimizer.safetensors", "trainer.pt"):
        assert file_sha(c1 / f) == file_sha(c2 / f), f
    t1, t2 = (json.loads((c / "config.json").read_text()) for c in (c1, c2))
    assert t1["tensors"] == t2["tensors"] and t1["optimizer_values"] == t2["optimizer_values"]

    ref = logits_of(model, fixed_batch(cfg.model))
    for src in (c1, run2):                        # c2 is byte-identical to c1
        assert torch.allclose(logits_of(convert.load_model(src), fixed_batch(cfg.model)), ref, rtol=0, atol=1e-6), src
    # the trainer's own loaders: weights for eval/generate, and the full resume path
    m2 = TitansLM(cfg.model)
    CheckpointManager(run2).load_model(CheckpointManager(run2).latest(), m2)
    assert torch.allclose(logits_of(m2.eval(), fixed_batch(cfg.model)), ref, rtol=0, atol=1e-6)
    m3 = TitansLM(cfg.model)
    opt3 = build_optimizer(m3, cfg.optim)
    state = CheckpointManager(run2).load(ckpt, m3, opt3)
    assert state["step"] == 2
    for (a, b) in zip(opt.state_dict()["state"].values(), opt3.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    m4 = TitansLM(cfg.model)                      # control: the original checkpoint through the same loader
    opt4 = build_optimizer(m4, cfg.optim)
    CheckpointManager(run).load(CheckpointManager(run).latest(), m4, opt4)
    assert opt3.state_dict()["param_groups"] == opt4.state_dict()["param_groups"]


def test_weights_only_and_bf16_inference_export(source, tmp_path):
    _, run, cfg, model, _ = source
    w = convert.write_consolidated(convert.open_checkpoint(run), tmp_path / "w", kind="weights")
    assert not (w / "optimizer.safetensors").exists() and not (w / "trainer.pt").exists()
    inf = convert.export_inference(convert.open_checkpoint(run), tmp_path / "inf", dtype="bf16")
    meta = json.loads((inf / "config.json").read_text())
    assert meta["kind"] == "inference" and meta["run_config"] is None
    assert {e["dtype"] for e in meta["tensors"].values()} == {"BF16"}
    rounded = TitansLM(cfg.model)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.allclose(logits_of(convert.load_model(inf), fixed_batch(cfg.model)),
                          logits_of(rounded.eval(), fixed_batch(cfg.model)), rtol=0, atol=1e-6)
    # a weights-only source becomes a checkpoint eval can read (no optimizer to resume)
    run3 = tmp_path / "run3"
    ck = convert.write_training_checkpoint(convert.open_checkpoint(w), run3)
    m = TitansLM(cfg.model)
    CheckpointManager(run3).load_model(ck, m)
    assert torch.equal(m.embed.weight, model.embed.weight)


def test_cli_convert_round_trip_and_one_line_errors(source, tmp_path, capsys):
    _, run, cfg, model, _ = source
    assert cli_main(["convert", str(run), str(tmp_path / "c")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["to"] == "consolidated"
    assert cli_main(["convert", str(tmp_path / "c"), str(tmp_path / "r")]) == 0      # default: -> training
    assert (tmp_path / "r" / "checkpoints" / "latest").is_file()
    assert cli_main(["convert", str(run), str(tmp_path / "i"), "--to", "inference", "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert cli_main(["convert", str(run), str(tmp_path / "c")]) == 2                 # exists
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert cli_main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _save_sharded(path: str, full: dict) -> None:
    """Runs on 2 gloo ranks: every tensor is a DTensor sharded on dim 0, saved by both ranks."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
    dcp.save({"model": sd}, checkpoint_id=path)


def test_dcp_written_by_two_ranks_consolidates_to_full_tensors(source, tmp_path):
    from titans_scale.parallel.launch_utils import run_distributed

    _, run, cfg, model, _ = source
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_distributed(_save_sharded, 2, str(tmp_path / "dcp"), full)
    assert len(list((tmp_path / "dcp").glob("*.distcp"))) == 2
    reader = convert.open_checkpoint(tmp_path / "dcp", cfg)
    md = reader.metadata.state_dict_metadata["model.embed.weight"]
    assert len(md.chunks) == 2                                            # really sharded
    out = convert.write_consolidated(reader, tmp_path / "c")
    weights = load_file(out / "model.safetensors")
    for k, v in full.items():
        assert torch.equal(weights[k], v), k


def test_trainer_resumes_a_converted_run(tmp_path):
    """The real trainer: a run converted to consolidated and back resumes with the same step,
    weights, optimizer, scheduler, data position and RNG as the original run."""
    from titans_scale.config import load_run_config
    from titans_scale.train.trainer import Trainer

    cfg = load_run_config(str(write_micro(tmp_path, tmp_path / "shards")), ["model.layers=[\"mag\"]"])
    first = Trainer(cfg)
    first.step = 5
    first.data.train.consumed = 40
    first.save()
    convert.write_consolidated(convert.open_checkpoint(tmp_path / "run"), tmp_path / "c")
    convert.write_training_checkpoint(convert.open_checkpoint(tmp_path / "c"), tmp_path / "run2")
    resumed, rng = [], []
    for r in (tmp_path / "run", tmp_path / "run2"):
        torch.manual_seed(99)                                  # resume must restore the saved RNG
        resumed.append(Trainer(load_run_config(str(r / "config.toml")), resume=True))
        rng.append(torch.get_rng_state())
    a, b = resumed
    assert a.step == b.step == 5 and a.data.state_dict() == b.data.state_dict()
    assert b.run_dir == tmp_path / "run2"
    assert a.engine.scheduler.state_dict() == b.engine.scheduler.state_dict()
    assert torch.equal(rng[0], rng[1])
    for (ka, va), (kb, vb) in zip(a.engine.model.state_dict().items(), b.engine.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a.engine.optimizer.state_dict(), b.engine.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pa, pb in zip(sa["state"].values(), sb["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_fp8_run_converts_to_weights_and_resumes_with_fresh_scales(tmp_path):
    """An FP8-trained checkpoint holds each FP8 layer's amax history and scales: conversion
    keeps the weights only, and a model with FP8 layers loads the result (fresh scales)."""
    from titans_scale.precision.fp8_emulation import FP8_META_BUFFERS, convert_linears_to_fp8
    from titans_scale.precision.recipe import Fp8Recipe

    torch.manual_seed(0)
    cfg = RunConfig(model=tiny_model_config())
    cfg.train.run_dir = str(tmp_path / "run")
    model = TitansLM(cfg.model)
    assert convert_linears_to_fp8(model, Fp8Recipe(), lambda name, _: name.endswith("ffn.w_up"))
    fp8_keys = [k for k in model.state_dict() if k.endswith(FP8_META_BUFFERS)]
    assert fp8_keys
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(cfg))
    opt = build_optimizer(model, cfg.optim)
    CheckpointManager(run).save(1, model, opt, {"step": 1})
    out = convert.write_consolidated(convert.open_checkpoint(run), tmp_path / "c")
    weights = load_file(out / "model.safetensors")
    assert not any(k.endswith(FP8_META_BUFFERS) for k in weights)
    assert set(weights) == {k for k in model.state_dict() if k not in fp8_keys}
    batch = fixed_batch(cfg.model)
    # outside fp8_autocast an FP8 layer is its plain linear: the same function as the converted model
    assert torch.allclose(logits_of(convert.load_model(out), batch), logits_of(model.eval(), batch), rtol=0, atol=1e-6)
    again = TitansLM(cfg.model)
    convert_linears_to_fp8(again, Fp8Recipe(), lambda name, _: name.endswith("ffn.w_up"))
    again.load_state_dict(weights)                       # fresh scales, the trained weights
    assert torch.equal(again.blocks["0"].ffn.w_up.weight, model.blocks["0"].ffn.w_up.weight)
