"""titans-pytorch interop (checked against its 0.5.5 source), memory layer only.

For the one family of options whose update rule is ours (chunk_size=1, batch_size=C, linear
memory, ...), after conversion in either direction:
  * the memory update is the same function: its state after a sequence (chunk-start weights,
    running weights, momentum; mid-chunk too) equals ours to 1e-5;
  * reading memory is the same function: their own read (`retrieve_memories`) given, for each
    token, the weights our rule reads (the chunk start) reproduces our layer output to 1e-5;
  * their forward differs from ours, by when a token reads (after its own write): the
    converter refuses unless told accept_read_offset, and the test pins that difference.
Non-matching options are refused with a message naming the option.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

titans_pytorch = pytest.importorskip("titans_pytorch", reason="titans-pytorch is not installed (pip install "
                                     "titans-pytorch torch==2.13.0)")

from tests.helpers import make_run  # noqa: E402
from titans_scale.cli import main as cli_main  # noqa: E402
from titans_scale.convert import IncompatibleError  # noqa: E402
from titans_scale.convert.titans_pytorch import (  # noqa: E402
    TitansPytorchOptions, export_memory, import_memory, load_into_module, problems)
from titans_scale.model import ModelConfig  # noqa: E402
from titans_scale.model.memory import NeuralMemory  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

D, H, C, L, B = 32, 4, 4, 11, 2                    # L = 2 full chunks + 3 tokens: ends mid-chunk
d = D // H
TOL = dict(rtol=1e-5, atol=1e-5)


def matching_options(**kw) -> TitansPytorchOptions:
    base = dict(dim=D, heads=H, dim_head=d, chunk_size=1, batch_size=C, model={"type": "MemoryMLP", "depth": 1},
                mem_model_norm_add_residual=False, pre_rmsnorm=False, post_rmsnorm=True, qk_rmsnorm=True,
                activation="SiLU", default_step_transform_max_lr=2.0)
    return TitansPytorchOptions(**{**base, **kw})


def random_theirs(seed: int):
    torch.manual_seed(seed)
    mem = matching_options().build()
    with torch.no_grad():
        for name, p in mem.named_parameters():
            if name in ("q_norm.gamma", "k_norm.gamma"):
                p.fill_(d ** -0.5 - 1)                       # the scale that makes RMSNorm an L2 norm
            elif name == "multihead_rmsnorm.gamma":
                p.data = (0.2 * torch.randn(1, 1, d)).expand(H, 1, d).clone()
            else:
                p.data = 0.3 * torch.randn(p.shape)
    return mem


def random_ours(seed: int) -> tuple[ModelConfig, NeuralMemory]:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=D, n_heads=H, layers=["lmm"], mem_heads=H, mem_depth=1, chunk_size=C, segment_len=C,
                      max_lr=0.5, conv_kernel=1, norm_eps=torch.finfo(torch.float32).eps, mem_norm=False)
    mem = NeuralMemory(cfg)
    with torch.no_grad():
        for p in mem.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
        mem.conv.weight.fill_(1.0)
        mem.conv.bias.zero_()
        mem.out_gate.weight.copy_(torch.randn(H, 1, D).expand(H, d, D).reshape(H * d, D))   # one gate per head
        mem.out_norm.weight.add_(1.0)
    return cfg, mem


def compare(theirs, ours: NeuralMemory, seed: int) -> None:
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))
    y_theirs, st = theirs(x)
    with torch.no_grad():
        y_ours, so = ours(x)
    ours_state = so.memory
    view = lambda t: t.reshape(B, H, d, d)  # noqa: E731
    torch.testing.assert_close(view(st.weights["weights.0"]), ours_state.chunk_start[0], **TOL)
    torch.testing.assert_close(view(st.states[0]["weights.0"]), ours_state.weights[0], **TOL)
    torch.testing.assert_close(view(st.states[1]["weights.0"]), ours_state.momentum[0], **TOL)
    # their read, fed the weights our rule reads for each token (the chunk start W_{C*floor(t/C)});
    # their updates[i] are the weights after token i-1 (updates[0] = W^0), and their read is padded by one
    updates = st.updates["weights.0"]
    index = torch.tensor([0] + [(t // C) * C for t in range(L)])
    torch.testing.assert_close(theirs.retrieve_memories(x, {"weights.0": updates[:, index]}), y_ours, **TOL)
    # and what their forward reads instead: token t sees its own write, so outputs differ
    assert (y_theirs - y_ours).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_import_their_memory(seed):
    theirs = random_theirs(seed)
    opts = TitansPytorchOptions.from_module(theirs)
    assert opts == matching_options() and problems(opts) == []
    with pytest.raises(IncompatibleError, match="after each token's own write"):
        import_memory(theirs.state_dict(), opts)
    cfg, sd = import_memory(theirs.state_dict(), opts, accept_read_offset=True)
    ours = NeuralMemory(cfg)
    ours.load_state_dict(sd)
    compare(theirs, ours, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_export_our_memory(seed):
    cfg, ours = random_ours(seed)
    opts, sd = export_memory(cfg, ours.state_dict(), accept_read_offset=True)
    assert opts.default_step_transform_max_lr == pytest.approx(cfg.max_lr * d / 2)
    theirs = opts.build()
    load_into_module(theirs, sd)
    compare(theirs, ours, seed)
    cfg2, sd2 = import_memory(theirs.state_dict(), TitansPytorchOptions.from_module(theirs), accept_read_offset=True)
    assert all(torch.equal(sd2[k], v) for k, v in ours.state_dict().items())      # lossless both ways
    assert dataclasses.asdict(cfg2) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("change, named", [
    (dict(chunk_size=4), "chunk_size=4.*summed gradient"),
    (dict(batch_size=None), "batch_size=None"),
    (dict(model={"type": "MemoryMLP", "depth": 2, "expansion_factor": 2.0}), "model=.*linear memory"),
    (dict(mem_model_norm_add_residual=True), "mem_model_norm_add_residual"),
    (dict(pre_rmsnorm=True), "pre_rmsnorm"),
    (dict(qk_rmsnorm=False), "qk_rmsnorm"),
    (dict(activation=None), "activation=None"),
    (dict(momentum_order=2), "momentum_order=2"),
    (dict(store_with_lookahead_value=True), "store_with_lookahead_value"),
    (dict(default_step_transform_max_lr=100.0), "default_step_transform_max_lr"),
])
def test_non_matching_their_options_are_refused(change, named):
    theirs = random_theirs(0)
    with pytest.raises(IncompatibleError, match=named) as e:
        import_memory(theirs.state_dict(), matching_options(**change), accept_read_offset=True)
    assert "\n" not in str(e.value)


def test_their_defaults_are_refused_naming_each_difference():
    msgs = problems(TitansPytorchOptions(dim=D, heads=H, dim_head=d))
    assert [m.split("=")[0] for m in msgs] == ["batch_size", "model", "mem_model_norm_add_residual",
                                               "pre_rmsnorm", "post_rmsnorm", "qk_rmsnorm", "activation"]


def test_non_matching_ours_is_refused():
    cfg, ours = random_ours(0)
    deep = dataclasses.replace(cfg, mem_depth=2)
    with pytest.raises(IncompatibleError, match="mem_depth=2"):
        export_memory(deep, NeuralMemory(deep).state_dict(), accept_read_offset=True)
    sd = ours.state_dict()
    sd["out_gate.weight"] = torch.randn_like(sd["out_gate.weight"])
    with pytest.raises(IncompatibleError, match="out_gate"):
        export_memory(cfg, sd, accept_read_offset=True)
    four = dataclasses.replace(cfg, conv_kernel=4)
    with pytest.raises(IncompatibleError, match="conv is not the identity"):
        export_memory(four, NeuralMemory(four).state_dict(), accept_read_offset=True)


def test_cli_import_and_export(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    theirs = random_theirs(3)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "theirs.safetensors"))
    (tmp_path / "opts.json").write_text(json.dumps(dataclasses.asdict(TitansPytorchOptions.from_module(theirs))))
    args = ["convert", str(tmp_path / "theirs.safetensors"), str(tmp_path / "ours"), "--from", "titans-pytorch",
            "--options", str(tmp_path / "opts.json")]
    assert cli_main(args) == 2
    assert "accept-read-offset" in capsys.readouterr().err
    assert cli_main(args + ["--accept-read-offset"]) == 0
    meta = json.loads((tmp_path / "ours" / "config.json").read_text())
    ours = NeuralMemory(ModelConfig(**meta["model"]))
    ours.load_state_dict(load_file(tmp_path / "ours" / "memory.safetensors"))
    compare(theirs, ours, 3)
    # a pickled payload in their .pt file is refused
    torch.save({"x": torch.nn.Linear(2, 2)}, tmp_path / "evil.pt")
    assert cli_main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "o2"), "--from", "titans-pytorch",
                     "--options", str(tmp_path / "opts.json"), "--accept-read-offset"]) == 2
    assert "pickled object" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_cli_export_refuses_a_trained_models_memory(tmp_path, capsys):
    run, *_ = make_run(tmp_path, step=1, layers=["lmm"], mem_depth=1)
    assert cli_main(["convert", str(run), str(tmp_path / "t"), "--to", "titans-pytorch",
                     "--layer", "blocks.0.mixer.memory", "--accept-read-offset"]) == 2
    err = capsys.readouterr().err
    assert "norm_eps" in err and not (tmp_path / "t").exists()
