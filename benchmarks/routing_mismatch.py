"""Train/infer mismatch of the CISPO trainer: rollout-engine log-probs vs the trainer's, with the fp32 LM head or a
bf16 one, with and without routing replay (the M1 report: 0.987 → 0.997 probability correlation with an fp32 head).

1. Pretrain: the reverse-3 example (`configs/train/cispo_reverse3.yaml`, fp32) for `--pretrain-steps` CISPO steps.
2. Measure: the same policy (those parameters) in bf16 compute (fp32 masters cast to bf16), `--steps` trainer steps
   with a negligible learning rate, for each of: head fp32 | bf16 × replay off | on. Each step samples fresh
   rollouts with the engine and the trainer logs the mismatch meter (`m1jax.train.logprobs.probability_agreement`)
   between the engine's log-probs and π_old (the trainer's forward at the same parameters): correlation of p and
   of log p, mean |Δ log p| over response tokens and the mean over sequences of its per-sequence max.
   The bf16 head (for this measurement only; the model's head is always fp32) replaces `lm_head_logits` by a
   product with bf16 operands in both the engine and the trainer.

    PYTHONPATH=. python benchmarks/routing_mismatch.py [--pretrain-steps 150] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from m1jax.train.cispo_trainer import CISPOTrainer
from m1jax.train.run_config import load_run_config

from benchmarks.common import machine, table
from m1jax.model import MiniMaxM1
from m1jax.modules.unfused import linear

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cispo_reverse3.yaml"
METRICS = ("sampler_trainer_corr", "logp_corr", "logp_abs_diff_mean", "logp_abs_diff_max")


def run_config(out: Path, name: str, *, steps: int, dtype: str, replay: bool, lr: float | None = None):
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(steps=steps, output_dir=str(out / name))
    data["model"]["dtype"] = dtype
    data["cispo"]["routing_replay"] = replay
    data["log"] = {"progress": False}
    data["checkpoint"] = {"every": 10_000, "keep": 1}
    if lr is not None:
        data["optimizer"].update(lr=lr, warmup_steps=0)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_run_config(path, "cispo")


@contextlib.contextmanager
def bf16_head():
    """`MiniMaxM1.lm_head_logits` with bf16 operands (fp32 output) for the duration."""
    original = MiniMaxM1.lm_head_logits

    def head(self, h_BxLxD, *args):
        w = self.lm_head[...] if not args else args[0]
        return linear(h_BxLxD.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32)

    MiniMaxM1.lm_head_logits = head
    try:
        yield
    finally:
        MiniMaxM1.lm_head_logits = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pre = CISPOTrainer(run_config(out, "pretrain", steps=args.pretrain_steps, dtype="float32", replay=False))
        history = pre.run()
        params = pre.params
        pre.close()
        reward = float(np.mean([m["reward_mean"] for m in history[-10:]]))
        rows = []
        for head in ("fp32", "bf16"):
            for replay in (False, True):
                cfg = run_config(out, f"{head}-{replay}", steps=args.steps, dtype="bfloat16", replay=replay, lr=1e-12)
                jax.clear_caches()  # the jitted engine and trainer functions trace the head anew
                trainer = CISPOTrainer(cfg)
                trainer.params = jax.tree.map(jnp.copy, params)  # update_step donates its params
                with bf16_head() if head == "bf16" else contextlib.nullcontext():
                    ms = trainer.run(resume=False)
                trainer.close()
                mean = {k: float(np.mean([m[k] for m in ms])) for k in METRICS}
                rows.append([head, "on" if replay else "off", f"{1 - mean['sampler_trainer_corr']:.2e}",
                             f"{1 - mean['logp_corr']:.2e}", f"{mean['logp_abs_diff_mean']:.3e}",
                             f"{mean['logp_abs_diff_max']:.3e}",
                             f"{np.mean([m['reward_mean'] for m in ms]):.3f}"])
    print(machine())
    print(f"reverse-3 policy after {args.pretrain_steps} fp32 CISPO steps (reward {reward:.3f} over the last 10), "
          f"measured in bf16 compute over {args.steps} steps × {cfg.rollout.num_prompts * cfg.rollout.group_size} "
          "rollouts")
    print(table(["LM head", "replay", "1 − p corr", "1 − log p corr", "mean |Δlogp|", "mean per-seq max |Δlogp|",
                 "reward"], rows))


if __name__ == "__main__":
    main()
