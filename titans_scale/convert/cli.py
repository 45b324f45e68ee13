"""`titans-scale convert`: the command line over titans_scale.convert.

  convert SRC DST --to consolidated [--weights-only]   training ckpt/run/DCP -> model.safetensors + config.json
  convert SRC DST --to training [--config run.toml]     any checkpoint -> run folder (train resumes, eval reads)
  convert SRC DST --to inference [--dtype bf16]         weights only, optionally cast
  convert SRC DST --to titans-pytorch --layer blocks.1.mixer.memory --accept-read-offset
  convert SRC DST --from titans-pytorch --options kwargs.json --accept-read-offset
  convert SRC DST --to hf [--tokenizer tokenizer.json]  a Hugging Face folder (transformers loads it)
  convert HF_DIR DST --from hf [--to consolidated]     a --to hf folder back (default: a training run folder)

SRC may be a run folder (its newest checkpoint), a step_N folder, a DCP folder, a
consolidated folder, or the parallel trainer's megatron TP x PP checkpoint (run folder, step_N
or model_optim/; weights only). DST must not exist (or pass --overwrite, which replaces only an earlier
conversion's output), must not overlap SRC, and appears only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = ("consolidated", "training", "inference", "titans-pytorch", "hf")
LAYER_FORMAT = "titans-scale-memory-layer"


def add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert checkpoints: consolidated safetensors, training, inference, "
                                       "titans-pytorch, Hugging Face")
    c.add_argument("src", help="run folder, step_N folder, DCP folder, consolidated folder, a parallel "
                               "(megatron TP x PP) run/step folder, or (--from titans-pytorch) a state dict "
                               "file/folder")
    c.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    c.add_argument("--to", choices=TARGETS, help="output format (default: consolidated, or training from a "
                                                 "consolidated source)")
    c.add_argument("--from", dest="from_", choices=("titans-pytorch", "hf"),
                   help="read a titans-pytorch NeuralMemory, or a Hugging Face folder written by --to hf")
    c.add_argument("--weights-only", action="store_true", help="consolidated: drop optimizer and trainer state")
    c.add_argument("--dtype", choices=("fp32", "bf16"), help="inference: cast float weights")
    c.add_argument("--config", help="run config TOML when the source carries none")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--block-mb", type=int, default=8, help="training: DCP block and file size in MiB (bounds memory)")
    c.add_argument("--layer", help="titans-pytorch export: our memory layer's prefix, e.g. blocks.1.mixer.memory")
    c.add_argument("--options", help="titans-pytorch import: JSON of its NeuralMemory options")
    c.add_argument("--tokenizer", help="hf: the tokenizer to save beside the model, 'byte' or a tokenizer.json "
                                       "(default: the run config's data.tokenizer)")
    c.add_argument("--accept-read-offset", action="store_true",
                   help="titans-pytorch: convert although it reads memory after each token's own write")
    c.set_defaults(fn=run_convert)


def run_convert(args) -> int:
    from titans_scale import convert  # noqa: PLC0415
    from titans_scale.convert.atomic import check_not_overlapping  # noqa: PLC0415

    check_not_overlapping(args.src, args.dst)
    if args.block_mb < 1:
        raise convert.ConvertError(f"--block-mb must be >= 1, got {args.block_mb}")
    run = None
    if args.config:
        from titans_scale.config import load_run_config  # noqa: PLC0415
        run = load_run_config(args.config)
    if args.from_ == "titans-pytorch":
        out = _import_titans_pytorch(args)
        print(json.dumps({"out": str(out), "format": LAYER_FORMAT}))
        return 0
    if args.from_ == "hf":
        from titans_scale.convert.hf import HfReader  # noqa: PLC0415
        reader = HfReader(args.src)
    else:
        reader = convert.open_checkpoint(args.src, run)
    to = args.to or ("training" if reader.layout in ("consolidated", "hf") else "consolidated")
    if to == "consolidated":
        out = convert.write_consolidated(reader, args.dst, kind="weights" if args.weights_only else None,
                                         overwrite=args.overwrite)
    elif to == "training":
        out = convert.write_training_checkpoint(reader, args.dst, run_config=run, overwrite=args.overwrite,
                                                block_bytes=args.block_mb << 20)
    elif to == "inference":
        out = convert.export_inference(reader, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    elif to == "hf":
        from titans_scale.convert.hf import export_hf  # noqa: PLC0415
        out = export_hf(reader, args.dst, tokenizer=args.tokenizer, overwrite=args.overwrite)
    else:
        out = _export_titans_pytorch(reader, args)
    print(json.dumps({"out": str(out), "to": to, "from": reader.describe()}))
    return 0


def _export_titans_pytorch(reader, args) -> Path:
    from titans_scale.convert import ConvertError  # noqa: PLC0415
    from titans_scale.convert.atomic import staged_output  # noqa: PLC0415
    from titans_scale.convert.titans_pytorch import export_memory, options_json  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    if not args.layer:
        raise ConvertError("--to titans-pytorch needs --layer, the prefix of one memory layer "
                           "(e.g. blocks.1.mixer.memory): titans-pytorch has no counterpart of the whole model")
    prefix = "model." + args.layer.rstrip(".") + "."
    keys = [i.name for i in reader.model_tensors() if i.name.startswith(prefix)]
    if not keys:
        raise ConvertError(f"--layer {args.layer}: no tensors under it in {reader.describe()}")
    opts, sd = export_memory(reader.model_config(), {k: reader.read(k) for k in keys},
                             accept_read_offset=args.accept_read_offset, prefix=prefix)
    with staged_output(args.dst, args.overwrite, src=args.src) as tmp:
        save_file(sd, str(tmp / "state_dict.safetensors"))
        (tmp / "options.json").write_text(json.dumps(options_json(opts), indent=1))
    return Path(args.dst)


def _import_titans_pytorch(args) -> Path:
    import dataclasses  # noqa: PLC0415

    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from titans_scale.convert import ConvertError, safe_torch_load  # noqa: PLC0415
    from titans_scale.convert.atomic import staged_output  # noqa: PLC0415
    from titans_scale.convert.titans_pytorch import TitansPytorchOptions, import_memory  # noqa: PLC0415

    src = Path(args.src)
    opt_path = Path(args.options) if args.options else src / "options.json"
    if src.is_dir():
        src = src / "state_dict.safetensors"
    if not opt_path.is_file():
        raise ConvertError(f"--from titans-pytorch needs its NeuralMemory options: pass --options kwargs.json "
                           f"('{opt_path}' not found)")
    try:
        options = TitansPytorchOptions.from_dict(json.loads(opt_path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConvertError(f"'{opt_path}': bad titans-pytorch options ({e})") from None
    if src.suffix == ".safetensors":
        try:
            sd = load_file(str(src))
        except Exception as e:
            raise ConvertError(f"'{src}' is not a readable safetensors file ({e})") from None
    else:
        sd = safe_torch_load(src)
    if not isinstance(sd, dict):
        raise ConvertError(f"'{src}' holds a {type(sd).__name__}, not a state dict")
    cfg, ours = import_memory(sd, options, accept_read_offset=args.accept_read_offset)
    with staged_output(args.dst, args.overwrite, src=args.src) as tmp:
        save_file(ours, str(tmp / "memory.safetensors"))
        (tmp / "config.json").write_text(json.dumps({
            "format": LAYER_FORMAT, "format_version": 1, "model": dataclasses.asdict(cfg),
            "module": "titans_scale.model.memory.NeuralMemory", "source": "titans-pytorch"}, indent=1))
    return Path(args.dst)


__all__ = ["add_convert_parser", "run_convert"]

