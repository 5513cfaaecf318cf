"""CISPO trainer throughput on CPU: one training step split into rollout (generation + rewards) and update
(π_old forward + μ optimizer steps) time, tokens/s of each, and the first step (compiles). Prints a markdown table.

    python benchmarks/train_step.py [--steps 10] [--warmup 2] [--configs reverse3-tiny,small-32tok]

Rollout tokens/s counts generated response tokens; update tokens/s counts every real (prompt + response) token
passed through the trainer per epoch (the π_old forward and each minibatch's forward+backward see each token).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m1jax.train.cispo_trainer import CISPOTrainer  # noqa: E402
from m1jax.train.run_config import load_run_config  # noqa: E402

from benchmarks.common import machine, table  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train",
                       "cispo_reverse3.yaml")

CONFIGS = {
    # The end-to-end example as is: 16 prompts × G=8, 6 new tokens, μ=4.
    "reverse3-tiny": [],
    # A larger model (d=128, 4 layers L S L S, 8 experts, vocab 512) generating 32 tokens: 8 prompts × G=8, μ=2.
    "small-32tok": ["model.config.hidden_size=128", "model.config.intermediate_size=256",
                    "model.config.num_hidden_layers=4", "model.config.attn_type_list=[0,1,0,1]",
                    "model.config.num_local_experts=8", "model.config.vocab_size=512",
                    "model.config.head_dim=32", "model.config.rotary_dim=32",
                    "model.config.max_position_embeddings=128",
                    "rollout.max_new_tokens=32", "rollout.num_prompts=8", "cispo.num_minibatches=2"],
}


def bench(name: str, overrides: list[str], steps: int, warmup: int) -> list:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(EXAMPLE, "cispo", overrides + [f"output_dir={out}", f"steps={steps + warmup}",
                                                             "log.progress=false", "checkpoint.every=100000"])
        trainer = CISPOTrainer(cfg)
        t0 = time.perf_counter()
        history = trainer.run(resume=False)
        total = time.perf_counter() - t0
        trainer.close()
        bare = bare_generation_time(trainer, cfg, repeat=3)
    timed = history[warmup:]
    med = {k: statistics.median(m[k] for m in timed) for k in ("time_rollout_s", "time_update_s", "time_step_s",
                                                                 "rollout_tokens_per_s", "update_tokens_per_s",
                                                                 "tokens_per_s", "response_tokens")}
    n_params = sum(x.size for x in __import__("jax").tree.leaves(trainer.params))
    r = cfg.rollout
    rows = r.num_prompts * r.group_size
    share = med["time_rollout_s"] / med["time_step_s"]
    return [name, f"{n_params / 1e6:.2f}M", f"{rows}×{r.max_new_tokens}", cfg.cispo.num_minibatches,
            med["response_tokens"], med["time_rollout_s"], med["time_update_s"], f"{100 * share:.0f}%",
            med["rollout_tokens_per_s"], med["update_tokens_per_s"], med["tokens_per_s"], bare,
            f"{med['time_rollout_s'] / bare:.2f}x", history[0]["time_step_s"], total]


def bare_generation_time(trainer, cfg, repeat: int) -> float:
    """Median seconds of the engine alone generating one step's rollout batch (compiled already)."""
    from m1jax.train.rollout import sample_groups
    from m1jax.train.update import compute_model

    from m1jax.generation import Engine

    prompts = [p.ids for p in trainer.data.next_batch(cfg.rollout.num_prompts)]
    engine = Engine(compute_model(trainer.model.graphdef, trainer.params, trainer.model.param_dtypes),
                    trainer.tokenizer, prefill_chunk=cfg.rollout.prefill_chunk)
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        sample_groups(engine, prompts, cfg.rollout.group_size, trainer.sampling, run_seed=cfg.seed, step=10**6 + i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    rows = [bench(name, CONFIGS[name], args.steps, args.warmup) for name in args.configs.split(",")]
    print(f"CISPO trainer step, {machine()}; median of {args.steps} steps after {args.warmup} warm-up steps\n")
    print(table(["config", "params", "rows × max new", "μ", "response tok/step", "rollout s/step", "update s/step",
                 "rollout share", "rollout tok/s", "update tok/s", "step tok/s", "bare engine s (baseline)",
                 "rollout / bare", "first step s (compile)", "total s"], rows))


if __name__ == "__main__":
    main()
