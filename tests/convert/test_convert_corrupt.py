"""Truncated, corrupt or partial inputs: one clear line naming the shard or tensor at fault,
and nothing written at the destination (not even a temporary folder)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch.distributed.checkpoint as dcp

from tests.helpers import leftovers, make_run
from titans_scale import convert

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt_src")
    run, cfg, model, _ = make_run(root, step=1, layers=["mag", "lmm"])
    c = convert.write_consolidated(convert.open_checkpoint(run), root / "c")
    blocked = convert.write_training_checkpoint(convert.open_checkpoint(c), root / "blocked", block_bytes=4096)
    return root, run, cfg, model, c, blocked


def _refused(tmp_path, match, fn, *args, **kw):
    dst = tmp_path / "out" / "dst"
    with pytest.raises(convert.ConvertError, match=match) as e:
        fn(*args, dst, **kw)
    assert "\n" not in str(e.value)
    assert not dst.exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)
    return str(e.value)


def _consolidate(path, dst, run_config=None):
    return convert.write_consolidated(convert.open_checkpoint(path, run_config), dst)


def _to_training(path, dst):
    return convert.write_training_checkpoint(convert.open_checkpoint(path), dst)


def test_truncated_shard_of_a_training_checkpoint(src, tmp_path):
    root, run, *_ = src
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    shard = next((bad / "checkpoints" / "step_00000001" / "model_optim").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    msg = _refused(tmp_path, "truncated", _consolidate, bad)
    assert shard.name in msg


def test_missing_and_truncated_shards_of_a_bare_dcp_folder(src, tmp_path):
    root, run, cfg, _, _, blocked = src
    bare = tmp_path / "bare"
    shutil.copytree(blocked / "model_optim", bare)           # many shard files, no manifest
    victim = sorted(bare.glob("*.distcp"))[3]
    victim.unlink()
    msg = _refused(tmp_path, "missing", _consolidate, bare, run_config=cfg)
    assert victim.name in msg
    shutil.rmtree(bare)
    shutil.copytree(blocked / "model_optim", bare)
    victim = sorted(bare.glob("*.distcp"))[-1]
    with open(victim, "r+b") as f:
        f.truncate(10)
    msg = _refused(tmp_path, "truncated", _consolidate, bare, run_config=cfg)
    assert victim.name in msg


def test_missing_tensor_is_named(src, tmp_path):
    root, run, cfg, model, *_ = src
    sd = {k: v for k, v in model.state_dict().items() if k != "blocks.1.mixer.memory.gates.bias"}
    dcp.save({"model": sd}, checkpoint_id=str(tmp_path / "partial"))
    _refused(tmp_path, r"lacks tensor 'model\.blocks\.1\.mixer\.memory\.gates\.bias'", _consolidate,
             tmp_path / "partial", run_config=cfg)


def test_corrupt_consolidated_inputs(src, tmp_path):
    root, run, cfg, model, c, _ = src
    bad = tmp_path / "c"
    # a flipped byte inside one tensor: named by the checksum check, nothing written
    shutil.copytree(c, bad)
    meta = json.loads((bad / "config.json").read_text())
    entry = meta["tensors"]["model.blocks.0.mixer.memory.qkv.weight"]
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = int.from_bytes(data[:8], "little")
    from safetensors import safe_open
    with safe_open(f, "pt") as st:                               # where that tensor's bytes are
        assert st.get_tensor(entry["name"]).shape == tuple(entry["shape"])
    offset = 8 + header + json.loads(data[8:8 + header])[entry["name"]]["data_offsets"][0]
    data[offset + 5] ^= 0xFF
    f.write_bytes(bytes(data))
    _refused(tmp_path, "qkv.weight.*checksum", _consolidate, bad)
    _refused(tmp_path, "checksum", _to_training, bad)
    # a truncated file: named before anything is read
    shutil.rmtree(bad)
    shutil.copytree(c, bad)
    with open(bad / "optimizer.safetensors", "r+b") as fh:
        fh.truncate(1000)
    _refused(tmp_path, "optimizer.safetensors.*truncated", _to_training, bad)
    # a table that lists a tensor the file does not hold
    shutil.rmtree(bad)
    shutil.copytree(c, bad)
    meta["tensors"]["model.extra.weight"] = dict(entry, name="extra.weight")
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(convert.ConvertError, match="no tensor 'extra.weight'"):
        convert.open_checkpoint(bad)
    # garbage config.json
    (bad / "config.json").write_text("{not json")
    with pytest.raises(convert.ConvertError, match="corrupt"):
        convert.ConsolidatedReader(bad)


def test_wrong_run_config_is_named(src, tmp_path):
    root, run, cfg, *_ = src
    other = type(cfg)(model=type(cfg.model)(**{**cfg.model.__dict__, "d_model": 64}))
    with pytest.raises(convert.ConvertError, match="shape"):
        convert.open_checkpoint(run / "checkpoints" / "step_00000001", other)
