"""An orbax-checkpoint directory of m1jax parameters, written and read block by block through tensorstore.

The layout is the one `ocp.StandardCheckpointer().save(dir, nnx.state(model))` writes (orbax-checkpoint 0.12.8),
so `ocp.StandardCheckpointer().restore(dir, nnx.state(abstract_model))` restores it:

    dir/manifest.ocdbt, dir/d/*        one OCDBT key-value database holding every array
      <key>/.zarray, <key>/<chunk>     a zarr v2 array per parameter, key `layers.3.self_attn.qkv_proj.value`
    dir/array_metadatas/process_0      write and chunk shape of every array
    dir/_METADATA                      the pytree metadata orbax restores from (written last)
    dir/_CHECKPOINT_METADATA           handler name and timestamps

Orbax writes a whole array per call, so it needs every parameter in memory at once. Here each array is created
empty and filled region by region; a batch of region writes is one OCDBT transaction (one atomic commit of the
manifest), so an interrupted writer leaves the database at its last commit. Differences from orbax's own
writer: chunks are aligned with the write regions and stored uncompressed (orbax: one chunk per process shard,
zstd level 1), data goes straight to the root database (orbax stages it in `ocdbt.process_0/` and merges), and
no `_sharding` file is written (a restore names its target shardings, as the NNX restore pattern does).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

TREE_METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
ARRAY_METADATAS = "array_metadatas/process_0"
HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"}
_DICT_KEY = 2  # orbax's KeyType.DICT


def array_key(path: Sequence) -> str:
    """The orbax parameter name of an NNX state path: `("layers", 3, "norm")` → `layers.3.norm.value`."""
    return ".".join(str(k) for k in path) + ".value"


def zarr_dtype(dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.str


def write_json_atomic(path: Path, obj, *, durable: bool = True) -> None:
    """Write JSON to `path` via a temp file and rename (fsync'd when durable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OrbaxArrayStore:
    """The arrays of one orbax checkpoint directory, opened through one shared tensorstore context.

    Writing: `create(arrays)` once (idempotent: existing arrays are reopened and must match), then
    `write_batch([(key, index, block), ...])` any number of times from any threads, then `finalize(arrays)`.
    Reading: `read(key, index)` returns a numpy array of just that region.
    """

    def __init__(self, directory: str | os.PathLike, *, cache_bytes: int = 0):
        self.directory = Path(directory).absolute()
        self.context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes},
                                   "cache_pool#ocdbt": {"total_bytes_limit": 16 * 1024 * 1024},
                                   "file_io_concurrency": {"limit": 32}, "file_io_sync": True})
        self._arrays: dict[str, ts.TensorStore] = {}
        self._lock = threading.Lock()

    def _kvstore(self, key: str, write: bool) -> dict:
        base = {"driver": "file", "path": f"{self.directory}/"}
        spec = {"driver": "ocdbt", "base": base, "path": key, "cache_pool": "cache_pool#ocdbt"}
        if write:
            spec["base"] = {**base, "file_io_locking": {"mode": "non_atomic"}}
            spec["manifest"] = base
            spec["config"] = OCDBT_CONFIG
        return spec

    # ------------------------------------------------------------------ writing
    def create(self, arrays: dict[str, tuple[Sequence[int], np.dtype, Sequence[int]]]) -> None:
        """Create (or reopen) every array `key → (shape, dtype, chunk shape)` in one OCDBT commit."""
        self.directory.mkdir(parents=True, exist_ok=True)
        txn = ts.Transaction()
        futures = []
        for key, (shape, dtype, chunks) in arrays.items():
            spec = {"driver": "zarr", "kvstore": self._kvstore(key, write=True),
                    "metadata": {"shape": [int(s) for s in shape], "chunks": [int(c) for c in chunks],
                                 "dtype": zarr_dtype(dtype), "compressor": None, "fill_value": None,
                                 "order": "C", "filters": None, "dimension_separator": "."}}
            futures.append((key, ts.open(spec, create=True, open=True, context=self.context, transaction=txn)))
        for _, f in futures:
            f.result()
        txn.commit_async().result()
        for key, _ in futures:
            self._arrays[key] = self._open(key, write=True)

    def _open(self, key: str, write: bool) -> ts.TensorStore:
        spec = {"driver": "zarr", "kvstore": self._kvstore(key, write),
                "recheck_cached_data": False, "recheck_cached_metadata": False}
        try:
            return ts.open(spec, open=True, context=self.context, read=True, write=write).result()
        except ValueError as e:
            raise FileNotFoundError(f"{self.directory}: array {key!r} cannot be opened ({e})") from None

    def array(self, key: str) -> ts.TensorStore:
        with self._lock:
            arr = self._arrays.get(key)
        if arr is None:
            arr = self._open(key, write=False)
            with self._lock:
                self._arrays[key] = arr
        return arr

    def write_batch(self, writes: Iterable[tuple[str, tuple, np.ndarray]]) -> None:
        """Write every `(key, index, block)` and commit them together (atomic: all or none are visible)."""
        txn = ts.Transaction()
        futures = [self.array(key).with_transaction(txn)[index].write(block) for key, index, block in writes]
        for f in futures:
            f.result()
        txn.commit_async().result()

    def finalize(self, arrays: dict[str, tuple[Sequence[int], np.dtype, Sequence[int]]], *, durable: bool = True
                 ) -> None:
        """Write orbax's metadata files; `_METADATA` (what a restore needs first) is written last but one."""
        now = time.time_ns()
        write_json_atomic(self.directory / ARRAY_METADATAS, {"array_metadatas": [
            {"array_metadata": {"param_name": key, "write_shape": list(shape), "chunk_shape": list(chunks),
                                "ext_metadata": None}} for key, (shape, _, chunks) in arrays.items()]},
            durable=durable)
        tree = {}
        for key, (shape, _, _) in arrays.items():
            parts = key.split(".")
            tree[str(tuple(parts))] = {
                "key_metadata": [{"key": p, "key_type": _DICT_KEY} for p in parts],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
            }
        write_json_atomic(self.directory / TREE_METADATA, {
            "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}, durable=durable)
        write_json_atomic(self.directory / CHECKPOINT_METADATA, {
            "item_handlers": HANDLER, "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now, "custom_metadata": {}}, durable=durable)

    # ------------------------------------------------------------------ reading
    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """The region `index` (a tuple of ints/slices, numpy semantics) of array `key`, as numpy."""
        return self.array(key)[index].read().result()

    def keys(self) -> list[str]:
        """The parameter names listed in `_METADATA`."""
        meta = json.loads((self.directory / TREE_METADATA).read_text())
        return [".".join(k["key"] for k in entry["key_metadata"]) for entry in meta["tree_metadata"].values()]


class ArrayView:
    """A lazy, numpy-indexable view of one stored parameter: `view[index]` reads only that region."""

    def __init__(self, store: OrbaxArrayStore, key: str):
        self.store = store
        self.key = key
        arr = store.array(key)
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype.numpy_dtype)

    def __getitem__(self, index) -> np.ndarray:
        return self.store.read(self.key, index if isinstance(index, tuple) else (index,))
