"""The one command line: `titans-scale <command> ...`.

  train     --config configs/tiny.toml [key=value ...] [--fresh]
  eval      --run-dir runs/tiny [--suite loss|niah|recall|all] [--lengths 512,1024] [--depths 0,0.5,1]
  generate  --run-dir runs/tiny --prompt "def " [--max-new-tokens 200]
  prepare   --source my.jsonl --out data_cache/mine [--tokenizer tokenizer.json] [--format indexed]
  convert   SRC DST --to consolidated|training|inference|titans-pytorch|hf (docs/convert.md)
  launch    --config X [--nnodes 2 --nproc-per-node 8 --rdzv-endpoint host:port] [--dry-run]
  slurm submit --config X --nodes 4 --gpus-per-node 8 [--partition p --time 04:00:00] [--dry-run]
  sweep     plan|run|collect|fit|plot|all --spec sweeps/cpu.toml (docs/sweeps.md)

Overrides are `section.field=value` (e.g. train.steps=50 model.layers='["mac","mac"]').
Errors a user can cause print one line naming the field and the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from titans_scale.errors import ConfigError, TitansError


def _distributed_launch(cfg) -> bool:
    """torchrun sets WORLD_SIZE; a config asking for a parallel layout goes the same way (and is
    refused with one line if the world size does not fit it)."""
    from titans_scale.parallel.layout import world_size_from_env

    p = cfg.parallel
    return world_size_from_env() > 1 or p.tp > 1 or p.pp > 1 or p.cp > 1


def _cmd_train(args) -> int:
    from titans_scale.config import load_run_config
    from titans_scale.train.allocator import ensure_allocator

    cfg = load_run_config(args.config, args.overrides)
    # CPU: re-run this command once on tcmalloc (train.allocator); only a command-line run can be re-run
    ensure_allocator(cfg.train.allocator, sys.argv[1:] if args.from_command_line else None)
    layout = None
    if _distributed_launch(cfg):        # torchrun (WORLD_SIZE > 1) or a parallel layout
        from titans_scale.parallel.layout import plan_layout, world_size_from_env
        layout = plan_layout(cfg, world_size_from_env())   # refuse before importing megatron
    from titans_scale.train.trainer import Trainer
    trainer = Trainer(cfg, resume=not args.fresh, layout=layout)
    try:
        last = trainer.run()
    finally:
        trainer.close()
    if trainer.engine.is_writer:
        print(json.dumps({"step": trainer.step, **{k: round(v, 5) for k, v in last.items()}}))
    if last.get("preempted"):       # checkpointed on SIGUSR1/SIGTERM: rank 0 requeues our Slurm job
        from titans_scale.launcher.requeue import requeue_after_preemption
        return requeue_after_preemption()
    return 0


def _cmd_eval(args) -> int:
    from titans_scale.eval.command import cmd_eval       # suites, sweeps, JSON + heat maps
    return cmd_eval(args)


def _cmd_generate(args) -> int:
    import torch

    from titans_scale.data.tokenizer import load_tokenizer
    from titans_scale.train.generate import generate
    from titans_scale.train.load import load_trained

    if not args.prompt:
        raise ConfigError("--prompt is empty: give at least one character to continue")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
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
                         max_bytes=args.max_bytes, overwrite=args.overwrite, layout=args.format,
                         text_column=args.text_column, progress=os.environ.get("TITANS_NO_PROGRESS") != "1")
    splits = idx.splits.values()
    n_bytes = sum((idx.directory / f).stat().st_size for s in splits for f in s.files)
    print(json.dumps({"out": args.out, "format": idx.layout, "train_tokens": idx.num_tokens("train"),
                      "val_tokens": idx.num_tokens("val"), "documents": sum(s.documents for s in splits),
                      "tokens": sum(s.num_tokens for s in splits), "bytes": n_bytes}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titans-scale", description="Train Titans models at scale.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML config")
    t.add_argument("--config", required=True)
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints (default: resume)")
    t.add_argument("overrides", nargs="*", help="section.field=value")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="held-out loss/perplexity and recall accuracy of a trained run")
    from titans_scale.eval.command import add_eval_arguments
    add_eval_arguments(e)           # --suite --lengths --depths --samples ... (titans_scale/eval/command.py)
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

    r = sub.add_parser("prepare", help="tokenize text (.txt/.jsonl, parquet, saved Hugging Face datasets) into shards")
    r.add_argument("--source", required=True, help="'embedded' or comma-separated .txt/.jsonl/.parquet files, "
                   "folders of them, or saved Hugging Face dataset folders")
    r.add_argument("--out", required=True)
    r.add_argument("--tokenizer", default="byte")
    r.add_argument("--max-bytes", type=int, default=8_000_000)
    r.add_argument("--overwrite", action="store_true")
    from titans_scale.data.shards import LAYOUTS
    r.add_argument("--format", choices=LAYOUTS, default="shards",
                   help="indexed: each split as a Megatron-LM .bin/.idx dataset (docs/data.md)")
    r.add_argument("--text-column", default="text", help="the text column of parquet / Hugging Face sources")
    r.set_defaults(fn=_cmd_prepare)

    from titans_scale.convert.cli import add_convert_parser
    add_convert_parser(sub)         # convert (titans_scale/convert/cli.py)

    from titans_scale.launcher.commands import add_launch_commands
    add_launch_commands(sub)        # launch, slurm submit (titans_scale/launcher/commands.py)

    from titans_scale.sweep.cli import add_sweep_parser
    add_sweep_parser(sub)           # sweep plan|run|collect|fit|plot|all (titans_scale/sweep/cli.py)

    from titans_scale.kernels_cli import add_kernels_parser
    add_kernels_parser(sub)         # kernels --arch sm_90 (kernels_cli.py)
    return p


def main(argv=None) -> int:
    """Run one command. A user error (TitansError, or a bad argument, which argparse reports
    with the usage) is one line and exit status 2; anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.from_command_line = argv is None       # sys.argv: the process's own command, which can be re-run
    try:
        return args.fn(args)
    except TitansError as e:
        print(f"titans-scale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"titans-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
