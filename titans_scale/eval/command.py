"""`titans-scale eval`: held-out loss and the recall suites of a trained run.

    titans-scale eval --run-dir runs/recall/lmm --suite niah --lengths 1024,32768,131072 \
        --depths 0,0.25,0.5,0.75,1 --samples 10

Per suite it writes <out>/<suite>.json (every length x depth cell, chance level, attention
reach, streaming cost) and <out>/<suite>.png (the heat map), and prints one JSON line with
the headline numbers (`niah_acc@N`: mean accuracy over the depths at length N).
Needle format defaults follow the run's training mixture (data.recall_*), so a model trained
on 2-digit pass keys is asked 2-digit pass keys unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from titans_scale.errors import ConfigError
from titans_scale.eval.spec import HAYSTACKS, NEEDLES, EvalSweepSpec

log = logging.getLogger("titans_scale.eval")

_DEFAULT_DIGITS = {"niah": 5, "recall": 4}      # the generator's own defaults


def add_eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--run-dir", required=True)
    e.add_argument("--suite", choices=["loss", "niah", "recall", "all"], default="all")
    e.add_argument("--lengths", default="512,1024", help="comma-separated token counts, e.g. 1024,32768,1048576")
    e.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (niah)")
    e.add_argument("--samples", type=int, default=20, help="samples per length x depth cell")
    e.add_argument("--batches", type=int, default=8, help="validation batches for the loss suite")
    e.add_argument("--seed", type=int, default=10_000)
    e.add_argument("--needle", choices=NEEDLES, default="passkey")
    e.add_argument("--haystack", choices=HAYSTACKS, default=None, help="default: the run's data.recall_haystack")
    e.add_argument("--digits", type=int, default=None, help="default: the run's data.recall_digits, else 5 (niah) / 4")
    e.add_argument("--pairs", type=int, default=0, help="MQAR key-value pairs; 0 = min(8, length // 96)")
    e.add_argument("--piece", type=int, default=2048, help="tokens fed to the model per call (memory bound)")
    e.add_argument("--out", default=None, help="folder for <suite>.json/.png (default: <run-dir>/eval)")
    e.add_argument("--no-plot", action="store_true", help="skip the heat-map PNGs")
    e.add_argument("overrides", nargs="*")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None


def suite_specs(cfg, args) -> list[EvalSweepSpec]:
    """The sweeps `args` asks for, with needle defaults taken from the run's training mixture."""
    from titans_scale.train.data import RecallMix

    mix = RecallMix.of(cfg)
    trained = {"needle": "niah", "mqar": "recall"}[mix.task] if mix.rows else None
    specs = []
    for suite in ("niah", "recall"):
        if args.suite not in (suite, "all"):
            continue
        digits = args.digits or (mix.digits if trained == suite and mix.digits else _DEFAULT_DIGITS[suite])
        specs.append(EvalSweepSpec(suite, _numbers(args.lengths, int, "--lengths"),
                               depths=_numbers(args.depths, float, "--depths"), samples=args.samples,
                               seed=args.seed, needle=args.needle, haystack=args.haystack or mix.haystack,
                               digits=digits, pairs=args.pairs, piece=args.piece).validate())
    return specs


def run_eval(cfg, model, args) -> dict:
    from titans_scale.train.hardware import configure_host

    configure_host(cfg.train)
    out: dict = {}
    if args.suite in ("loss", "all"):
        from titans_scale.train.data import RunData
        from titans_scale.train.evaluate import perplexity
        from titans_scale.train.evaluate import evaluate_loss

        loss = evaluate_loss(model, RunData(cfg).val_loader(args.batches), model.precision.autocast)
        out["val_loss"], out["val_ppl"] = loss, perplexity(loss)
    specs = suite_specs(cfg, args)
    if not specs:
        return out
    from titans_scale.data.tokenizer import load_tokenizer
    from titans_scale.eval.report import heatmap, write_json
    from titans_scale.eval.sweep import run_sweep

    tok = load_tokenizer(cfg.data.tokenizer)
    folder = Path(args.out or Path(args.run_dir) / "eval")
    name = Path(args.run_dir).name
    for spec in specs:
        result = run_sweep(model, tok, spec, log=lambda c, s=spec: log.info(
            "%s length %d depth %s: %.0f%% (%d samples, needle %d tokens back, memory |W| %.3g, %.1fs)", s.suite,
            c.length, c.depth, 100 * c.accuracy, c.samples, c.min_distance, c.memory_weight_norm, c.seconds))
        for n in spec.lengths:
            out[f"{spec.suite}_acc@{n}"] = result.accuracy_at(n)
        out[f"{spec.suite}_chance"] = result.chance
        out[f"{spec.suite}_beyond_acc"] = result.beyond_accuracy()
        out[f"{spec.suite}_json"] = str(write_json(result, folder / f"{spec.suite}.json", run=name,
                                                   layers=list(cfg.model.layers)))
        if not args.no_plot:
            out[f"{spec.suite}_png"] = str(heatmap(result, folder / f"{spec.suite}.png",
                                                   title=f"{name} ({'/'.join(cfg.model.layers)})"))
    return out


def cmd_eval(args) -> int:
    from titans_scale.train.load import load_trained

    cfg, model = load_trained(args.run_dir, args.overrides)
    print(json.dumps(run_eval(cfg, model, args)))
    return 0


__all__ = ["add_eval_arguments", "cmd_eval", "run_eval", "suite_specs"]
