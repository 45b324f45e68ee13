"""The one command line: `titans-scale <command> ...`.

  train     --config configs/tiny.toml [key=value ...] [--fresh]
  eval      --run-dir runs/tiny [--suite loss|niah|recall|all] [--lengths 512,1024]
  generate  --run-dir runs/tiny --prompt "def " [--max-new-tokens 200]
  prepare   --source my.jsonl --out data_cache/mine [--tokenizer tokenizer.json]

Overrides are `section.field=value` (e.g. train.steps=50 model.layers='["mac","mac"]').
Errors a user can cause print one line naming the field and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from titans_scale.config import load_run_config
    from titans_scale.train.trainer import Trainer

    cfg = load_run_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=not args.fresh)
    last = trainer.run()
    print(json.dumps({"step": trainer.step, **{k: round(v, 5) for k, v in last.items()}}))
    return 0


def load_trained(run_dir: str, overrides=()):
    """The model of a run folder: its saved config and the newest checkpoint's weights."""
    from titans_scale.config import load_run_config
    from titans_scale.errors import CheckpointError
    from titans_scale.model import TitansLM
    from titans_scale.precision.apply import Precision
    from titans_scale.train.checkpoint import CheckpointManager

    cfg_path = Path(run_dir) / "config.toml"
    if not cfg_path.is_file():
        raise CheckpointError(f"--run-dir '{run_dir}' has no config.toml: is it a training run folder?")
    cfg = load_run_config(str(cfg_path), overrides)
    model = TitansLM(cfg.model)
    model.precision = Precision(model, cfg)          # FP8 layers (and their scales) before loading
    ckpt = CheckpointManager(run_dir)
    folder = ckpt.latest()
    if folder is None:
        raise CheckpointError(f"--run-dir '{run_dir}' has no checkpoint yet; train first")
    ckpt.load_model(folder, model)
    return cfg, model.eval()


def _cmd_eval(args) -> int:
    from titans_scale.data.tokenizer import load_tokenizer
    from titans_scale.train.data import RunData
    from titans_scale.train.evaluate import perplexity, recall_accuracy
    from titans_scale.train.trainer import evaluate_loss

    cfg, model = load_trained(args.run_dir, args.overrides)
    out: dict = {}
    if args.suite in ("loss", "all"):
        loss = evaluate_loss(model, RunData(cfg).val_loader(args.batches), model.precision.autocast)
        out["val_loss"], out["val_ppl"] = loss, perplexity(loss)
    tok = load_tokenizer(cfg.data.tokenizer)
    lengths = [int(x) for x in args.lengths.split(",")]
    for suite, task in (("niah", "needle"), ("recall", "mqar")):
        if args.suite in (suite, "all"):
            for n in lengths:
                kw = {"num_pairs": max(1, min(8, n // 96))} if task == "mqar" else {}   # pairs that fit
                r = recall_accuracy(model, tok, task, n, args.samples, seed=args.seed, **kw)
                out[f"{suite}_acc@{n}"] = r.accuracy
    print(json.dumps(out))
    return 0


def _cmd_generate(args) -> int:
    import torch

    from titans_scale.data.tokenizer import load_tokenizer
    from titans_scale.train.generate import generate

    cfg, model = load_trained(args.run_dir, args.overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    prompt = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    ids, _ = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, seed=args.seed)
    print(args.prompt + tok.decode(ids[0].tolist()))
    return 0


def _cmd_prepare(args) -> int:
    from titans_scale.data.shards import prepare_corpus
    from titans_scale.data.tokenizer import load_tokenizer
    from titans_scale.train.data import sources_of

    idx = prepare_corpus(args.out, load_tokenizer(args.tokenizer), sources_of(args.source),
                         max_bytes=args.max_bytes, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "train_tokens": idx.num_tokens("train"), "val_tokens": idx.num_tokens("val")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titans-scale", description="Train Titans models at scale.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config")
    t.add_argument("--config", required=True)
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints (default: resume)")
    t.add_argument("--resume", action="store_true", help="resume from the newest checkpoint (the default)")
    t.add_argument("overrides", nargs="*", help="section.field=value")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="held-out loss/perplexity and recall accuracy of a trained run")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--suite", choices=["loss", "niah", "recall", "all"], default="all")
    e.add_argument("--lengths", default="512,1024")
    e.add_argument("--samples", type=int, default=20)
    e.add_argument("--batches", type=int, default=8)
    e.add_argument("--seed", type=int, default=10_000)
    e.add_argument("overrides", nargs="*")
    e.set_defaults(fn=_cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt with a trained run")
    g.add_argument("--run-dir", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("overrides", nargs="*")
    g.set_defaults(fn=_cmd_generate)

    r = sub.add_parser("prepare", help="tokenize .txt/.jsonl files into shards")
    r.add_argument("--source", required=True, help="'embedded' or comma-separated .txt/.jsonl files/folders")
    r.add_argument("--out", required=True)
    r.add_argument("--tokenizer", default="byte")
    r.add_argument("--max-bytes", type=int, default=8_000_000)
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(fn=_cmd_prepare)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    from titans_scale.errors import TitansError
    try:
        return args.fn(args)
    except (TitansError, ValueError, FileNotFoundError) as e:
        print(f"titans-scale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"titans-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
