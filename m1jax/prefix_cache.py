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
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.cache import Cache, init_cache
from m1jax.generation import Engine, EngineState, GenerationError, prefill_layout, to_host


@dataclasses.dataclass(frozen=True)
class PrefixEntry:
    """One cached block: per layer the `(k, v)` `[W, K, D]` of the W slots the block's call wrote (softmax) or
    the state `[H, D, D]` after it (lightning); those slots' validity `[W]`; the fp32 next-token logits `[V]`."""

    layers: tuple
    valid_W: jax.Array
    logits_V: jax.Array


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

    def lookup(self, keys: Sequence[bytes]) -> list[PrefixEntry]:
        """The entries of the longest cached run keys[0], keys[1], … (touched; counted as one lookup)."""
        chain = []
        for k in keys:
            if (entry := self._entries.get(k)) is None:
                break
            chain.append(entry)
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
@partial(jax.jit, static_argnums=(2,))
def _slice_slots(cache: Cache, start, width: int) -> tuple:
    """Row 0's slots [start, start + width): per layer `(k, v)` `[W, K, D]` or the lightning state; validity."""
    layers = tuple(tuple(jax.lax.dynamic_slice_in_dim(x[0], start, width, axis=0) for x in layer)
                   if isinstance(layer, tuple) else layer[0] for layer in cache.per_layer())
    return layers, jax.lax.dynamic_slice_in_dim(cache.valid_BxS[0], start, width, axis=0)


def snapshot_block(state: EngineState, start: int, width: int) -> PrefixEntry:
    """The entry of a block whose call just wrote slots [start, start + width) of a batch-1 state."""
    layers, valid_W = _slice_slots(state.cache, jnp.asarray(start, jnp.int32), width)
    return PrefixEntry(layers=layers, valid_W=valid_W, logits_V=state.next_logits_BxV[0])


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
    snapshotting every new full block into it. `cached_tokens`: prompt tokens restored from the store."""

    def __init__(self, engine: Engine, prompt: Sequence[int], *, block: int, capacity: int,
                 store: PrefixCache | None = None):
        if store is not None and store.block != block:
            raise GenerationError(f"the prefix cache holds {store.block}-token blocks, the prefill runs {block}")
        self.engine, self.block, self.capacity = engine, int(block), int(capacity)
        [self.prompt] = engine._check_prompts([prompt])
        n = len(self.prompt)
        if row_slots(engine, n, block) > capacity:
            raise GenerationError(f"a prompt of {n} tokens does not fit a {capacity}-slot prefill cache")
        self.store = store
        self.keys = block_keys(self.prompt, block) if store is not None else []
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
                   store: PrefixCache | None = None) -> tuple[EngineState, int]:
    """`RowPrefill` run to the end: the batch-1 state after `prompt` and the tokens restored from `store`."""
    run = RowPrefill(engine, prompt, block=block, capacity=capacity, store=store).run()
    return run.state(), run.cached_tokens
