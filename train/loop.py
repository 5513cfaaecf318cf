"""The training loop shared by the CISPO and SFT trainers: model + optimizer state, checkpoint/resume, metrics.

    for step = restored + 1 … steps:
        metrics = train_step(step)             # subclass: rollouts + policy updates, or one next-token update
        metrics.jsonl += metrics               # flushed + fsync-ed
        if step % every == 0 or step == steps: checkpoint(step)

Resume (automatic when the checkpoint directory holds a checkpoint): parameters, optimizer state, trainer RNG
and data-sampler state come back from the latest checkpoint, metrics.jsonl is cut back to that step, and the
run continues with exactly the numbers the uninterrupted run would have produced (every random choice derives
from the run seed and the restored generator states; rollout seeds from (seed, step, prompt, sample)).

Several processes (`m1jax.train.distributed`): the loop runs the same steps on every process over one mesh
spanning all their devices; metrics.jsonl, the progress line and model_config.json are written by process 0,
checkpoints by all processes together (orbax).

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
from functools import partial

import jax
import numpy as np
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.data_sources import stream_rng
from m1jax.train.distributed import is_primary, process_rows
from m1jax.train.metrics_log import MetricsLog
from m1jax.train.model_setup import ModelBundle, build_model, is_abstract, save_model_config
from m1jax.train.optim import learning_rate_schedule, optimizer_step_count, schedule_horizon
from m1jax.train.run_config import RunConfig, RunConfigError
from m1jax.train.update import abstract_optimizer_state, init_optimizer_state

from m1jax.generation import to_host as array_to_host
from m1jax.sharding import make_mesh, named_sharding

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
        if self.mesh is None and jax.process_count() > 1:
            raise RunConfigError(f"run config field 'mesh': a run of {jax.process_count()} processes needs a mesh over "
                                 f"all {jax.device_count()} devices, e.g. mesh: {{data: {jax.device_count()}}}")
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
        if is_primary():
            save_model_config(self.model.config, cfg.checkpoint_dir,
                              cfg.model.model_dump(mode="json", exclude_none=True))
        self.metrics = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"), progress=cfg.log.progress,
                                  tensorboard=cfg.log.tensorboard, total_steps=cfg.steps, enabled=is_primary())
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
    """Device scalars → Python floats (global arrays of several processes included)."""
    return {k: float(array_to_host(v)) for k, v in tree.items()}


def rows_per_chunk(n_rows: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n_rows)) for i in range(0, n_rows, chunk)]


def batch_sharding(shape, mesh):
    """The layout of a trainer batch array: rows over the mesh's batch axes (`sharding.RULES["batch"]`)."""
    return named_sharding(("batch",) + (None,) * (len(shape) - 1), shape, mesh)


def local_rows(n_rows: int, mesh) -> np.ndarray:
    """Indices of the rows of an `n_rows`-row trainer batch that this process feeds (all rows with one process)."""
    return process_rows(n_rows, None if mesh is None else batch_sharding((n_rows,), mesh))


def as_batch(arrays: dict, mesh, n_rows: int | None = None) -> dict:
    """Host arrays → device arrays of an `n_rows`-row batch, rows sharded over the mesh's batch axes.

    `arrays` hold this process's rows of the batch, `local_rows(n_rows, mesh)` in that order (with one process:
    every row; `n_rows` None: the arrays are the whole batch); each process places only those rows
    (`jax.make_array_from_process_local_data`), so no host ever holds the whole batch."""
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in arrays.items()}
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        shape = (v.shape[0] if n_rows is None else n_rows,) + v.shape[1:]
        expected = len(local_rows(shape[0], mesh))
        if v.shape[0] != expected:
            raise ValueError(f"batch array {k!r}: this process feeds {expected} of its {shape[0]} rows, got "
                             f"{v.shape[0]}")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(shape, mesh), v, shape)
    return out


def select_rows(arrays: dict, rows_R, mesh=None) -> dict:
    """Rows `rows_R` of every batch array (traceable), laid out like a batch over `mesh` (None: no constraint)."""
    out = {}
    for k, x in arrays.items():
        y = jax.numpy.take(x, rows_R, axis=0)
        out[k] = y if mesh is None else jax.lax.with_sharding_constraint(y, batch_sharding(y.shape, mesh))
    return out


@partial(jax.jit, static_argnames=("mesh",))
def take_rows(arrays: dict, rows_R, mesh=None) -> dict:
    """`select_rows` on device: a sub-batch of a (global) batch without passing through any host."""
    return select_rows(arrays, rows_R, mesh)
