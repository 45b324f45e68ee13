"""train.init_from: a fresh run starts from another run's model weights; shapes that do not fit
are refused in one line; a run with checkpoints of its own resumes from those."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import losses, micro_config, torchrun_train, write_config
from titans_scale.config import load_run_config
from titans_scale.errors import CheckpointError
from titans_scale.train.load import load_trained
from titans_scale.train.trainer import Trainer


def _toml(tmp, name, **sections):
    return str(write_config(tmp / f"{name}.toml", micro_config(tmp / "shards", tmp / name, **sections)))


def _cfg(tmp, name, **sections):
    return load_run_config(_toml(tmp, name, **sections))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init_from")
    Trainer(_cfg(tmp, "src", train={"steps": 3, "ckpt_every": 3, "eval_every": 3})).run()
    return tmp


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_fresh_run_starts_from_the_source_weights_on_other_rows(source):
    _, trained = load_trained(str(source / "src"))
    cfg = _cfg(source, "longer", data={"seq_len": 2 * _cfg(source, "src").data.seq_len},
               train={"steps": 1, "init_from": str(source / "src")})
    got = _weights(Trainer(cfg).engine.model)
    want = _weights(trained)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # without it, the same seed gives other weights: the copy above is what made them equal
    plain = _weights(Trainer(_cfg(source, "plain", train={"steps": 1})).engine.model)
    assert any(not torch.equal(plain[k], want[k]) for k in want)


def test_a_model_of_other_sizes_is_refused_in_one_line(source):
    d = _cfg(source, "src").model.d_model
    cfg = _cfg(source, "wide", model={"d_model": 2 * d}, train={"init_from": str(source / "src")})
    with pytest.raises(CheckpointError, match=r"holds 'embed.weight' as .*differs in model.d_model"):
        Trainer(cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(_cfg(source, "none", train={"init_from": str(source / "nowhere")}))


def test_a_run_with_its_own_checkpoints_resumes_from_them(source):
    own = _cfg(source, "own", train={"steps": 2, "ckpt_every": 2, "eval_every": 2, "init_from": str(source / "src")})
    Trainer(own).run()
    _, saved = load_trained(str(source / "own"))
    again = Trainer(own, resume=True)
    assert again.step == 2
    got = _weights(again.engine.model)
    for k, v in _weights(saved).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_a_tensor_parallel_run_starts_from_the_source_weights(source):
    """Under torchrun the runtime shards the loaded model: a TP=2 run's first loss (on the weights
    it starts from) equals the one-process init_from run's, and differs from a fresh start's."""
    one_step = {"steps": 1, "ckpt_every": 100, "eval_every": 100, "init_from": str(source / "src")}
    Trainer(_cfg(source, "tp_local", train=one_step)).run()
    Trainer(_cfg(source, "tp_fresh", train={**one_step, "init_from": None})).run()
    torchrun_train(_toml(source, "tp2", train=one_step, parallel={"tp": 2}), nproc=2)
    local, fresh, tp2 = (losses(source / n)[1] for n in ("tp_local", "tp_fresh", "tp2"))
    assert abs(tp2 - local) <= 1e-5 * local, (tp2, local)
    assert abs(fresh - local) > 1e-3 * local, (fresh, local)
