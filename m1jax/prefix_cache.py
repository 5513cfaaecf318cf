"""The hybrid prefix cache: lightning states and softmax K/V snapshotted at block boundaries of a prompt's
prefill, keyed by the token prefix, so a prompt that shares a cached prefix prefills only the rest.

A prompt of n tokens is prefilled block-aligned (`RowPrefill`): block j = tokens [jC, (j+1)C) is one
`forward_chunk` call of C = `block` tokens at positions jC…, written to cache slots jC…; the n mod C tokens
after the last full block are one more call, left-padded to the length bucket (at most C). The batch-1 cache has
the same `capacity` for every prompt. After block j the cache holds, besides K/V, each lightning layer's state
S_j = Σ_{t < (j+1)C} decay^{…} k_tᵀ v_t — a function of the prefix alone — so the snapshot

    entry_j = (K/V of slots [jC, (j+1)C) per softmax layer, S_j per lightning layer, next-token logits)

is keyed by the hash chain h_j = SHA-256(h_{j−1} ‖ tokens of block j) (h_{−1} = ""), which names the whole
prefix [0, (j+1)C). A newcomer looks up h_0, h_1, … and restores the deepest consecutive hit d: K/V of blocks
0…d−1 into slots [0, dC), the lightning states S_{d−1}, the logits. Every call it then makes — blocks d… and the
tail — is the call the uncached prefill makes at that point, on the same inputs and the same shapes, so the
result is bit-identical to prefilling without the cache (greedy tokens and log-probs exactly equal).

The store is LRU-bounded by `capacity_tokens` (C tokens per entry). A prefix is touched deepest first, root
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
from m1jax.generation import Engine, EngineState, GenerationError, _bucket, _forward_chunk


@dataclasses.dataclass(frozen=True)
class PrefixEntry:
    """One cached block: per layer the block's `(k, v)` `[C, K, D]` (softmax) or the state `[H, D, D]` after it
    (lightning), and the fp32 next-token logits `[V]` after it."""

    layers: tuple
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
def snapshot_block(cache: Cache, logits_1xV: jax.Array, start: int, block: int) -> PrefixEntry:
    """The entry of the block at slots [start, start + block) of a batch-1 cache just after that block's call."""
    return PrefixEntry(layers=_slice_block(cache, jnp.asarray(start, jnp.int32), block), logits_V=logits_1xV[0])


def _slice_block_impl(cache: Cache, start, block: int) -> tuple:
    layers = []
    for layer in cache.per_layer():
        if isinstance(layer, tuple):
            layers.append(tuple(jax.lax.dynamic_slice_in_dim(x[0], start, block, axis=0) for x in layer))
        else:
            layers.append(layer[0])
    return tuple(layers)


_slice_block = jax.jit(_slice_block_impl, static_argnums=(2,))


@partial(jax.jit, static_argnums=(3,))
def _restore(cache: Cache, layers: tuple, logits_V: jax.Array, n: int) -> tuple[Cache, jax.Array]:
    """An empty batch-1 cache with blocks 0…d−1 (n = dC slots) restored: `layers` per layer the K/V of slots
    [0, n) (`[n, K, D]`) or the lightning state after block d−1; returns the cache and the logits `[1, V]`."""
    out = []
    for empty, saved in zip(cache.per_layer(), layers, strict=True):
        if isinstance(empty, tuple):
            out.append(tuple(jax.lax.dynamic_update_slice_in_dim(e, s[None].astype(e.dtype), 0, axis=1)
                             for e, s in zip(empty, saved, strict=True)))
        else:
            out.append(saved[None].astype(empty.dtype))
    valid = cache.valid_BxS.at[:, :n].set(True)
    restored = Cache.from_per_layer(tuple(out), valid, jnp.asarray(n, jnp.int32), groups=cache.groups)
    return restored, logits_V[None]


def restore_blocks(engine: Engine, entries: Sequence[PrefixEntry], block: int,
                   capacity: int) -> tuple[Cache, jax.Array]:
    """A batch-1 cache of `capacity` slots holding the prefix of `entries` (consecutive blocks from block 0),
    bit-identical to the cache after prefilling those blocks; and the next-token logits `[1, V]`."""
    layers = tuple(tuple(jnp.concatenate([e.layers[i][t] for e in entries]) for t in range(2))
                   if isinstance(entries[0].layers[i], tuple) else entries[-1].layers[i]
                   for i in range(len(entries[0].layers)))
    empty = init_cache(engine.config, 1, capacity, mesh=engine.mesh, rules=engine.rules)
    with engine._on_mesh():
        return _restore(empty, layers, entries[-1].logits_V, len(entries) * block)


# ---------------------------------------------------------------------------------------- block prefill
class RowPrefill:
    """One prompt prefilled block-aligned into a batch-1 cache of `capacity` slots (module docstring), one call
    per `step()`; with a `store`, restored from its deepest cached prefix first and snapshotting every new full
    block into it. `cached_tokens`: prompt tokens restored from the store."""

    def __init__(self, engine: Engine, prompt: Sequence[int], *, block: int, capacity: int,
                 store: PrefixCache | None = None):
        if store is not None and store.block != block:
            raise GenerationError(f"the prefix cache holds {store.block}-token blocks, the prefill runs {block}")
        self.engine, self.block = engine, int(block)
        self.prompt = np.asarray(prompt, np.int32)
        n = len(self.prompt)
        full = n // block
        tail = n - full * block
        width = min(block, _bucket(tail)) if tail else 0
        self.length = full * block + width  # cache slots the prefill writes
        if n == 0 or self.length > capacity:
            raise GenerationError(f"a prompt of {n} tokens does not fit a {capacity}-slot prefill cache"
                                  if n else "the prompt is empty")
        self.store = store
        self.keys = block_keys(self.prompt, block) if store is not None else []
        entries = store.lookup(self.keys) if store is not None else []
        self.cached_tokens = len(entries) * block
        if entries:
            self.cache, self.logits_1xV = restore_blocks(engine, entries, block, capacity)
        else:
            self.cache = init_cache(engine.config, 1, capacity, mesh=engine.mesh, rules=engine.rules)
            self.logits_1xV = jnp.zeros((1, engine.config.vocab_size), jnp.float32)
        self._calls = [(j * block, block) for j in range(len(entries), full)] + ([(full * block, width)] if tail
                                                                                  else [])

    @property
    def done(self) -> bool:
        return not self._calls

    def step(self) -> bool:
        """Run the next call (a block or the tail); returns True once the prompt is done."""
        start, width = self._calls.pop(0)
        real = min(width, len(self.prompt) - start)
        tokens = np.zeros((1, width), np.int32)
        positions = np.zeros((1, width), np.int32)
        valid = np.zeros((1, width), bool)
        tokens[0, width - real:] = self.prompt[start:start + real]
        positions[0, width - real:] = np.arange(start, start + real)
        valid[0, width - real:] = True
        e = self.engine
        with e._on_mesh():
            self.cache, self.logits_1xV = _forward_chunk(e.graphdef, e.params, self.cache, jnp.asarray(tokens),
                                                         jnp.asarray(positions), jnp.asarray(valid))
        if self.store is not None and real == self.block:
            j = start // self.block
            if self.keys[j] not in self.store:
                self.store.insert(self.keys[:j + 1], snapshot_block(self.cache, self.logits_1xV, start, self.block))
        return self.done

    def packed_cache(self) -> Cache:
        """The prefilled cache cut to the prompt's n slots, in order (the tail call's left padding removed): every
        slot valid, slot t holding token t — the layout a pool that right-aligns rows of n slots expects."""
        if not self.done:
            raise GenerationError("the prefill has calls left")
        n = len(self.prompt)
        gap = self.length - n  # padding slots in front of the tail
        keep = n - n % self.block  # slots of the full blocks
        return _pack(self.cache, keep, gap, n)

    def state(self) -> EngineState:
        """The prefilled batch-1 engine state (after the last step)."""
        if not self.done:
            raise GenerationError("the prefill has calls left")
        return EngineState(cache=self.cache, positions_B=jnp.asarray([len(self.prompt)], jnp.int32),
                           next_logits_BxV=self.logits_1xV)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _pack(cache: Cache, keep: int, gap: int, n: int) -> Cache:
    """Slots [0, keep) and [keep + gap, n + gap) of a batch-1 cache, as one cache of n slots."""
    def cut(x, axis):
        head = jax.lax.slice_in_dim(x, 0, keep, axis=axis)
        tail = jax.lax.slice_in_dim(x, keep + gap, n + gap, axis=axis)
        return jnp.concatenate([head, tail], axis=axis)

    return cache.map_slots(cut).replace(length=jnp.asarray(n, jnp.int32))


def prefill_prompt(engine: Engine, prompt: Sequence[int], *, block: int, capacity: int,
                   store: PrefixCache | None = None) -> tuple[EngineState, int]:
    """`RowPrefill` run to the end: the batch-1 state after `prompt` and the tokens restored from `store`."""
    [row] = engine._check_prompts([prompt])
    run = RowPrefill(engine, row, block=block, capacity=capacity, store=store)
    while not run.done:
        run.step()
    return run.state(), run.cached_tokens
