"""The `m1jax` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def cmd_demo(args) -> int:
    """Build a model from a preset with random weights, run it on a few tokens, print logits and expert load."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    config = ModelConfig.from_preset(args.preset)
    model = MiniMaxM1(config, rngs=nnx.Rngs(args.seed))
    tokens = jnp.asarray(np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq)))
    out = nnx.jit(lambda m, t: m(t, return_routing=True))(model, tokens)
    print(f"model {args.preset}: {config.param_counts()['total']:,} parameters, layers "
          f"{''.join('L' if t == 'linear_attention' else 'S' for t in config.layer_types)} "
          f"(L = lightning, S = softmax), backend {jax.default_backend()}")
    print(f"logits shape {tuple(out.logits.shape)} dtype {out.logits.dtype}")
    print("per-layer expert load (share of routed tokens per expert):")
    for i, stats in enumerate(out.routing):
        load = np.asarray(stats["tokens_per_expert"]) / float(np.sum(stats["tokens_per_expert"]))
        print(f"  layer {i} [{config.layer_types[i][:6]}] " + " ".join(f"{x:5.3f}" for x in load)
              + f"   aux loss {float(stats['aux_loss']):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m1jax", description="MiniMax-M1 in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a preset model with random weights (logits shape, expert load)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from m1jax.config import ConfigError

    try:
        return args.func(args)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"m1jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
