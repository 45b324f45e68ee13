"""Interop with lucidrains' titans-pytorch (checked against its 0.5.5 source): the neural
memory layer only, and only where the two compute the same update.

What coincides (docs/convert.md has the full table). Their NeuralMemory with
    heads >= 2, dim_head * heads = dim, chunk_size = 1, batch_size = C,
    model = MemoryMLP(dim_head, depth=1), mem_model_norm_add_residual = False,
    pre_rmsnorm = False, post_rmsnorm = True, qk_rmsnorm = True (gamma = 1/sqrt(dim_head) - 1),
    activation = nn.SiLU(), momentum = True (order 1), every other option at its default
and our NeuralMemory with mem_depth = 1, chunk_size = C, conv_kernel = 1 (identity),
max_lr = their max_lr * 2 / dim_head (their loss is the mean, ours half the sum, of the
squared error), norm_eps = float32 eps, and one output gate per head:
  * the memory update is the same function: per-token gradients at the weights of the
    chunk start (their `batch_size` is our chunk), per-token momentum and forgetting;
  * reading a memory state is the same function (projections, norms, gate, W_O);
  * q/k normalisation: ours x/||x||, theirs RMSNorm(x)*(gamma+1) = x/sqrt(||x||^2 + d*eps)
    with eps = finfo(dtype).eps: equal up to that epsilon guard (relative d*eps/(2||x||^2)).
What does not: *when* a token reads. titans-pytorch pads the read one token, so token t reads
the weights after its own write (at chunk_size=1, y_t = M_t(q_t)); ours reads the chunk-start
weights (docs/design.md section 3: y_t = M_{c}(q_t), never its own write). No option of theirs changes
that, so no configuration gives the same layer outputs: a conversion therefore needs
accept_read_offset=True, and says what it maps. Their other options (chunk_size > 1: one
summed gradient per chunk, gates averaged per chunk; deep memories with/without their
ResidualNorm; pre-norms; lookahead values; ...) change the update itself and are refused,
naming the option. Their MemoryAsContextTransformer (hyper-connections, axial positions,
long-term memory tokens) has no counterpart in TitansLM: only the memory layer maps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from titans_scale.errors import IncompatibleError
from titans_scale.model import ModelConfig

TESTED_VERSION = "0.5.5"
EPS32 = torch.finfo(torch.float32).eps

READ_OFFSET = (
    "titans-pytorch reads the memory after each token's own write (y_t = M_t(q_t)); titans-scale reads "
    "the chunk-start weights (y_t = M_c(q_t), docs/design.md section 3). After conversion the memory update and the "
    "read of a given memory state are the same functions, but the layer outputs differ; pass "
    "accept_read_offset=True (--accept-read-offset) to convert the parameters anyway")


@dataclass
class TitansPytorchOptions:
    """The constructor arguments of titans_pytorch.NeuralMemory that change its maths, with its
    defaults. Callables are named: activation is the module's class name ("SiLU" or None),
    store_memory_loss_fn / adaptive_step_transform are "default" or "custom", model is
    {"type": "MemoryMLP", "depth": 1, ...} or None (= MemoryMLP(**default_model_kwargs))."""

    dim: int
    heads: int = 1
    dim_head: int | None = None
    chunk_size: int | list[int] = 1
    batch_size: int | None = None
    model: dict | None = None
    default_model_kwargs: dict = field(default_factory=lambda: {"depth": 2, "expansion_factor": 4.0})
    mem_model_norm_add_residual: bool = True
    per_head_learned_parameters: bool = True
    pre_rmsnorm: bool = True
    post_rmsnorm: bool = False
    qk_rmsnorm: bool = False
    activation: str | None = None
    momentum: bool = True
    momentum_order: int = 1
    learned_momentum_combine: bool = False
    per_parameter_lr_modulation: bool = False
    accept_weight_residual: bool = False
    attn_pool_chunks: bool = False
    max_grad_norm: float | None = None
    spectral_norm_surprises: bool = False
    gated_transition: bool = False
    num_kv_per_token: int = 1
    qkv_receives_diff_views: bool = False
    store_with_lookahead_value: bool = False
    store_memory_loss_fn: str = "default"
    adaptive_step_transform: str = "default"
    default_step_transform_max_lr: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.dim_head or self.dim

    @property
    def memory_model(self) -> dict:
        return self.model or {"type": "MemoryMLP", **self.default_model_kwargs}

    @classmethod
    def from_dict(cls, d: dict) -> "TitansPytorchOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise IncompatibleError(f"titans-pytorch option '{unknown[0]}' is not one this converter knows "
                                    f"(checked against titans-pytorch {TESTED_VERSION}); it may change the maths")
        return cls(**d)

    @classmethod
    def from_module(cls, mem) -> "TitansPytorchOptions":
        """Read the options back from a built titans_pytorch.NeuralMemory."""
        from torch import nn  # noqa: PLC0415
        mod = sys.modules[type(mem).__module__]
        to_q = mem.to_queries
        lin = to_q[0] if isinstance(to_q, nn.Sequential) else to_q
        act = type(to_q[1]).__name__ if isinstance(to_q, nn.Sequential) else None
        mm = mem.memory_model
        residual = type(mm).__name__ == "ResidualNorm"
        inner = mm.model if residual else mm
        model = {"type": type(inner).__name__}
        if model["type"] == "MemoryMLP":
            model["depth"] = len(inner.weights)
        step = mem.adaptive_step_transform
        default_step = isinstance(step, functools.partial) and step.func is mod.default_adaptive_step_transform
        return cls(
            dim=lin.in_features, heads=mem.heads, dim_head=lin.out_features // mem.heads,
            chunk_size=(mem.store_chunk_size if mem.retrieve_chunk_size == mem.store_chunk_size
                        else [mem.retrieve_chunk_size, mem.store_chunk_size]), batch_size=mem.batch_size,
            model=model, mem_model_norm_add_residual=residual,
            per_head_learned_parameters=mem.per_head_learned_parameters,
            pre_rmsnorm=not isinstance(mem.retrieve_norm, nn.Identity),
            post_rmsnorm=not isinstance(mem.multihead_rmsnorm, nn.Identity),
            qk_rmsnorm=not isinstance(mem.q_norm, nn.Identity), activation=act,
            momentum=mem.to_momentum is not None, momentum_order=mem.momentum_order,
            learned_momentum_combine=mem.to_learned_momentum_combine is not None,
            per_parameter_lr_modulation=mem.to_layer_modulation is not None,
            accept_weight_residual=mem.to_learned_weight_residual_mix is not None,
            attn_pool_chunks=type(mem.reduce_to_chunk_rep).__name__ == "AttentionPool",
            max_grad_norm=mem.max_grad_norm, spectral_norm_surprises=mem.spectral_norm_surprises,
            gated_transition=mem.transition_gate is not None, num_kv_per_token=mem.num_kv_per_token,
            qkv_receives_diff_views=mem.qkv_receives_diff_views,
            store_with_lookahead_value=mem.store_with_lookahead_value,
            store_memory_loss_fn="default" if mem.store_memory_loss_fn is mod.default_loss_fn else "custom",
            adaptive_step_transform="default" if default_step else "custom",
            default_step_transform_max_lr=float(step.keywords.get("max_lr", 1.0)) if default_step else 1.0,
        )

    def build(self):
        """Construct their NeuralMemory from these options (needs titans-pytorch installed)."""
        from torch import nn  # noqa: PLC0415
        from titans_pytorch import NeuralMemory  # noqa: PLC0415
        from titans_pytorch import memory_models  # noqa: PLC0415
        kw = dataclasses.asdict(self)
        spec = dict(self.memory_model)
        if any(kw[k] != "default" for k in ("store_memory_loss_fn", "adaptive_step_transform")):
            raise IncompatibleError("custom loss / step-transform callables cannot be rebuilt from options")
        kw.pop("store_memory_loss_fn"), kw.pop("adaptive_step_transform"), kw.pop("model")
        kw["model"] = getattr(memory_models, spec.pop("type"))(self.head_dim, **spec)
        kw["activation"] = getattr(nn, self.activation)() if self.activation else None
        kw["chunk_size"] = tuple(self.chunk_size) if isinstance(self.chunk_size, list) else self.chunk_size
        return NeuralMemory(**kw)


def load_into_module(mem, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict into their NeuralMemory. Its per-head initial weights are built as an
    expanded view (one storage for all heads), which load_state_dict cannot write into, so they
    get their own storage first."""
    for p in mem.memory_model_parameters:
        p.data = p.data.clone()
    mem.load_state_dict(state_dict, strict=True)


def problems(o: TitansPytorchOptions) -> list[str]:
    """Every option whose maths differs from ours, as 'option=value: why; fix'."""
    out: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            out.append(msg)

    cs = o.chunk_size if isinstance(o.chunk_size, list) else [o.chunk_size, o.chunk_size]
    need(cs == [1, 1], f"chunk_size={o.chunk_size}: titans-pytorch takes one summed gradient per chunk and "
         "averages the gates over it; ours takes per-token gradients and gates (chunk_size=1 with "
         "batch_size=C is our rule with chunk C)")
    need(isinstance(o.batch_size, int) and o.batch_size >= 1, f"batch_size={o.batch_size}: it sets where "
         "gradients are taken (our chunk_size); None takes all of them at the initial weights")
    need(o.heads >= 2, f"heads={o.heads}: with one head titans-pytorch has no output projection or gate")
    need(o.head_dim * o.heads == o.dim, f"dim_head={o.dim_head}: ours needs dim_head * heads == dim")
    mm = o.memory_model
    need(mm.get("type") == "MemoryMLP" and mm.get("depth") == 1,
         f"model={mm}: only a linear memory maps (MemoryMLP depth=1); their deeper MLP has no skip, "
         "ours is k + MLP(k)")
    need(not o.mem_model_norm_add_residual, "mem_model_norm_add_residual=True: LayerNorm(M(k)) + k is not our memory")
    need(not o.pre_rmsnorm, "pre_rmsnorm=True: ours has no norm inside the memory layer (the block norms first)")
    need(o.post_rmsnorm, "post_rmsnorm=False: ours RMS-normalises each head's retrieved value")
    need(o.qk_rmsnorm, "qk_rmsnorm=False: ours L2-normalises q and k")
    need(o.activation == "SiLU", f"activation={o.activation}: ours applies SiLU to q, k, v")
    need(o.momentum and o.momentum_order == 1 and not o.learned_momentum_combine,
         f"momentum={o.momentum}, momentum_order={o.momentum_order}, learned_momentum_combine="
         f"{o.learned_momentum_combine}: ours has one first-order momentum")
    for name in ("per_parameter_lr_modulation", "accept_weight_residual", "attn_pool_chunks",
                 "spectral_norm_surprises", "gated_transition", "qkv_receives_diff_views",
                 "store_with_lookahead_value"):
        need(not getattr(o, name), f"{name}=True: ours has no such term")
    need(o.max_grad_norm is None, f"max_grad_norm={o.max_grad_norm}: ours does not clamp surprise gradients")
    need(o.num_kv_per_token == 1, f"num_kv_per_token={o.num_kv_per_token}: ours stores one key/value per token")
    need(o.store_memory_loss_fn == "default", "store_memory_loss_fn is custom: ours is the squared error")
    need(o.adaptive_step_transform == "default", "adaptive_step_transform is custom: ours is max_lr * sigmoid")
    lr = o.default_step_transform_max_lr * 2 / o.head_dim
    need(0 < lr <= 1, f"default_step_transform_max_lr={o.default_step_transform_max_lr}: ours would need "
         f"max_lr={lr:g} (their max_lr * 2 / dim_head) in (0, 1]")
    return out


def _refuse(msgs: list[str], what: str) -> None:
    if msgs:
        more = f" (and {len(msgs) - 1} more: {'; '.join(m.split(':')[0] for m in msgs[1:])})" if len(msgs) > 1 else ""
        raise IncompatibleError(f"{what}: {msgs[0]}{more}")


def _get(sd: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in sd:
        raise IncompatibleError(f"titans-pytorch state dict lacks '{key}' (its options do not match the state dict)")
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        raise IncompatibleError(f"titans-pytorch '{key}' has shape {tuple(t.shape)}, the options imply {tuple(shape)}")
    return t


def import_memory(state_dict: dict[str, torch.Tensor], options: TitansPytorchOptions | dict, *,
                  accept_read_offset: bool = False, prefix: str = "") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """titans-pytorch NeuralMemory weights -> (ModelConfig, state dict of our NeuralMemory).
    prefix is put before our keys (e.g. "blocks.1.mixer.memory.")."""
    o = options if isinstance(options, TitansPytorchOptions) else TitansPytorchOptions.from_dict(options)
    _refuse(problems(o), "titans-pytorch option does not map")
    if not accept_read_offset:
        raise IncompatibleError(READ_OFFSET)
    D, H, d = o.dim, o.heads, o.head_dim
    used = {"memory_model.weights.0"}          # their template model: not used by their forward

    def get(key, shape):
        used.add(key)
        return _get(state_dict, key, shape).detach().to(torch.float32)

    wq, wk, wv = (get(f"{n}.0.weight", (H * d, D)) for n in ("to_queries", "to_keys", "to_values"))
    g = {}
    for n, name in (("theta", "to_adaptive_step"), ("eta", "to_momentum"), ("alpha", "to_decay_factor")):
        g[n] = (get(f"{name}.0.weight", (H, D)), get(f"{name}.0.bias", (H,)))
    w0 = get("memory_model_parameters.0", (H, d, d) if o.per_head_learned_parameters else (d, d))
    scale = 1 / math.sqrt(d) - 1
    for n in ("q_norm.gamma", "k_norm.gamma"):
        if not torch.allclose(get(n, (H, 1, d)), torch.full((H, 1, d), scale), rtol=0, atol=1e-6):
            raise IncompatibleError(f"titans-pytorch '{n}' is not 1/sqrt(dim_head) - 1 everywhere: learned q/k "
                                    "scales have no counterpart (ours L2-normalises q and k without a scale)")
    post = get("multihead_rmsnorm.gamma", (H, 1, d))
    if not bool((post == post[:1]).all()):
        raise IncompatibleError("titans-pytorch 'multihead_rmsnorm.gamma' differs between heads; ours shares "
                                "one output-norm weight across heads")
    gate = get("retrieve_gate.0.weight", (H, D))
    out_w = get("combine_heads.weight", (D, H * d))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise IncompatibleError(f"titans-pytorch state dict has '{extra[0]}', which these options do not "
                                "create: the options do not describe this state dict")
    stack3 = lambda a, b, c: torch.stack([a, b, c], dim=1)  # noqa: E731  -> head-major [H, 3, ...]
    ours = {
        "qkv.weight": stack3(wq.view(H, d, D), wk.view(H, d, D), wv.view(H, d, D)).reshape(3 * H * d, D),
        "conv.weight": torch.ones(3 * H * d, 1),
        "conv.bias": torch.zeros(3 * H * d),
        "gates.weight": stack3(g["theta"][0], g["eta"][0], g["alpha"][0]).reshape(3 * H, D),
        "gates.bias": stack3(g["theta"][1], g["eta"][1], g["alpha"][1]).reshape(3 * H),
        "init_weights.0": (w0 if w0.dim() == 3 else w0.expand(H, d, d)).clone(),
        "out_norm.weight": post[0, 0] + 1.0,
        "out_gate.weight": gate.repeat_interleave(d, dim=0),
        "out.weight": out_w,
    }
    cfg = ModelConfig(d_model=D, n_heads=H if (D // H) % 2 == 0 else 1, layers=["lmm"], mem_heads=H, mem_depth=1,
                      chunk_size=o.batch_size, segment_len=o.batch_size, max_lr=o.default_step_transform_max_lr * 2 / d,
                      conv_kernel=1, norm_eps=EPS32, mem_norm=False)
    return cfg, {prefix + k: v.contiguous() for k, v in ours.items()}


def export_memory(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, accept_read_offset: bool = False,
                  prefix: str = "") -> tuple[TitansPytorchOptions, dict[str, torch.Tensor]]:
    """Our NeuralMemory weights (keys after `prefix`) -> (titans-pytorch options, their state dict)."""
    D, H, d = cfg.d_model, cfg.resolved_mem_heads, cfg.mem_head_dim
    sd = {k[len(prefix):]: v.detach().to(torch.float32) for k, v in state_dict.items() if k.startswith(prefix)}
    msgs = []
    if cfg.mem_depth != 1:
        msgs.append(f"mem_depth={cfg.mem_depth}: our deep memory is k + MLP(k); titans-pytorch's MemoryMLP has "
                    "no skip and its ResidualNorm adds a LayerNorm (only a linear memory maps)")
    if cfg.mem_norm:
        msgs.append("mem_norm=true: the mapped memory is titans-pytorch's plain linear one (set model.mem_norm=false)")
    if H < 2:
        msgs.append(f"mem_heads={H}: titans-pytorch with one head has no output projection or gate")
    if cfg.norm_eps != EPS32:
        msgs.append(f"norm_eps={cfg.norm_eps}: titans-pytorch's RMSNorm uses float32 eps={EPS32:.9g}")
    lr = cfg.max_lr * d / 2
    if msgs:
        _refuse(msgs, "titans-scale option does not map")
    conv_w, conv_b = sd["conv.weight"], sd["conv.bias"]
    identity = torch.zeros_like(conv_w)
    identity[:, -1] = 1
    if not (torch.equal(conv_w, identity) and bool((conv_b == 0).all())):
        raise IncompatibleError("titans-scale memory conv is not the identity (last tap 1, others and bias 0): "
                                "titans-pytorch has no causal conv on q, k, v")
    gate = sd["out_gate.weight"].view(H, d, D)
    if not bool((gate == gate[:, :1]).all()):
        raise IncompatibleError("titans-scale out_gate has a different gate per channel; titans-pytorch gates each "
                                "head with one scalar (retrieve_gate)")
    if not accept_read_offset:
        raise IncompatibleError(READ_OFFSET)
    qkv = sd["qkv.weight"].view(H, 3, d, D)
    gw, gb = sd["gates.weight"].view(H, 3, D), sd["gates.bias"].view(H, 3)
    w0 = sd["init_weights.0"]
    scale = torch.full((H, 1, d), 1 / math.sqrt(d) - 1)
    theirs = {
        "multihead_rmsnorm.gamma": (sd["out_norm.weight"] - 1.0).expand(H, 1, d).clone(),
        "q_norm.gamma": scale.clone(), "k_norm.gamma": scale.clone(),
        "combine_heads.weight": sd["out.weight"],
        "retrieve_gate.0.weight": gate[:, 0].clone(),
        "memory_model.weights.0": w0[0].clone(),
        "memory_model_parameters.0": w0.clone(),
        "to_queries.0.weight": qkv[:, 0].reshape(H * d, D), "to_keys.0.weight": qkv[:, 1].reshape(H * d, D),
        "to_values.0.weight": qkv[:, 2].reshape(H * d, D),
    }
    for i, name in enumerate(("to_adaptive_step", "to_momentum", "to_decay_factor")):
        theirs[f"{name}.0.weight"], theirs[f"{name}.0.bias"] = gw[:, i].clone(), gb[:, i].clone()
    opts = TitansPytorchOptions(
        dim=D, heads=H, dim_head=d, chunk_size=1, batch_size=cfg.chunk_size, model={"type": "MemoryMLP", "depth": 1},
        mem_model_norm_add_residual=False, pre_rmsnorm=False, post_rmsnorm=True, qk_rmsnorm=True,
        activation="SiLU", default_step_transform_max_lr=lr)
    return opts, {k: v.contiguous() for k, v in theirs.items()}


def options_json(o: TitansPytorchOptions) -> dict[str, Any]:
    return dataclasses.asdict(o)


__all__ = ["TitansPytorchOptions", "problems", "load_into_module", "import_memory", "export_memory", "READ_OFFSET",
           "TESTED_VERSION"]
