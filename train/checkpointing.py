"""Training checkpoints with orbax: parameters, optimizer state, RNG and data position, atomic, keep-last-N.

A checkpoint at step s holds everything the next step depends on:

* `state` (orbax StandardSave): the fp32 master parameters and the optimizer state, as flat name → array maps
  (`layers.0.self_attn.qkv_proj`, `opt.1.0.mu.layers.0...`), saved and restored with their shardings;
* `meta` (JSON): the step, the trainer RNG state, the data sampler state, the run-config digest.

Writes are atomic (orbax writes into a temporary directory and renames it when complete; a run killed during a
save leaves the previous checkpoint as the latest) and only the last `keep` checkpoints are kept.
Restoring needs the live (freshly initialised) parameters/optimizer state as templates: the restored arrays
take their shapes, dtypes and shardings.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint does not match the run (different model/optimizer structure) or cannot be read."""


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def named_leaves(tree, prefix: str) -> dict[str, jax.Array]:
    """{"prefix.path.to.leaf": array} for every array leaf of a pytree (paths joined with dots)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join([prefix] + [_key_name(e) for e in path]): leaf for path, leaf in flat}


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class TrainCheckpointer:
    """Save/restore `(params, opt_state, meta)` under `directory/<step>/`."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Write checkpoint `step` (blocking: it is complete, or absent, when this returns)."""
        arrays = {**named_leaves(params, "params"), **named_leaves(opt_state, "opt")}
        meta = json.loads(json.dumps({**meta, "step": int(step)}))  # plain JSON types only
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params_template, opt_state_template):
        """(params, opt_state, meta) of checkpoint `step`, shaped/sharded like the templates."""
        p_named = named_leaves(params_template, "params")
        o_named = named_leaves(opt_state_template, "opt")
        target = {k: _abstract(v) for k, v in {**p_named, **o_named}.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore checkpoint {self.directory / str(step)}: {e}") from e
        arrays = restored["state"]
        missing = sorted(set(target) - set(arrays))
        if missing:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} lacks {missing[:5]}")
        params = jax.tree.unflatten(jax.tree.structure(params_template), [arrays[k] for k in p_named])
        opt_state = jax.tree.unflatten(jax.tree.structure(opt_state_template), [arrays[k] for k in o_named])
        return params, opt_state, dict(restored["meta"])

    def restore_params(self, step: int, params_template):
        """Only the parameters of checkpoint `step` (e.g. to start a new run from a trained model)."""
        p_named = named_leaves(params_template, "params")
        target = {k: _abstract(v) for k, v in p_named.items()}
        handler = ocp.PyTreeCheckpointer()
        path = self.directory / str(step) / "state"
        restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype,
                                                                   global_shape=t.shape)
                                    if t.sharding is not None else ocp.RestoreArgs(restore_type=np.ndarray), target)
        try:
            arrays = handler.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                                       partial_restore=True))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot read parameters from {path}: {e}") from e
        return jax.tree.unflatten(jax.tree.structure(params_template), [arrays[k] for k in p_named])

    def close(self) -> None:
        self.manager.close()


def is_train_checkpoint_dir(path: str | Path) -> bool:
    """A directory written by `TrainCheckpointer` (numbered step dirs with `state/` and `meta/`), or a run's
    output dir holding `checkpoints/` of that kind."""
    path = Path(path)
    for d in (path, path / "checkpoints"):
        if d.is_dir() and any(c.name.isdigit() and (c / "state").is_dir() for c in d.iterdir()):
            return True
    return False
