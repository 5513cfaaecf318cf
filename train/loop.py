"""The training loop shared by the CISPO and SFT trainers: model + optimizer state, checkpoint/resume, metrics.

    for step = restored + 1 … steps:
        metrics = train_step(step)             # subclass: rollouts + policy updates, or one next-token update
        metrics.jsonl += metrics               # flushed + fsync-ed
        if step % every == 0 or step == steps: checkpoint(step)

Resume (automatic when the checkpoint directory holds a checkpoint): parameters, optimizer state, trainer RNG
and data-sampler state come back from the latest checkpoint, metrics.jsonl is cut back to that step, and the
run continues with exactly the numbers the uninterrupted run would have produced (every random choice derives
from the run seed and the restored generator states; rollout seeds from (seed, step, prompt, sample)).

Testing hook: the environment variable `M1JAX_TRAIN_KILL_AT_STEP=k` sends SIGKILL to the process right after
step k's metrics line is written (before its checkpoint), to test resume after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.data_sources import stream_rng
from m1jax.train.metrics_log import MetricsLog
from m1jax.train.model_setup import ModelBundle, build_model, is_abstract, save_model_config
from m1jax.train.optim import learning_rate_schedule, optimizer_step_count, schedule_horizon
from m1jax.train.run_config import RunConfig, RunConfigError
from m1jax.train.update import abstract_optimizer_state, init_optimizer_state

from m1jax.sharding import make_mesh

KILL_ENV = "M1JAX_TRAIN_KILL_AT_STEP"
TRAINER_STREAM = 2


def config_digest(cfg: RunConfig) -> str:
    """Digest of the run-config fields that shape the trajectory (not steps / logging / checkpoint cadence)."""
    src = {k: v for k, v in cfg.source.items() if k not in ("steps", "log", "checkpoint", "output_dir")}
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainLoop:
    """Base class: subclasses set `self.data` (with state_dict/load_state_dict) and implement `train_step`;
    `self.tokenizer` is the run's tokenizer or None."""

    def __init__(self, cfg: RunConfig, *, model: ModelBundle | None = None):
        self.cfg = cfg
        self.output_dir = cfg.output_dir
        os.makedirs(self.output_dir, exist_ok=True)
        self.mesh = make_mesh(dict(cfg.mesh)) if cfg.mesh else None
        self.horizon = schedule_horizon(cfg.optimizer, cfg.optimizer_steps)  # the jit static of the schedule
        self.checkpointer = TrainCheckpointer(cfg.checkpoint_dir, keep=cfg.checkpoint.keep)
        # A run that will resume gets shapes and shardings only: the restore fills them (no init to throw away).
        resuming = model is None and self.checkpointer.latest_step() is not None
        with self.mesh_context():
            self.model = model or build_model(cfg.model, seed=cfg.init_seed, mesh=self.mesh, abstract=resuming)
            self._init_state(self.model.params)
        self.schedule = learning_rate_schedule(cfg.optimizer, self.horizon)
        self.rng = stream_rng(cfg.seed, TRAINER_STREAM)
        self.step = 0
        save_model_config(self.model.config, cfg.checkpoint_dir,
                          cfg.model.model_dump(mode="json", exclude_none=True))
        self.metrics = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"), progress=cfg.log.progress,
                                  tensorboard=cfg.log.tensorboard, total_steps=cfg.steps)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.data = None
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ hooks
    def train_step(self, step: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ state
    def _init_state(self, params) -> None:
        """`self.params` and a fresh `self.opt_state` for them, both in their shardings (abstract if `params`
        are)."""
        cfg = self.cfg
        if is_abstract(params):
            self.params = params
            self.opt_state = abstract_optimizer_state(params, cfg.optimizer, self.horizon)
            return
        if self.mesh is None:
            # Committed, like the arrays a restore returns: a resumed run then hits the same jit cache entries.
            params = jax.device_put(params, jax.devices()[0])
        self.params = params
        self.opt_state = init_optimizer_state(params, cfg.optimizer, self.horizon)

    def _materialize(self) -> None:
        """Initialise the parameters and optimizer state if they are still abstract (a run not resumed)."""
        if is_abstract(self.params):
            with self.mesh_context():
                self.model = build_model(self.cfg.model, seed=self.cfg.init_seed, mesh=self.mesh)
                self._init_state(self.model.params)

    def learning_rate(self) -> float:
        """η of the last applied update."""
        return float(self.schedule(max(optimizer_step_count(self.opt_state) - 1, 0)))

    def save_checkpoint(self) -> None:
        meta = {"rng": self.rng.bit_generator.state, "data": self.data.state_dict(),
                "config_digest": config_digest(self.cfg)}
        self.checkpointer.save(self.step, self.params, self.opt_state, meta)

    def maybe_resume(self) -> int | None:
        """Restore the latest checkpoint if there is one; cut metrics.jsonl back to it. Returns its step."""
        latest = self.checkpointer.latest_step()
        if latest is None:
            self._materialize()
            self.metrics.truncate_after(0)
            return None
        with self.mesh_context():
            self.params, self.opt_state, meta = self.checkpointer.restore(latest, self.params, self.opt_state)
        if meta.get("config_digest") != config_digest(self.cfg):
            print(f"m1jax train: warning: resuming from {self.cfg.checkpoint_dir}/{latest}, written with a different "
                  f"run config (digest {meta.get('config_digest')} vs {config_digest(self.cfg)})", file=sys.stderr)
        self.rng.bit_generator.state = meta["rng"]
        self.data.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        self.metrics.truncate_after(self.step)
        print(f"m1jax train: resumed from step {self.step} ({self.cfg.checkpoint_dir})", file=sys.stderr)
        return self.step

    # ------------------------------------------------------------------ loop
    def run(self, *, resume: bool = True) -> list[dict]:
        """Train until `cfg.steps`; returns the metrics of the steps run by this call."""
        if resume:
            self.maybe_resume()
        else:
            self._materialize()
            self.metrics.truncate_after(0)
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        history = []
        with self.mesh_context():
            while self.step < self.cfg.steps:
                metrics = self.train_step(self.step + 1)
                self.step += 1
                metrics["elapsed_s"] = time.perf_counter() - self.started
                self.metrics.write(metrics)
                history.append(metrics)
                if kill_at and self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.step % self.cfg.checkpoint.every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
        self.metrics.close()
        return history

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


def load_tokenizer(path: str | None):
    """The run's tokenizer (`tokenizer: DIR` in the run config), or None for token-level tasks."""
    if path is None:
        return None
    from m1jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError) as e:
        raise RunConfigError(f"run config field 'tokenizer': {e}") from None


def to_host(tree) -> dict:
    """Device scalars → Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def rows_per_chunk(n_rows: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n_rows)) for i in range(0, n_rows, chunk)]


def as_batch(arrays: dict, mesh) -> dict:
    """Host arrays → device arrays, rows sharded over the mesh's batch axes when there is a mesh."""
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in arrays.items()}
    from m1jax.sharding import named_sharding

    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        axes = ("batch",) + (None,) * (v.ndim - 1)
        out[k] = jax.device_put(v, named_sharding(axes, v.shape, mesh))
    return out
