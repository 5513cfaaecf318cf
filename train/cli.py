"""`m1jax train cispo|sft --config FILE`: argparse wiring, registered into `m1jax.cli.build_parser()`."""

from __future__ import annotations

import argparse
import sys


def cmd_train(args) -> int:
    """Load and validate the run config, build the trainer, train (resuming from its checkpoints); with
    `--coordinator`, as one process of a multi-process job (`m1jax.train.distributed`)."""
    from m1jax.train.run_config import load_run_config

    if args.coordinator:
        from m1jax.train.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id)

    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.steps:
        overrides.append(f"steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_run_config(args.config, args.algorithm, overrides)
    if args.algorithm == "cispo":
        from m1jax.train.cispo_trainer import CISPOTrainer as Trainer
    else:
        from m1jax.train.sft_trainer import SFTTrainer as Trainer
    trainer = Trainer(cfg)
    if args.validate_only:
        print(f"{args.config}: valid {args.algorithm} run config", file=sys.stderr)
        return 0
    try:
        history = trainer.run(resume=not args.no_resume)
    finally:
        trainer.close()
    if history:
        last = history[-1]
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("reward_mean", "exact_match", "nll", "loss") if k in last)
        print(f"m1jax train {args.algorithm}: finished step {last['step']} ({summary}); metrics in "
              f"{cfg.output_dir}/metrics.jsonl", file=sys.stderr)
    return 0


def add_subcommands(subparsers) -> None:
    """Register `train` with sub-subcommands `cispo` and `sft` on the top-level `m1jax` parser."""
    train = subparsers.add_parser("train", help="train a model: CISPO reinforcement learning or next-token SFT")
    algos = train.add_subparsers(dest="algorithm", required=True)
    helps = {"cispo": "CISPO RL (MiniMax-M1): rollouts with the engine, group advantages, clipped-IS updates",
             "sft": "next-token training on a JSONL of token-id lists or texts"}
    for name in ("cispo", "sft"):
        p = algos.add_parser(name, help=helps[name], formatter_class=argparse.RawDescriptionHelpFormatter,
                             description=helps[name] + ". Run-config schema: see train/run_config.py.")
        p.add_argument("--config", required=True, help="run config (YAML or JSON)")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override a run-config field, e.g. --set optimizer.lr=1e-4 (repeatable)")
        p.add_argument("--output-dir", help="override output_dir")
        p.add_argument("--steps", type=int, help="override steps")
        p.add_argument("--seed", type=int, help="override seed")
        p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints (start from step 0)")
        p.add_argument("--validate-only", action="store_true", help="validate the config, build the model, exit")
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="multi-process run: address of process 0's coordinator (start the same command on every "
                            "process, each with its --process-id)")
        p.add_argument("--num-processes", type=int, default=1, help="multi-process run: number of processes")
        p.add_argument("--process-id", type=int, default=0, help="multi-process run: this process's index")
        p.set_defaults(func=cmd_train)
