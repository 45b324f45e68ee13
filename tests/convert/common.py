"""Shared builders for the conversion tests: a tiny model with every memory mixer, and a
training checkpoint written by the trainer's own CheckpointManager."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from titans_scale.config import RunConfig
from titans_scale.config_io import dump_toml
from titans_scale.model import ModelConfig, TitansLM
from titans_scale.train.checkpoint import CheckpointManager
from titans_scale.train.optim import build_optimizer, build_scheduler



def tiny_model_config(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=2, layers=["mac", "mag", "lmm"], mem_expansion=2,
                chunk_size=4, window=8, segment_len=8, n_persistent=2, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def make_run(root: Path, step: int = 2, seed: int = 0, **model_kw):
    """A run folder <root>/run with config.toml and one checkpoint after `step` optimizer steps."""
    torch.manual_seed(seed)
    cfg = RunConfig(model=tiny_model_config(**model_kw))
    cfg.train.run_dir = str(root / "run")
    model = TitansLM(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 100)
    for _ in range(step):
        logits, _ = model(torch.randint(0, cfg.model.vocab_size, (2, 12)))
        logits.float().logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(dump_toml(cfg))
    CheckpointManager(run).save(step, model, opt, {"step": step, "scheduler": sched.state_dict(),
                                                   "rng_cpu": torch.get_rng_state()})
    return run, cfg, model.eval(), opt


def fixed_batch(cfg: ModelConfig, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, 21), generator=g)


def logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


def file_sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed conversion must not leave behind."""
    return sorted(p.name for p in Path(parent).iterdir() if ".convert-" in p.name)
