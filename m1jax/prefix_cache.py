"""The hybrid prefix cache: lightning states and softmax K/V snapshotted at block boundaries of a prompt's
prefill, keyed by the token prefix, so a prompt that shares a cached prefix prefills only the rest.

A prompt of n tokens is prefilled block-aligned (`RowPrefill`): block j = tokens [jC, (j+1)C) (C = `block`),
then the n mod C tokens after the last full block, each appended by one `Engine.prefill(state=...)` into a
batch-1 cache of the same `capacity` for every prompt. After block j the cache holds, besides the blocks' K/V,
each lightning layer's state S_j = Σ_{t < (j+1)C} decay^{…} k_tᵀ v_t — a function of the prefix alone — so the
snapshot

    entry_j = (K/V and validity of the slots block j wrote, per softmax layer; S_j per lightning layer;
               the next-token logits)

is keyed by the hash chain h_j = SHA-256(h_{j−1} ‖ tokens of block j) (h_{−1} = ""), which names the whole
prefix [0, (j+1)C). A newcomer looks up h_0, h_1, … and restores the deepest consecutive hit d: the slots of
blocks 0…d−1 in order, the lightning states S_{d−1}, the logits. Every call it then makes — blocks d… and the
tail — is the call the uncached prefill makes at that point, on the same inputs and the same shapes, so the
result is bit-identical to prefilling without the cache (greedy tokens and log-probs exactly equal).

Memory: an entry holds C tokens of softmax K/V plus one full set of lightning states, which dominates for M1
(70 lightning layers × 64 heads × 128 × 128 fp32 = 294 MB per entry, against 40 KB of bf16 K/V per token), so a
larger block means fewer snapshots per cached token. The store is LRU-bounded by `capacity_tokens` (C tokens per
entry). A prefix is touched deepest first, root
last, so eviction takes the deepest blocks of the least recently used prefix first and never leaves a kept
block whose ancestors are gone.

Persistent tier (`StateStore`): every `checkpoint_every` tokens (a multiple of C) a `RowPrefill` also hands its
whole batch-1 state after the prefix [0, jC) to a `StateStore`, which writes it (`generation.save_state`: the
cache trimmed to its written slots, atomic rename) on a background thread into `directory/<hex h_{j−1}>`, with a
fingerprint of the model, tokenizer and prefill settings; each prompt keeps only its deepest checkpoint. A
newcomer restores the deepest checkpoint of its key chain when it is deeper than its in-memory hit
(`restore_blocks` of the saved slots: the same state, bit for bit), and, when the memory tier can hold them, puts
the restored blocks into it: their K/V as pass-through entries (a run may go through them but must end at an
entry with states) and the last one complete, so later prompts with that prefix hit memory. So a server killed
during a long prefill resumes at the last checkpoint when the request comes again, and long prefixes stay cached
across restarts (LRU within `max_bytes` on disk). A waiting request's checkpoint is read ahead on a reader thread
(`prefetch`), so the scheduler does not stall its decode on the disk. Interrupted saves (temporary directories),
unreadable checkpoints and checkpoints of another fingerprint are ignored with a log line (the first two deleted).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.cache import Cache, init_cache
from m1jax.generation import (
    Engine,
    EngineState,
    GenerationError,
    load_state,
    prefill_layout,
    save_state,
    saved_state_metadata,
    to_host,
    trim_cache,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrefixEntry:
    """One cached block: per layer the `(k, v)` `[W, K, D]` of the W slots the block's call wrote (softmax) or
    the state `[H, D, D]` after it (lightning); those slots' validity `[W]`; the fp32 next-token logits `[V]`.
    A pass-through entry (from a state restored from disk, which holds only its last block's states) has None
    for the states and logits: a cached run can go through it but not end at it."""

    layers: tuple
    valid_W: jax.Array
    logits_V: jax.Array | None

    @property
    def complete(self) -> bool:
        """Whether a cached run can end here (the states and logits after the block are held)."""
        return self.logits_V is not None


def block_keys(prompt: Sequence[int], block: int) -> list[bytes]:
    """The hash chain of the prompt's full blocks: key j = SHA-256(key j−1 ‖ int32 tokens of block j)."""
    tokens = np.asarray(prompt, np.int32).astype("<i4")
    keys, h = [], b""
    for j in range(len(tokens) // block):
        h = hashlib.sha256(h + tokens[j * block:(j + 1) * block].tobytes()).digest()
        keys.append(h)
    return keys


class PrefixCache:
    """Snapshots of `block`-token prefill blocks keyed by `block_keys`, at most `capacity_tokens` tokens (LRU).

    Counters: `lookups` (prompts looked up), `hits` (lookups that restored ≥ 1 block), `hit_tokens` (tokens
    restored)."""

    def __init__(self, block: int, capacity_tokens: int):
        if block < 1 or capacity_tokens < 0:
            raise GenerationError(f"prefix cache: block must be ≥ 1 and capacity_tokens ≥ 0, got {block} and "
                                  f"{capacity_tokens}")
        self.block, self.capacity_tokens = int(block), int(capacity_tokens)
        self._entries: collections.OrderedDict[bytes, PrefixEntry] = collections.OrderedDict()
        self.lookups = self.hits = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        """Tokens held (entries × block)."""
        return len(self._entries) * self.block

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> PrefixEntry | None:
        """The entry held under `key` (not touched, not counted)."""
        return self._entries.get(key)

    def depth(self, keys: Sequence[bytes]) -> int:
        """The length of the run `lookup(keys)` would restore (not touched, not counted)."""
        return len(self._run(keys))

    def _run(self, keys: Sequence[bytes]) -> list[PrefixEntry]:
        """The entries of the longest held run keys[0], keys[1], … that ends at a complete entry."""
        chain = []
        for k in keys:
            if (entry := self._entries.get(k)) is None:
                break
            chain.append(entry)
        while chain and not chain[-1].complete:
            chain.pop()
        return chain

    def lookup(self, keys: Sequence[bytes]) -> list[PrefixEntry]:
        """The entries of the longest cached run keys[0], keys[1], … that ends at a complete entry (touched;
        counted as one lookup)."""
        chain = self._run(keys)
        self._touch(keys[:len(chain)])
        self.lookups += 1
        self.hits += bool(chain)
        self.hit_tokens += len(chain) * self.block
        return chain

    def insert(self, keys: Sequence[bytes], entry: PrefixEntry) -> None:
        """Store `entry` under keys[-1] (keys[:-1]: its ancestors, which must be held), then evict to the budget."""
        if self.capacity_tokens < self.block or any(k not in self._entries for k in keys[:-1]):
            return
        self._entries[keys[-1]] = entry
        self._touch(keys)
        while self.tokens > self.capacity_tokens:
            self._entries.popitem(last=False)

    def _touch(self, keys: Sequence[bytes]) -> None:
        for k in reversed(keys):  # root most recent: eviction takes the deepest blocks first
            if k in self._entries:
                self._entries.move_to_end(k)


# --------------------------------------------------------------------------------------- snapshot / restore
@partial(jax.jit, static_argnums=(2, 3))
def _slice_slots(cache: Cache, start, width: int, states: bool = True) -> tuple:
    """Row 0's slots [start, start + width): per layer `(k, v)` `[W, K, D]` or the lightning state (None without
    `states`); validity."""
    layers = tuple(tuple(jax.lax.dynamic_slice_in_dim(x[0], start, width, axis=0) for x in layer)
                   if isinstance(layer, tuple) else layer[0] if states else None for layer in cache.per_layer())
    return layers, jax.lax.dynamic_slice_in_dim(cache.valid_BxS[0], start, width, axis=0)


def snapshot_block(state: EngineState, start: int, width: int, *, complete: bool = True) -> PrefixEntry:
    """The entry of a block whose call wrote slots [start, start + width) of a batch-1 state; the call was the
    state's last (`complete`: its lightning states and logits are the block's) or not (a pass-through entry)."""
    layers, valid_W = _slice_slots(state.cache, jnp.asarray(start, jnp.int32), width, complete)
    return PrefixEntry(layers=layers, valid_W=valid_W, logits_V=state.next_logits_BxV[0] if complete else None)


@jax.jit
def _restore(cache: Cache, layers: tuple, valid_W: jax.Array) -> Cache:
    """An empty batch-1 cache with its first W slots restored (`layers`: per layer `(k, v)` `[W, K, D]` or the
    lightning state; `valid_W`)."""
    out = tuple(tuple(jax.lax.dynamic_update_slice_in_dim(e, s[None].astype(e.dtype), 0, axis=1)
                      for e, s in zip(empty, saved, strict=True))
                if isinstance(empty, tuple) else saved[None].astype(empty.dtype)
                for empty, saved in zip(cache.per_layer(), layers, strict=True))
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_W[None], 0, axis=1)
    return Cache.from_per_layer(out, valid, jnp.asarray(valid_W.shape[0], jnp.int32), groups=cache.groups)


def restore_blocks(engine: Engine, entries: Sequence[PrefixEntry], n_tokens: int, capacity: int) -> EngineState:
    """The batch-1 state after the `n_tokens` tokens of `entries` (consecutive blocks from block 0) in a cache of
    `capacity` slots, bit-identical to the state after prefilling those blocks."""
    layers = tuple(tuple(jnp.concatenate([e.layers[i][t] for e in entries]) for t in range(2))
                   if isinstance(entries[0].layers[i], tuple) else entries[-1].layers[i]
                   for i in range(len(entries[0].layers)))
    valid_W = jnp.concatenate([e.valid_W for e in entries])
    empty = init_cache(engine.config, 1, capacity, mesh=engine.mesh, rules=engine.rules)
    with engine._on_mesh():
        cache = _restore(empty, layers, valid_W)
    return EngineState(cache=cache, positions_B=jnp.asarray([n_tokens], jnp.int32),
                       next_logits_BxV=entries[-1].logits_V[None])


# ------------------------------------------------------------------------------------------ persistent tier
_KEY_DIR = re.compile(r"^[0-9a-f]{64}$")
_TMP_DIR = re.compile(r"^\.[0-9a-f]{64}\.tmp-\d+$")  # `save_state`'s temporary directory of a checkpoint


def store_fingerprint(engine: Engine, block: int, capacity: int) -> dict:
    """What a saved prefill state depends on besides its tokens: the model (`streaming.model_fingerprint`), the
    tokenizer, the block, the row cache's capacity, the engine's prefill chunk and the mesh."""
    from m1jax.streaming import model_fingerprint, tokenizer_fingerprint

    tok = engine.tokenizer
    return {"model": model_fingerprint(engine), "tokenizer": None if tok is None else tokenizer_fingerprint(tok),
            "block": int(block), "capacity": int(capacity), "engine_prefill_chunk": engine.prefill_chunk,
            "mesh": None if engine.mesh is None else {str(k): int(v) for k, v in engine.mesh.shape.items()}}


class _OtherFingerprint(Exception):
    """A checkpoint made with another fingerprint (the message names the fields that differ)."""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class StateStore:
    """Batch-1 prefill states on disk, one per whole-block prompt prefix, in `directory/<hex key>` (the prefix's
    last `block_keys` key; module docstring). `fingerprint` (`store_fingerprint`) names what the states depend on
    besides their tokens: checkpoints with another one are ignored (a log line; kept until evicted, first). At most
    `max_bytes` on disk, least recently used evicted first. Saves run on a writer thread, at most `pending` queued.

    Counters: `written`, `skipped` (not queued: the writer was busy), `restores` (of which `prefetched`: read
    ahead by `prefetch`), `restored_tokens`, `ignored` (checkpoints found unreadable, deleted, or of another
    fingerprint)."""

    PREFETCH = 2  # checkpoints read ahead and held in memory at most

    def __init__(self, directory, *, fingerprint: dict, max_bytes: int, pending: int = 2):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise GenerationError(f"the state directory's byte budget must be an integer ≥ 0, got {max_bytes!r}")
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GenerationError(f"cannot use {directory} as the state directory: {e}") from None
        if not os.access(self.directory, os.W_OK):
            raise GenerationError(f"the state directory {directory} is not writable")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from a checkpoint
        self.max_bytes = max_bytes
        self.written = self.skipped = self.restores = self.prefetched = self.restored_tokens = self.ignored = 0
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[str, int] = collections.OrderedDict()  # name → bytes, LRU first
        self._foreign: dict[str, int] = {}  # checkpoints of another fingerprint: name → bytes
        self._pending: dict[str, EngineState] = {}  # queued saves (restorable before they reach the disk)
        self._prefetched: collections.OrderedDict[str, Future] = collections.OrderedDict()  # reads under way / done
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m1jax-state-reader")
        self._scan()
        self._queue: queue.Queue = queue.Queue(maxsize=pending)
        self._thread = threading.Thread(target=self._write_loop, name="m1jax-state-writer", daemon=True)
        self._thread.start()

    @property
    def bytes(self) -> int:
        """Bytes of the checkpoints on disk."""
        with self._lock:
            return sum(self._index.values()) + sum(self._foreign.values())

    def __len__(self) -> int:
        """Usable checkpoints (this fingerprint)."""
        return len(self._index)

    # ------------------------------------------------------------------------------------------- lookup
    def deepest(self, keys: Sequence[bytes], above: int = 0) -> int:
        """The largest d > `above` with a checkpoint of the prefix keys[d − 1] (0: none)."""
        with self._lock:
            return next((d for d in range(len(keys), above, -1)
                         if (name := keys[d - 1].hex()) in self._index or name in self._pending), 0)

    def restore(self, engine: Engine, keys: Sequence[bytes], capacity: int,
                above: int = 0) -> tuple[EngineState, int] | None:
        """The deepest checkpoint of `keys` deeper than `above` blocks that loads, as the batch-1 state in a
        `capacity`-slot cache (bit-identical to the state it saved) and its depth in blocks; None if none. A
        checkpoint still queued for writing, or already read by `prefetch`, is taken from memory."""
        while d := self.deepest(keys, above):
            name = keys[d - 1].hex()
            with self._lock:
                queued, fetched = self._pending.get(name), self._prefetched.pop(name, None)
            try:
                if queued is not None:
                    saved, n = queued, int(to_host(queued.positions_B)[0])
                else:
                    saved, n = self._read(name, engine) if fetched is None else fetched.result()
                cache = saved.cache
                if cache.max_len > capacity:
                    raise GenerationError(f"holds {cache.max_len} slots, more than the {capacity}-slot row cache")
                entry = PrefixEntry(layers=tuple(tuple(x[0] for x in layer) if isinstance(layer, tuple)
                                                 else layer[0] for layer in cache.per_layer()),
                                    valid_W=cache.valid_BxS[0], logits_V=saved.next_logits_BxV[0])
                state = restore_blocks(engine, [entry], n, capacity)
            except _OtherFingerprint as e:  # replaced by another server since the directory was indexed
                with self._lock:
                    self._foreign[name] = self._index.pop(name, 0)
                    self.ignored += 1
                log.warning("ignoring state checkpoint %s: made with another %s", self.directory / name, e)
                continue
            except Exception as e:  # orbax and the metadata fail in many ways; the checkpoint is unusable
                self._discard(name, f"unreadable ({type(e).__name__}: {e})")
                continue
            with self._lock:
                if name in self._index:
                    self._index.move_to_end(name)
                self.restores += 1
                self.prefetched += fetched is not None
                self.restored_tokens += n
            try:
                os.utime(self.directory / name)  # recency survives a restart
            except OSError:  # not written yet
                pass
            return state, d
        return None

    def prefetch(self, engine: Engine, keys: Sequence[bytes]) -> Future | None:
        """Start reading the deepest checkpoint of `keys` on the loader thread (the future of `_read`), so that a
        later `restore` takes it from memory; None when there is nothing to read. At most `PREFETCH` are held."""
        if not (d := self.deepest(keys)):
            return None
        name = keys[d - 1].hex()
        with self._lock:
            if name in self._pending:
                return None
            if name not in self._prefetched:
                self._prefetched[name] = self._loader.submit(self._read, name, engine)
                while len(self._prefetched) > self.PREFETCH:
                    self._prefetched.popitem(last=False)
            return self._prefetched[name]

    def _read(self, name: str, engine: Engine) -> tuple[EngineState, int]:
        """The saved state (its cache trimmed to the written slots) and token count of checkpoint `name`;
        `_OtherFingerprint` for another fingerprint's, any other exception for a damaged one."""
        path = self.directory / name
        meta = saved_state_metadata(path)
        if diff := self._differs(meta):
            raise _OtherFingerprint(", ".join(diff))
        saved, n = load_state(path, engine.config), int(meta["tokens"])
        position = int(to_host(saved.positions_B)[0])
        if saved.cache.batch_size != 1 or position != n:
            raise GenerationError(f"holds {saved.cache.batch_size} rows at position {position}, expected 1 at {n}")
        return saved, n

    # ------------------------------------------------------------------------------------------- saving
    def save(self, key: bytes, state: EngineState, tokens: int, *, replaces: bytes | None = None) -> bool:
        """Queue a checkpoint of the batch-1 `state` after the `tokens`-token prefix named by `key`; once it is
        written, the checkpoint `replaces` (the same prompt's shallower one) is deleted. False when `key` is on
        disk already or the writer is busy (`skipped`). The state's arrays are copied first (the caller's prefill
        may donate them)."""
        name = key.hex()
        with self._lock:
            if name in self._index or name in self._pending:
                return False
        if self._queue.full():
            self.skipped += 1
            return False
        cache = trim_cache(state.cache)  # new K/V and validity buffers; the lightning states and length copied
        cache = cache.replace(layers=tuple(layer if isinstance(layer, tuple) else jnp.copy(layer)
                                           for layer in cache.layers), length=jnp.copy(cache.length))
        snap = EngineState(cache=cache, positions_B=jnp.copy(state.positions_B),
                           next_logits_BxV=jnp.copy(state.next_logits_BxV))
        with self._lock:
            self._pending[name] = snap
        self._queue.put((name, snap, int(tokens), None if replaces is None else replaces.hex()))
        return True

    def flush(self) -> None:
        """Wait until every queued checkpoint is written."""
        self._queue.join()

    def close(self) -> None:
        """Write the queued checkpoints and stop the writer and reader threads."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._loader.shutdown(wait=True, cancel_futures=True)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception as e:  # a full disk or a vanished directory must not stop the server
                log.warning("state checkpoint %s not written: %s: %s", item[0], type(e).__name__, e)
            finally:
                if item is not None:
                    with self._lock:
                        self._pending.pop(item[0], None)
                self._queue.task_done()

    def _write(self, name: str, snap: EngineState, tokens: int, replaces: str | None) -> None:
        path = self.directory / name
        with self._lock:
            if name in self._index:
                return
            self._foreign.pop(name, None)
        shutil.rmtree(path, ignore_errors=True)  # another fingerprint's checkpoint of the same prefix
        save_state(snap, path, metadata={"fingerprint": self.fingerprint, "tokens": tokens})
        size = _dir_bytes(path)
        with self._lock:
            self._index[name] = size
            self.written += 1
            old = replaces if replaces is not None and self._index.pop(replaces, None) is not None else None
        if old is not None:
            shutil.rmtree(self.directory / old, ignore_errors=True)
        self._evict(keep=name)

    # ---------------------------------------------------------------------------------------- housekeeping
    def _differs(self, meta: dict) -> list[str]:
        """The fingerprint fields a checkpoint's metadata disagrees on (all of them for a foreign format)."""
        fp = meta.get("fingerprint") if isinstance(meta, dict) else None
        if not isinstance(fp, dict) or "tokens" not in meta:
            return ["format"]
        return [k for k in sorted(set(fp) | set(self.fingerprint)) if fp.get(k) != self.fingerprint.get(k)]

    def _discard(self, name: str, why: str) -> None:
        with self._lock:
            self._index.pop(name, None)
            self._foreign.pop(name, None)
            self.ignored += 1
        log.warning("ignoring state checkpoint %s: %s; deleted", self.directory / name, why)
        shutil.rmtree(self.directory / name, ignore_errors=True)

    def _scan(self) -> None:
        """Index the directory: interrupted saves deleted, unreadable checkpoints deleted, other fingerprints
        set aside, the rest ordered by last use (their marker's mtime)."""
        found, differing = [], collections.Counter()
        for p in self.directory.iterdir():
            if _TMP_DIR.match(p.name):  # a save killed before its atomic rename
                log.warning("deleting %s: a state checkpoint whose save was interrupted", p)
                shutil.rmtree(p, ignore_errors=True)
                continue
            if not (_KEY_DIR.match(p.name) and p.is_dir()):
                continue
            try:
                meta = saved_state_metadata(p)
            except Exception as e:  # no marker, bad JSON: a damaged checkpoint
                self._discard(p.name, f"unreadable ({type(e).__name__}: {e})")
                continue
            if diff := self._differs(meta):
                self._foreign[p.name] = _dir_bytes(p)
                self.ignored += 1
                differing.update(diff)
                continue
            found.append((p.stat().st_mtime, p.name, _dir_bytes(p)))
        for _, name, size in sorted(found):
            self._index[name] = size
        if differing:
            log.warning("ignoring %d state checkpoints in %s made with another %s (evicted first)",
                        len(self._foreign), self.directory, ", ".join(sorted(differing)))
        self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Delete checkpoints until the directory is within `max_bytes`: other fingerprints' first, then least
        recently used (`keep` last)."""
        victims = []
        with self._lock:
            total = sum(self._index.values()) + sum(self._foreign.values())
            order = [*self._foreign, *(n for n in self._index if n != keep), *([keep] if keep in self._index else [])]
            for name in order:
                if total <= self.max_bytes:
                    break
                total -= self._foreign.pop(name, 0) + self._index.pop(name, 0)
                victims.append(name)
        for name in victims:
            shutil.rmtree(self.directory / name, ignore_errors=True)
        if keep in victims:
            log.warning("state checkpoint %s is larger than the state directory's budget of %d bytes; deleted",
                        keep, self.max_bytes)


# ---------------------------------------------------------------------------------------- block prefill
def row_slots(engine: Engine, n: int, block: int) -> int:
    """Cache slots a block-aligned prefill of n tokens writes: per call, the engine's padded layout of its tokens
    (`prefill_layout`); never fewer for a longer prompt."""
    def call(m: int) -> int:
        return prefill_layout([np.zeros(m, np.int32)], [0], engine.prefill_chunk)[0].shape[1]

    full, tail = divmod(n, block)
    return full * call(block) + (call(tail) if tail else 0)


class RowPrefill:
    """One prompt prefilled block-aligned into a batch-1 cache of `capacity` slots (module docstring), one
    `Engine.prefill` call per `step()`; with a `store`, restored from its deepest cached prefix first and
    snapshotting every new full block into it. With a `disk` store, restored from its deepest checkpoint on disk
    instead when that is deeper, and checkpointed there every `checkpoint_every` tokens (a multiple of `block`;
    only the deepest checkpoint of the prompt is kept). `cached_tokens`: prompt tokens restored (either store);
    `disk_tokens`: those restored from disk."""

    def __init__(self, engine: Engine, prompt: Sequence[int], *, block: int, capacity: int,
                 store: PrefixCache | None = None, disk: StateStore | None = None,
                 checkpoint_every: int | None = None):
        if store is not None and store.block != block:
            raise GenerationError(f"the prefix cache holds {store.block}-token blocks, the prefill runs {block}")
        if disk is not None and (checkpoint_every is None or checkpoint_every < block or checkpoint_every % block):
            raise GenerationError(f"checkpoint_every must be a positive multiple of the block {block}, got "
                                  f"{checkpoint_every!r}")
        self.engine, self.block, self.capacity = engine, int(block), int(capacity)
        [self.prompt] = engine._check_prompts([prompt])
        n = len(self.prompt)
        if row_slots(engine, n, block) > capacity:
            raise GenerationError(f"a prompt of {n} tokens does not fit a {capacity}-slot prefill cache")
        self.store, self.disk, self.checkpoint_every = store, disk, checkpoint_every
        self.keys = block_keys(self.prompt, block) if store is not None or disk is not None else []
        self._saved_key = None  # this prompt's checkpoint on disk written by this prefill
        restored = None
        if disk is not None:
            above = 0 if store is None else store.depth(self.keys)
            restored = disk.restore(engine, self.keys, capacity, above=above)
        if restored is not None:
            self._state, depth = restored
            self.cached_tokens = self.disk_tokens = self._next = depth * block
            self._slots = int(to_host(self._state.cache.length))
            if store is not None:
                store.lookup(())  # counted as a lookup that the memory tier did not serve
                self._remember(depth)
            return
        self.disk_tokens = 0
        entries = store.lookup(self.keys) if store is not None else []
        self.cached_tokens = self._next = len(entries) * block
        if entries:
            self._state = restore_blocks(engine, entries, self.cached_tokens, capacity)
            self._slots = sum(int(e.valid_W.shape[0]) for e in entries)
        else:
            self._state = EngineState(cache=init_cache(engine.config, 1, capacity, mesh=engine.mesh,
                                                       rules=engine.rules),
                                      positions_B=jnp.zeros((1,), jnp.int32),
                                      next_logits_BxV=jnp.zeros((1, engine.config.vocab_size), jnp.float32))
            self._slots = 0

    def _remember(self, depth: int) -> None:
        """Put the `depth` blocks restored from disk into the memory tier: pass-through entries (the blocks'
        K/V) and a complete last one, so later prompts with this prefix hit memory and the blocks after it chain
        on. Skipped when the memory tier cannot hold them all."""
        if depth * self.block > self.store.capacity_tokens:
            return
        width = self._slots // depth  # every full block's call writes the same slots
        for j in range(depth):
            last = j == depth - 1
            held = self.store.get(self.keys[j])
            if held is None or (last and not held.complete):
                self.store.insert(self.keys[:j + 1], snapshot_block(self._state, j * width, width, complete=last))

    @property
    def done(self) -> bool:
        return self._next >= len(self.prompt)

    def step(self) -> bool:
        """Run the next block (or the tail) of the prompt; returns True once the prompt is done."""
        start = self._next
        end = min(start + self.block, len(self.prompt))
        self._state = self.engine.prefill([self.prompt[start:end]], state=self._state, reserve=0,
                                          consume_state=True)
        written = int(to_host(self._state.cache.length))
        if self._state.cache.max_len != self.capacity:
            raise GenerationError(f"the prefill outgrew its {self.capacity}-slot cache")
        if self.store is not None and end - start == self.block:
            j = start // self.block
            if self.keys[j] not in self.store:
                self.store.insert(self.keys[:j + 1], snapshot_block(self._state, self._slots, written - self._slots))
        if self.disk is not None and end - start == self.block and end % self.checkpoint_every == 0:
            key = self.keys[end // self.block - 1]
            if self.disk.save(key, self._state, end, replaces=self._saved_key):
                self._saved_key = key
        self._next, self._slots = end, written
        return self.done

    def run(self) -> RowPrefill:
        """Every remaining step."""
        while not self.done:
            self.step()
        return self

    def state(self) -> EngineState:
        """The prefilled batch-1 engine state (after the last step)."""
        if not self.done:
            raise GenerationError("the prefill has steps left")
        return self._state

    def packed_cache(self) -> Cache:
        """The prefilled cache with its n valid slots moved to slots 0 … n−1, in order (the calls' padding slots
        removed; the capacity kept, so one compiled shape): slot t holds token t, `length` = n — the layout a pool
        that right-aligns a row's written slots expects."""
        cache = self.state().cache
        idx = np.nonzero(to_host(cache.valid_BxS[0]))[0]
        src_S = np.zeros(cache.max_len, np.int32)
        src_S[:len(idx)] = idx
        return _pack_slots(cache, jnp.asarray(src_S), jnp.asarray(len(idx), jnp.int32))


@jax.jit
def _pack_slots(cache: Cache, src_S: jax.Array, n) -> Cache:
    """Slot j ← slot `src_S[j]` for j < n, empty (zero, invalid) beyond; `length` = n."""
    def move(x, axis):
        keep = (jnp.arange(x.shape[axis]) < n).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return jnp.where(keep, jnp.take(x, src_S, axis=axis), jnp.zeros((), x.dtype))

    return cache.map_slots(move).replace(length=n)


def prefill_prompt(engine: Engine, prompt: Sequence[int], *, block: int, capacity: int,
                   store: PrefixCache | None = None, disk: StateStore | None = None,
                   checkpoint_every: int | None = None) -> tuple[EngineState, int]:
    """`RowPrefill` run to the end: the batch-1 state after `prompt` and the tokens restored (`store`, `disk`)."""
    run = RowPrefill(engine, prompt, block=block, capacity=capacity, store=store, disk=disk,
                     checkpoint_every=checkpoint_every).run()
    return run.state(), run.cached_tokens
