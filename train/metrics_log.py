"""Per-step metrics: `metrics.jsonl` (one JSON object per step, flushed and fsync-ed), a progress line on
stderr, optional TensorBoard. On resume the file is cut back to the restored step, so a killed-and-resumed run
leaves the same lines as an uninterrupted one (except the `TIMING_FIELDS`). In a run of several processes only
process 0's log is `enabled`; the others write nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# Wall-clock dependent fields: everything else in a line is a deterministic function of (config, seed, step).
TIMING_FIELDS = ("time_step_s", "time_rollout_s", "time_reward_s", "time_update_s", "tokens_per_s",
                 "rollout_tokens_per_s", "update_tokens_per_s", "elapsed_s")


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSONL metrics with crash-safe writes; `enabled=False`: a log that writes nothing."""

    def __init__(self, path: str | Path, *, progress: bool = True, tensorboard: bool = False, total_steps: int = 0,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.total_steps = total_steps
        self.tb = _tensorboard_writer(self.path.parent / "tensorboard") if tensorboard and enabled else None

    def truncate_after(self, step: int) -> int:
        """Keep the lines with `step` ≤ `step` (and drop a torn last line); returns how many were kept."""
        if not self.enabled or not self.path.exists():
            return 0
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return len(kept)

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in metrics.items()}, sort_keys=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.progress:
            print(progress_line(metrics, self.total_steps), file=sys.stderr, flush=True)
        if self.tb is not None:
            step = int(metrics["step"])
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def progress_line(m: dict, total_steps: int = 0) -> str:
    """`step 12/200 | reward 0.412±0.210 | len 4.0 | ...` (only the fields present)."""
    parts = [f"step {m['step']}" + (f"/{total_steps}" if total_steps else "")]

    def add(fmt, *keys):
        if all(k in m for k in keys):
            parts.append(fmt.format(*(m[k] for k in keys)))

    add("reward {:.3f}±{:.3f}", "reward_mean", "reward_std")
    add("exact {:.2f}", "exact_match")
    add("nll {:.4f}", "nll")
    add("len {:.1f}", "response_len_mean")
    add("zero-std {:.2f}", "frac_zero_std")
    add("clip {:.3f}", "clip_frac")
    add("ent {:.3f}", "entropy")
    add("gnorm {:.3g}", "grad_norm")
    add("lr {:.2e}", "lr")
    add("corr {:.4f}", "sampler_trainer_corr")
    add("|Δlogp| {:.2g}", "logp_abs_diff_mean")
    add("{:.0f} tok/s", "tokens_per_s")
    add("roll {:.2f}s", "time_rollout_s")
    add("upd {:.2f}s", "time_update_s")
    return " | ".join(parts)


def _tensorboard_writer(logdir: Path):
    """A SummaryWriter if tensorboardX or torch's tensorboard is installed, else None (TensorBoard is optional)."""
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(str(logdir))
        except Exception:  # noqa: BLE001 - missing or broken optional dependency
            continue
    print("m1jax train: tensorboard requested but neither tensorboardX nor tensorboard is installed; "
          "writing metrics.jsonl only", file=sys.stderr)
    return None
