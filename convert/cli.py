"""The `m1jax convert` and `m1jax export` subcommands (registered into m1jax's parser by `add_subcommands`)."""

from __future__ import annotations

import argparse
import os

from m1jax.config import QUANTIZE_MODES


def cmd_convert(args) -> int:
    """HF checkpoint directory → m1jax checkpoint (orbax parameters + config + tokenizer files)."""
    from m1jax.convert.hf_to_m1jax import BLOCK_BYTES, convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, dtype=args.dtype, workers=args.workers, progress=not args.quiet,
                             block_bytes=args.block_bytes or BLOCK_BYTES, quantize=args.quantize)
    if not args.quiet:
        print(f"m1jax checkpoint written to {dst}")
    return 0


def cmd_export(args) -> int:
    """m1jax checkpoint or training run (its latest checkpoint) → HF safetensors in the original M1 layout."""
    from m1jax.convert.m1jax_to_hf import export_checkpoint, export_model
    from m1jax.train.checkpointing import is_train_checkpoint_dir

    if is_train_checkpoint_dir(args.src):
        from m1jax.train.model_setup import build_model
        from m1jax.train.run_config import ModelSpec, RunConfigError

        from m1jax.errors import UserError

        if args.tokenizer is None:
            raise UserError(f"{args.src} is a training run, which holds no tokenizer: pass --tokenizer DIR (the run "
                            f"config's `tokenizer`)")
        try:
            bundle = build_model(ModelSpec(checkpoint=str(args.src)), seed=0)
        except RunConfigError as e:
            raise UserError(f"cannot read the training run {args.src}: {e}") from None
        model = bundle.inference_model(bundle.params)  # LoRA adapters merged into their weights
        if model.config.lora_rank:
            raise UserError(f"{args.src} trained adapters over int8 experts, which cannot hold the merged weights: "
                            f"export from a run whose base has float experts")
        dst = export_model(model, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                           tokenizer_dir=args.tokenizer, progress=not args.quiet)
    else:
        dst = export_checkpoint(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                                progress=not args.quiet, tokenizer_dir=args.tokenizer)
    if not args.quiet:
        print(f"HF checkpoint written to {dst}")
    return 0


def add_subcommands(subparsers) -> None:
    """Register `convert` and `export` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "convert", help="HF safetensors checkpoint → m1jax (orbax) checkpoint, streaming and resumable",
        description="Convert an HF MiniMax checkpoint (original or transformers-native layout) into an m1jax "
                    "checkpoint: orbax parameters, config.json and tokenizer files. Everything is validated "
                    "before anything is written; an interrupted run resumes when rerun with the same arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", help="output directory (absent, empty, or an interrupted conversion to resume)")
    p.add_argument("--dtype", default=None, help="cast the weights to this storage dtype (default: keep each "
                   "tensor's stored dtype, a lossless conversion; router gates stay float32)")
    p.add_argument("--quantize", choices=[m for m in QUANTIZE_MODES if m],
                   help="store the routed experts' weights int8 with per-output-channel fp32 scales")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel reader/writer threads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--block-bytes", type=int, default=None, help=argparse.SUPPRESS)  # tests: many small commits
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "export", help="m1jax checkpoint → HF safetensors (original MiniMax-M1 layout)",
        description="Export a converted m1jax checkpoint (or a training run) as an HF checkpoint in the original "
                    "MiniMax-M1 layout (block_sparse_moe.experts.E.w1/w2/w3, fp32 router gates), loadable by "
                    "transformers (the layout vLLM also reads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="m1jax checkpoint directory written by `m1jax convert`, or a training run "
                   "(`output_dir` of `m1jax train`: its latest checkpoint; needs --tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory to copy (default: the m1jax checkpoint's own files)")
    p.add_argument("dst", help="output directory (absent or empty)")
    p.add_argument("--dtype", default=None, help="cast the weights to this dtype (default: keep each parameter's "
                   "dtype, int8 experts dequantized to the checkpoint's dtype; router gates stay float32)")
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_export)
