"""Multi-process (multi-host) training: which process does what, and the few host-side exchanges it needs.

Every process runs the same command (`m1jax train ... --coordinator HOST:PORT --num-processes N --process-id I`,
`initialize`) and the same SPMD programs over one mesh spanning all processes' devices. Per step of N_p prompts,
G samples each, on P processes:

* prompts: the data source's state (random generator, position) advances by the whole step's draw on every
  process, so it is one value, checkpointed once and restored identically everywhere; process p builds only its
  share `share_slice(N_p, p, P)` of the prompts (dataset rows, texts, reward fields).
* generation: the engine is SPMD over the global mesh; it takes the step's prompt ids (all-gathered, a few
  integers per prompt: `allgather_ragged`) and hands every completion to every process (`generation.to_host`).
* rewards: process p runs the reward functions only on the completions of its own prompts; the rewards (one
  float per completion) are all-gathered bit for bit (`allgather_host`), so group advantages, the shuffled-reward
  control and dynamic sampling see the whole batch exactly as one process does (a group never needs to live on
  one process).
* trainer batch: each process packs only the rows its own devices hold (`process_rows` of the batch sharding) and
  places them with `jax.make_array_from_process_local_data` (`m1jax.train.loop.as_batch`); minibatches and π_old
  chunks are gathered from that global array on device.
* files: `metrics.jsonl`, the progress line, TensorBoard and `model_config.json` are written by process 0
  (`is_primary`); orbax checkpoints are saved and restored by every process together (orbax writes each array
  once), into a directory all processes share.

With one process every function here is the identity / the whole range, so the single-process trainer runs the
same code.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout_s: int = 300) -> None:
    """Join the `jax.distributed` job at `coordinator` ("host:port") as process `process_id` of `num_processes`
    (CPU collectives over gloo, so CPU-only jobs and tests work too). Call before any other jax use."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} must lie in [0, {num_processes}) with at least one process")
    if ":" not in coordinator:
        raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)


def is_primary() -> bool:
    """Whether this process writes the run's non-checkpoint files (process 0)."""
    return jax.process_index() == 0


def share_slice(n: int, index: int, count: int) -> slice:
    """Share `index` of `count` equal contiguous shares of `n` items: items [index·n/count, (index+1)·n/count)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"share index {index} must lie in [0, {count})")
    if n % count:
        raise ValueError(f"{n} items cannot be split into {count} equal shares (one per process)")
    size = n // count
    return slice(index * size, (index + 1) * size)


def process_rows(n_rows: int, sharding) -> np.ndarray:
    """Sorted indices of the rows of an `[n_rows, ...]` array with `sharding` that this process's devices hold,
    i.e. the rows (in order) of the local data `jax.make_array_from_process_local_data` expects; all rows when
    `sharding` is None or replicates the rows."""
    if sharding is None:
        return np.arange(n_rows)
    rows = set()
    for index in sharding.addressable_devices_indices_map((n_rows,)).values():
        rows.update(range(*index[0].indices(n_rows)))
    return np.array(sorted(rows), np.int64)


def allgather_host(x_local: np.ndarray) -> np.ndarray:
    """Every process's `x_local` (same shape and dtype on each) concatenated along axis 0 in process order,
    bit for bit (any dtype: the bytes are gathered, so float64 stays float64 without x64 mode)."""
    x_local = np.ascontiguousarray(x_local)
    if jax.process_count() == 1:
        return x_local
    rows = x_local.shape[0]
    bytes_NxK = x_local.reshape(rows, -1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(bytes_NxK, tiled=True))
    return np.ascontiguousarray(gathered).view(x_local.dtype).reshape(-1, *x_local.shape[1:])


def allgather_ragged(local: list[list[int]]) -> list[list[int]]:
    """Every process's lists of token ids (the same number of lists on each), concatenated in process order."""
    lengths = allgather_host(np.array([len(x) for x in local], np.int64))
    if jax.process_count() == 1:
        return [list(x) for x in local]
    padded = np.zeros((len(local), int(lengths.max(initial=0))), np.int64)
    for i, x in enumerate(local):
        padded[i, :len(x)] = x
    rows = allgather_host(padded)
    return [row[:n].tolist() for row, n in zip(rows, lengths, strict=True)]
