"""Continuous batching on one `Engine`: a fixed pool of sequence slots that requests join and leave between
decode bursts.

Design (the model and the cache format stay those of `Engine`):

* The pool is one `EngineState` of batch `slots` whose cache has `capacity` = `context_window` + `decode_steps`
  slots on ONE timeline shared by all rows (`cache.length` = L, the slot the next token of every row is written
  to). A request occupies one row; its tokens fill the row's slots L − span … L − 1 (span = prompt + tokens
  fed so far); the other slots of the row are invalid, so they never enter a softmax score. RoPE positions
  are per row, so where a row's tokens sit on the timeline does not change its numerics (summation order
  aside).
* A newcomer is prefilled in its own batch-1 state (the engine's prefill layout: left-padded, chunked), at most
  `prefill_chunk` tokens per `step()`, between the decode bursts of the running rows. When its prompt is done
  it is inserted into its row right-aligned to the pool's L: its lightning states replace the row's, its K/V
  and valid mask are placed at slots L − P … L − 1 (P its padded length) and every other slot of the row is
  made invalid — nothing of the row's previous request survives (`_insert_row`). If L is shorter than the
  prompt, the whole timeline first moves right; when a burst would run past the capacity, or when more than
  half of the timeline lies before every live row (slots each softmax decode step would read for nothing), it
  moves left by the smallest start of a live row (`_shift_slots`, both jitted).
* With `prefix_cache_tokens` > 0 a newcomer is instead prefilled block-aligned (block = `prefill_chunk`) through
  `m1jax.prefix_cache.RowPrefill`: it restores the deepest cached prefix of its prompt (lightning states, K/V,
  logits) and snapshots its new full blocks; its row then holds exactly its n prompt tokens (`packed_cache`).
* Decoding runs the engine's own decode loop (`generation._decode_loop`, the step body `decode_step` shared
  with `Engine.generate`) for bursts of ≤ `decode_steps` steps: per-row key streams `step_keys(seed, n_gen)`,
  stop tokens, length, repetition, thinking budgets and top log-probs all happen there. Between bursts the
  host detokenizes incrementally (`RowText`, UTF-8-safe), checks stop strings, streams `Delta`s, frees the
  slots of finished and cancelled requests and admits waiting ones.
* Compacted bursts (`Scheduler.compact`, on by default on CPU without a mesh): a burst runs only the live rows,
  gathered into a batch of `compact_rows(live, slots)` rows and written back after it (`_decode_rows`), since
  on CPU a decode step's cost grows with its rows (attention over each row's cache slots, the LM head, the
  per-row expert branches) even when most are idle. On TPU/GPU a step costs about the same for any batch up to
  the pool, so the whole pool decodes (one compiled loop).
* Routing: each slot decodes with its request's `expert_threshold` (`sp["expert_threshold_B"]`); the prefill
  chunks and decode bursts record every token's routed experts, from which `RequestOutput.routing` (the
  request's routing log, `moe.routing_log`) and, when asked, `RequestOutput.routed_experts` are made. Requests
  with a threshold < 1 or asking for routed experts skip the prefix cache (it holds exact-routing states and no
  routing record); for the others its restored and block prefills are not in the routing log.
* With a `state_dir` the block-aligned prefill also checkpoints the row's state to disk every `checkpoint_every`
  tokens and a newcomer restores the deepest checkpoint of its prompt (`m1jax.prefix_cache.StateStore`): a long
  prefill interrupted by a kill resumes there when the request comes again, and prefixes stay cached across
  restarts (at most `state_max_bytes` on disk).

So a request's greedy tokens equal those of `Engine.generate` of its prompt alone, and its log-probs agree to
fp32 rounding (different prefill chunking and slot placement change summation order only).
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.cache import Cache, init_cache
from m1jax.generation import (
    FINISH_REASONS,
    TOP_LOGPROBS,
    XLA_CPU_COMPILER_OPTIONS,
    Engine,
    EngineState,
    GenerationError,
    RowProgress,
    RowText,
    _bucket,
    _decode_loop,
    _forward_chunk,
    _round_up,
    expert_thresholds,
    prefill_layout,
    reasoning_count,
    sampling_arrays,
    to_host,
)
from m1jax.modules.moe import routing_log
from m1jax.prefix_cache import PrefixCache, RowPrefill, StateStore, block_keys, row_slots, store_fingerprint
from m1jax.sampling import SamplingParams

DEFAULT_CONTEXT = 32_768  # context_window when none is given (capped by the engine's max_len)
DEFAULT_CHECKPOINT_TOKENS = 65_536  # state checkpoints every this many tokens (rounded to the prefill chunk)
DEFAULT_STATE_BYTES = 20 << 30  # disk budget of a state directory
_IDLE = SamplingParams(temperature=0.0, max_new_tokens=1, stop_token_ids=(), repetition_stop=None)
_STOP_STRING = FINISH_REASONS.index("stop_string")
COMPACT_EXACT = 8  # compacted decode bursts run exactly the live rows up to this many (`compact_rows`)


@dataclasses.dataclass
class Request:
    """One generation request: prompt token ids and how to sample (see `scheduler_contract.md`)."""

    prompt: list[int]
    sampling: SamplingParams
    request_id: str | None = None
    thinking_budget: int | None = None
    expert_threshold: float = 1.0
    top_logprobs: int = 0
    return_routed_experts: bool = False


@dataclasses.dataclass
class Delta:
    """One streamed increment of a request: its new tokens, their model log-probs (and top alternatives), the
    newly complete text; `finish_reason` is set on the last one."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    text: str
    finish_reason: str | None


@dataclasses.dataclass
class RequestOutput:
    """The finished request (fields as in `scheduler_contract.md`). `routing`: the routing log of the tokens the
    request ran through the model (prompt and generated; `moe.routing_log`: per layer tokens per expert, the
    fractions of tokens that used 1 … k experts, expert FLOPs and FLOPs saved); `routed_experts` (when asked):
    int32 `[prompt + generated tokens, layers, k]`, −1 for a dropped expert."""

    request_id: str
    prompt_tokens: int
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    text: str | None
    finish_reason: str
    reasoning_tokens: int
    cached_tokens: int = 0
    routing: dict | None = None
    routed_experts: np.ndarray | None = None


class RequestHandle:
    """The caller's side of a submitted request: stream its `Delta`s or wait for its `RequestOutput`."""

    def __init__(self, request_id: str, scheduler: Scheduler):
        self.request_id = request_id
        self._scheduler = scheduler
        self._deltas: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None

    def deltas(self, timeout: float | None = None) -> Iterator[Delta]:
        """The request's deltas as they come (blocking; `timeout` per delta, TimeoutError past it); ends after
        the one with a `finish_reason`."""
        while True:
            try:
                d = self._deltas.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no output of request {self.request_id} within {timeout} s") from None
            if isinstance(d, BaseException):
                raise GenerationError(f"request {self.request_id} failed: {d}") from d
            yield d
            if d.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The finished request (blocks until it finishes; TimeoutError past `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished within {timeout} s")
        if self._error is not None:
            raise GenerationError(f"request {self.request_id} failed: {self._error}") from self._error
        return self._output

    def cancel(self) -> None:
        """Stop the request (its slot is freed at the scheduler's next step; finish_reason "cancelled")."""
        self._scheduler.cancel(self.request_id)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, output: RequestOutput, last: Delta) -> None:
        self._output = output
        self._deltas.put(last)
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._deltas.put(error)
        self._done.set()


@dataclasses.dataclass
class _Job:
    """A request inside the scheduler: waiting, prefilling (slot reserved) or decoding in its slot."""

    request: Request
    handle: RequestHandle
    prompt: np.ndarray
    budget: int | None
    text: RowText
    slot: int | None = None
    live: bool = False  # decoding in the pool
    layout: tuple | None = None  # prefill: (tokens, positions, valid, call lengths) of `prefill_layout`
    calls_done: int = 0  # prefill progress: calls of `layout` run
    row_cache: Cache | None = None
    row_logits: jax.Array | None = None
    prefill: RowPrefill | None = None  # prefill through the prefix cache
    prefetch: object = None  # the read-ahead of its state checkpoint (a Future), False when there is none
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    span: int = 0  # tokens of the row on the pool's timeline
    emitted: int = 0  # characters of text streamed
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    routed: list = dataclasses.field(default_factory=list)  # routed experts [n, layers, k] per prefill chunk / burst


# ------------------------------------------------------------------------------------------ pool kernels
def _move_slots(x: jax.Array, src_S: jax.Array, ok_S: jax.Array, axis: int) -> jax.Array:
    """`x` with slot j (along `axis`) taken from slot `src_S[j]`, empty (zero / invalid) where `ok_S` is False."""
    y = jnp.take(x, jnp.clip(src_S, 0, x.shape[axis] - 1), axis=axis)
    shape = [1] * y.ndim
    shape[axis] = y.shape[axis]
    return jnp.where(ok_S.reshape(shape), y, jnp.zeros((), y.dtype))


@partial(jax.jit, donate_argnums=(0,))
def _shift_slots(cache: Cache, d) -> Cache:
    """The timeline moved by `d` slots (right for d > 0, left for d < 0): slot j holds old slot j − d; slots with
    no source are empty and invalid. `length` moves with it."""
    src_S = jnp.arange(cache.max_len) - d
    ok_S = (src_S >= 0) & (src_S < cache.max_len)
    return cache.map_slots(lambda x, axis: _move_slots(x, src_S, ok_S, axis)).replace(length=cache.length + d)


@partial(jax.jit, donate_argnums=(0,))
def _insert_row(pool: EngineState, row_cache: Cache, row_logits_1xV, slot, length, n_tokens) -> EngineState:
    """Row `slot` of the pool replaced by a prefilled batch-1 state, right-aligned to `length`: its lightning
    states copied, its P = `row_cache.length` written slots placed at pool slots length − P … length − 1, every
    other slot of the row empty and invalid; the row's next RoPE position is `n_tokens`, its next-token logits
    `row_logits_1xV`."""
    groups = pool.cache.groups
    b_axis = 1 if groups else 0
    written = row_cache.length
    src_S = jnp.arange(pool.cache.max_len) - (length - written)
    ok_S = (src_S >= 0) & (src_S < written)

    def put(pool_x, row_x, b_ax, s_ax):
        r = row_x if s_ax is None else _move_slots(row_x, src_S, ok_S, s_ax)
        return jax.lax.dynamic_update_slice_in_dim(pool_x, r.astype(pool_x.dtype), slot, axis=b_ax)

    layers = tuple(tuple(put(p, r, b_axis, b_axis + 1) for p, r in zip(pl, rl, strict=True))
                   if isinstance(pl, tuple) else put(pl, rl, b_axis, None)
                   for pl, rl in zip(pool.cache.layers, row_cache.layers, strict=True))
    cache = pool.cache.replace(layers=layers, valid_BxS=put(pool.cache.valid_BxS, row_cache.valid_BxS, 0, 1),
                               length=jnp.asarray(length, jnp.int32))
    return EngineState(cache=cache, positions_B=pool.positions_B.at[slot].set(n_tokens),
                       next_logits_BxV=pool.next_logits_BxV.at[slot].set(row_logits_1xV[0]))


def compact_rows(live: int, slots: int) -> int:
    """Rows of a compacted decode burst with `live` live rows: `live` itself up to `COMPACT_EXACT`, else the next
    power of two, at most `slots` (so at most `COMPACT_EXACT` + log2(slots) decode loops are compiled)."""
    return live if live <= COMPACT_EXACT else min(slots, 1 << (live - 1).bit_length())


def _set_rows(x: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A copy of `x` with entries `idx` set to `rows`."""
    y = np.array(x)
    y[idx] = rows
    return y


def _per_row(key: str) -> bool:
    """Whether the decode-loop setting `key` (`sampling_arrays`) has one entry per row (shape suffix `_B…`)."""
    return key.endswith("_B") or "_Bx" in key


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("record",), donate_argnums=(3,),
         compiler_options=XLA_CPU_COMPILER_OPTIONS)
def _decode_rows(graphdef, n_top: int, params, pool: EngineState, prog: RowProgress, sp: dict, max_steps,
                 rows_R, *, record: bool = False):
    """`_decode_loop` on rows `rows_R` of the pool only, as a batch of R rows: (outputs `[R, C]`, the pool with
    those rows written back and the timeline advanced, their progress `[R]`). The pool's other rows are left
    as they were."""
    b_axis = 1 if pool.cache.groups else 0

    def put(x, y, axis):
        return x.at[(slice(None),) * axis + (rows_R,)].set(y)

    sub = EngineState(
        cache=pool.cache.replace(layers=jax.tree.map(lambda x: jnp.take(x, rows_R, axis=b_axis), pool.cache.layers),
                                 valid_BxS=pool.cache.valid_BxS[rows_R]),
        positions_B=pool.positions_B[rows_R], next_logits_BxV=pool.next_logits_BxV[rows_R])
    sub_prog = jax.tree.map(lambda x: jnp.asarray(x)[rows_R], prog)
    sub_sp = {k: v[rows_R] if _per_row(k) else v for k, v in sp.items()}
    loop = _decode_loop.__wrapped__  # the loop's body traced here (a nested jit may not carry compiler options)
    outs, sub, sub_prog = loop(graphdef, n_top, params, sub, sub_prog, sub_sp, max_steps, record=record)
    cache = pool.cache.replace(
        layers=jax.tree.map(lambda x, y: put(x, y, b_axis), pool.cache.layers, sub.cache.layers),
        valid_BxS=put(pool.cache.valid_BxS, sub.cache.valid_BxS, 0), length=sub.cache.length)
    return outs, EngineState(cache=cache, positions_B=put(pool.positions_B, sub.positions_B, 0),
                             next_logits_BxV=put(pool.next_logits_BxV, sub.next_logits_BxV, 0)), sub_prog


# --------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Continuous batching over `engine` (see the module docstring for the design).

    `slots` rows decode together; `context_window` bounds prompt + max_new_tokens of a request (default: the
    engine's max_len, at most `DEFAULT_CONTEXT`); each `step()` runs ≤ `prefill_chunk` prompt tokens of one
    newcomer and one decode burst of ≤ `decode_steps` steps (`compact`: of the live rows only, see the module
    docstring). `state_dir`: checkpoint long prefills there every
    `checkpoint_every` tokens (a multiple of `prefill_chunk`; default about `DEFAULT_CHECKPOINT_TOKENS`) and
    restore from them, within `state_max_bytes` on disk."""

    def __init__(self, engine: Engine, *, slots: int = 8, context_window: int | None = None,
                 prefill_chunk: int = 256, decode_steps: int = 4, prefix_cache_tokens: int = 0,
                 state_dir=None, checkpoint_every: int | None = None, state_max_bytes: int = DEFAULT_STATE_BYTES):
        for name, value in (("slots", slots), ("prefill_chunk", prefill_chunk), ("decode_steps", decode_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise GenerationError(f"{name} must be an integer ≥ 1, got {value!r}")
        pct = prefix_cache_tokens
        if isinstance(pct, bool) or not isinstance(pct, (int, np.integer)) or pct < 0:
            raise GenerationError(f"prefix_cache_tokens must be an integer ≥ 0, got {pct!r}")
        cw = min(engine.max_len, DEFAULT_CONTEXT) if context_window is None else context_window
        if isinstance(cw, bool) or not isinstance(cw, (int, np.integer)) or not 2 <= cw <= engine.max_len:
            raise GenerationError(f"context_window must be an integer in [2, {engine.max_len}] (the engine's "
                                  f"max_len), got {context_window!r}")
        self.engine, self.config = engine, engine.config
        self.slots, self.context_window = int(slots), int(cw)
        self.prefill_chunk, self.decode_steps = int(prefill_chunk), int(decode_steps)
        self.capacity = _round_up(self.context_window + self.decode_steps, 8)
        self._row_slots = _round_up(self.context_window, self.prefill_chunk)  # a newcomer's cache (one shape)
        # With a prefix cache newcomers prefill block-aligned (`m1jax.prefix_cache`, block = prefill_chunk).
        self.prefix_cache = PrefixCache(self.prefill_chunk, int(pct)) if pct else None
        self.checkpoint_every = self._checkpoint_every(state_dir, checkpoint_every, state_max_bytes)
        if self.prefix_cache is not None or state_dir is not None:
            self._row_slots = row_slots(engine, self.context_window, self.prefill_chunk)
        self.state_store = None if state_dir is None else StateStore(
            state_dir, max_bytes=int(state_max_bytes),
            fingerprint=store_fingerprint(engine, self.prefill_chunk, self._row_slots))
        self.shifts = 0  # timeline moves so far (left or right)
        self.compact = engine.mesh is None and jax.default_backend() == "cpu"
        self._reset_pool()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cancels: set[str] = set()
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._generated = 0
        self._busy_s = 0.0

    def _checkpoint_every(self, state_dir, checkpoint_every, max_bytes) -> int | None:
        """The validated state-directory options' tokens between checkpoints (None without a `state_dir`)."""
        chunk = self.prefill_chunk
        if state_dir is None:
            if checkpoint_every is not None:
                raise GenerationError("checkpoint_every needs a state_dir")
            return None
        every = chunk * max(1, DEFAULT_CHECKPOINT_TOKENS // chunk) if checkpoint_every is None else checkpoint_every
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < chunk or every % chunk:
            raise GenerationError(f"checkpoint_every must be a positive multiple of prefill_chunk {chunk}, got "
                                  f"{checkpoint_every!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise GenerationError(f"state_max_bytes must be an integer ≥ 0, got {max_bytes!r}")
        return int(every)

    def _reset_pool(self) -> None:
        """An empty pool: every slot free, the cache zeroed."""
        c, e = self.config, self.engine
        self._state = EngineState(
            cache=init_cache(c, self.slots, self.capacity, mesh=e.mesh, rules=e.rules),
            positions_B=jnp.zeros((self.slots,), jnp.int32),
            next_logits_BxV=jnp.zeros((self.slots, c.vocab_size), jnp.float32))
        self._prog = RowProgress.start(self.slots, finished=True)
        self._length = 0
        self._jobs: list[_Job | None] = [None] * self.slots
        self._prefilling: _Job | None = None
        self._sp: dict | None = None

    # ------------------------------------------------------------------------------------ public API
    def submit(self, request: Request) -> RequestHandle:
        """Queue `request`; returns its handle. `GenerationError` (naming the field) on bad input."""
        job = self._validate(request)
        with self._lock:
            if job.request.request_id in self._ids:
                raise GenerationError(f"request_id {job.request.request_id!r} is already in use")
            self._ids.add(job.request.request_id)
            self._waiting.append(job)
            self._wake.notify_all()
        return job.handle

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (its slot freed, finish_reason "cancelled"); unknown or finished ids
        are ignored."""
        with self._lock:
            if request_id in self._ids:
                self._cancels.add(request_id)
                self._wake.notify_all()

    def step(self) -> bool:
        """One iteration: cancellations; prefill chunks of newcomers (admitted while slots are free) up to
        `prefill_chunk` prompt tokens in all; one decode burst. Returns False when nothing is left to do."""
        with self._step_lock:
            t0 = time.perf_counter()
            with self._lock:
                cancels, self._cancels = self._cancels, set()
            for rid in cancels:
                self._cancel_now(rid)
            budget, worked = self.prefill_chunk, False
            while budget > 0:
                self._admit()
                ran = self._prefill_chunk()
                if ran is None:
                    break
                budget, worked = budget - ran, True
            worked = self._decode_burst() or worked
            if worked:
                self._busy_s += time.perf_counter() - t0
            return self._pending()

    def run(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Submit all `requests`, step until they finish (or wait for the background thread); outputs in order."""
        handles = [self.submit(r) for r in requests]
        while not all(h.done for h in handles):
            if self._thread is None:
                self.step()
            else:
                handles[[h.done for h in handles].index(False)]._done.wait(0.05)
        return [h.result() for h in handles]

    def start(self) -> None:
        """Drive `step()` from a background thread (a server's loop) until `shutdown()`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="m1jax-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; requests still pending finish as "cancelled"."""
        if self._thread is not None:
            with self._lock:
                self._stopping = True
                self._wake.notify_all()
            self._thread.join()
            self._thread = None
        with self._lock:
            self._cancels |= set(self._ids)
        self.step()
        if self.state_store is not None:
            self.state_store.flush()

    def warmup(self) -> None:
        """Compile what serving runs before any request arrives, so that no request waits on a compile: the decode
        burst for every batch a burst can take (the whole pool and, with `compact`, each `compact_rows` bucket;
        without top log-probs) and a newcomer's prefill chunk of every length the scheduler uses up to
        `prefill_chunk` (the block-aligned prefill of a prefix cache or state directory compiles on first use).
        Call it before `start()`; the pool stays empty."""
        if any(j is not None for j in self._jobs) or self._waiting:
            raise GenerationError("warmup() needs an idle scheduler (call it before submitting requests)")
        e, c = self.engine, self.config
        buckets = sorted({compact_rows(n, self.slots) if self.compact else self.slots for n in
                          range(1, self.slots + 1)})
        with e._on_mesh():
            for rows in buckets:  # every row finished: each loop compiles and runs no step
                self._run_burst(0, self._prog, None if rows == self.slots else np.arange(rows, dtype=np.int32))
            if self.prefix_cache is None and self.state_store is None:
                chunks = sorted({min(self.prefill_chunk, _bucket(n)) for n in range(1, self.prefill_chunk + 1)})
                for chunk in chunks:
                    row = init_cache(c, 1, self._row_slots, mesh=e.mesh, rules=e.rules)
                    zeros = jnp.zeros((1, chunk), jnp.int32)
                    row, logits, _ = _forward_chunk(e.graphdef, e.params, row, zeros, zeros, zeros.astype(bool),
                                                    None, record=True)
                self._state = _insert_row(self._state, row, logits, 0, self._length, 0)
        jax.block_until_ready(self._state)

    def stats(self) -> dict:
        """Queue and throughput counters: waiting, running, slots, generated_tokens, tokens_per_s (generated
        tokens over the time steps had work), prefix_lookups, prefix_hits; with a state directory state_written,
        state_skipped, state_restores, state_prefetched, state_restored_tokens, state_ignored, state_bytes
        (`StateStore`)."""
        with self._lock:
            waiting = len(self._waiting)
        running = sum(j is not None for j in self._jobs)
        return {"waiting": waiting, "running": running, "slots": self.slots, "generated_tokens": self._generated,
                "tokens_per_s": self._generated / self._busy_s if self._busy_s else 0.0,
                "prefix_lookups": self.prefix_cache.lookups if self.prefix_cache else 0,
                "prefix_hits": self.prefix_cache.hits if self.prefix_cache else 0,
                **({f"state_{k}": getattr(store, k) for k in ("written", "skipped", "restores", "prefetched",
                                                               "restored_tokens", "ignored", "bytes")}
                   if (store := self.state_store) is not None else {})}

    # ------------------------------------------------------------------------------------ validation
    def _validate(self, request: Request) -> _Job:
        if not isinstance(request, Request):
            raise GenerationError(f"submit takes a Request, got {type(request).__name__}")
        if not isinstance(request.sampling, SamplingParams):
            raise GenerationError("sampling must be an m1jax.sampling.SamplingParams")
        [prompt] = self.engine._check_prompts([request.prompt], label="prompt")
        sp = request.sampling
        if len(prompt) + sp.max_new_tokens > self.context_window:
            raise GenerationError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({sp.max_new_tokens}) exceeds "
                                  f"the context_window {self.context_window}")
        k = request.top_logprobs
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= TOP_LOGPROBS:
            raise GenerationError(f"top_logprobs must be an integer in [0, {TOP_LOGPROBS}], got {k!r}")
        [budget] = self.engine.thinking_budgets(request.thinking_budget, 1)
        expert_thresholds(request.expert_threshold, 1)  # GenerationError unless a number in (0, 1]
        if sp.stop_strings and self.engine.tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (Engine(model, tokenizer))")
        if request.request_id is not None and not isinstance(request.request_id, str):
            raise GenerationError(f"request_id must be a string or None, got {type(request.request_id).__name__}")
        request = dataclasses.replace(request, request_id=request.request_id or uuid.uuid4().hex)
        return _Job(request=request, handle=RequestHandle(request.request_id, self), prompt=prompt, budget=budget,
                    text=RowText(self.engine.tokenizer, sp.stop_strings))

    # ------------------------------------------------------------------------------------ iteration parts
    def _pending(self) -> bool:
        with self._lock:
            return bool(self._waiting) or self._prefilling is not None or any(j is not None for j in self._jobs)

    def _block_aligned(self, job: _Job) -> bool:
        """Whether `job` is prefilled through the prefix cache / state directory. They hold exact-routing states
        and no routing record: a request with a threshold, or one that wants every token's routed experts, is
        prefilled on its own."""
        return (self.prefix_cache is not None or self.state_store is not None) \
            and job.request.expert_threshold >= 1.0 and not job.request.return_routed_experts

    def _admit(self) -> None:
        """Start prefilling the next waiting request when no prefill runs and a slot is free. While its state
        checkpoint is read from disk (`StateStore.prefetch`) and other requests decode, it waits."""
        if self._prefilling is not None or None not in self._jobs:
            return
        with self._lock:
            if not self._waiting:
                return
            job = self._waiting[0]
        if self.state_store is not None and job.prefetch is None:
            job.prefetch = (self._block_aligned(job) and self.state_store.prefetch(
                self.engine, block_keys(job.prompt, self.prefill_chunk))) or False
        if job.prefetch and not job.prefetch.done() and any(j is not None and j.live for j in self._jobs):
            return
        with self._lock:
            if not self._waiting or self._waiting[0] is not job:  # cancelled meanwhile
                return
            self._waiting.popleft()
        job.slot = self._jobs.index(None)
        self._jobs[job.slot] = job
        if self._block_aligned(job):
            job.prefill = RowPrefill(self.engine, job.prompt, block=self.prefill_chunk, capacity=self._row_slots,
                                     store=self.prefix_cache, disk=self.state_store,
                                     checkpoint_every=self.checkpoint_every)
            self._prefilling = job
            return
        job.layout = prefill_layout([job.prompt], [0], self.prefill_chunk)
        job.row_cache = init_cache(self.config, 1, self._row_slots, mesh=self.engine.mesh, rules=self.engine.rules)
        self._prefilling = job

    def _prefill_chunk(self) -> int | None:
        """One chunk of the newcomer's prompt; returns the tokens it ran (None: no newcomer). At the prompt's end
        the row joins the pool."""
        job = self._prefilling
        if job is None:
            return None
        if job.prefill is not None:  # block-aligned, through the prefix cache (a fully cached prompt: no call)
            ran = 0
            if not job.prefill.done:
                job.prefill.step()
                ran = self.prefill_chunk
            if job.prefill.done:
                job.row_cache, job.row_logits = job.prefill.packed_cache(), job.prefill.state().next_logits_BxV
                self._join_pool(job)
            return ran
        tokens, positions, valid, calls = job.layout
        s, chunk = sum(calls[:job.calls_done]), calls[job.calls_done]
        tau = expert_thresholds(job.request.expert_threshold, 1)
        with self.engine._on_mesh():
            job.row_cache, job.row_logits, routed = _forward_chunk(
                self.engine.graphdef, self.engine.params, job.row_cache, jnp.asarray(tokens[:, s:s + chunk]),
                jnp.asarray(positions[:, s:s + chunk]), jnp.asarray(valid[:, s:s + chunk]),
                None if tau is None else jnp.asarray(tau), record=True)
        job.routed.append(to_host(routed)[0][valid[0, s:s + chunk]])
        job.calls_done += 1
        if job.calls_done == len(calls):
            self._join_pool(job)
        return chunk

    def _join_pool(self, job: _Job) -> None:
        n = len(job.prompt)
        if not any(j is not None and j.live for j in self._jobs):
            self._length = n  # an idle pool: the timeline starts over
        elif self._length < n:
            self._shift(n - self._length)
        with self.engine._on_mesh():
            self._state = _insert_row(self._state, job.row_cache, job.row_logits, job.slot, self._length, n)
        i = job.slot
        fresh = RowProgress.start(1)
        for f in dataclasses.fields(RowProgress):
            getattr(self._prog, f.name)[i] = getattr(fresh, f.name)[0]
        job.live, job.span, job.row_cache, job.row_logits, job.layout = True, n, None, None, None
        if job.prefill is not None:
            job.cached_tokens, job.prefill = job.prefill.cached_tokens, None
        self._prefilling = None
        self._sp = None

    def _shift(self, d: int) -> None:
        with self.engine._on_mesh():
            self._state = self._state.replace(cache=_shift_slots(self._state.cache, jnp.asarray(d, jnp.int32)))
        self._length += d
        self.shifts += 1

    def _sampling(self) -> dict:
        """The decode loop's per-slot settings (rebuilt when the slots' requests change)."""
        if self._sp is None:
            live = [j if j is not None and j.live else None for j in self._jobs]
            sp = sampling_arrays([j.request.sampling if j else _IDLE for j in live], self.engine.eos_ids(),
                                 budgets=[j.budget if j else None for j in live], think=self.engine.think_tokens(),
                                 stop_width=8)
            sp["out_capacity"] = np.zeros((self.decode_steps,), np.int8)
            tau = expert_thresholds([j.request.expert_threshold if j else 1.0 for j in live], len(live))
            if tau is not None:
                sp["expert_threshold_B"] = tau
            self._sp = jax.device_put(sp)
        return self._sp

    def _decode_burst(self) -> bool:
        live = [j for j in self._jobs if j is not None and j.live]
        if not live:
            return False
        rows = compact_rows(len(live), self.slots) if self.compact else self.slots
        start = min(self._length - j.span for j in live)  # the first slot a live row uses
        if self._length + self.decode_steps > self.capacity or start >= max(self._length // 2, self.capacity // 8):
            # full, or more than half the timeline is dead slots that every softmax decode step would read
            self._shift(-start)
            if self._length + self.decode_steps > self.capacity:  # unreachable: spans stay < context_window
                raise RuntimeError(f"scheduler timeline overflow: {self._length} + {self.decode_steps} slots "
                                   f"> capacity {self.capacity}")
        n_top = TOP_LOGPROBS if any(j.request.top_logprobs for j in live) else 0
        before = self._prog
        idx = None
        if rows < self.slots:  # the live rows, then free slots (finished rows) up to the bucket
            taken = sorted(j.slot for j in live)
            idx = np.asarray(taken + [i for i in range(self.slots) if i not in taken][:rows - len(taken)], np.int32)
        with self.engine._on_mesh():
            outs, prog = self._run_burst(n_top, before, idx)
        outs, prog, length = jax.tree.map(lambda x: np.array(to_host(x)), (outs, prog, self._state.cache.length))
        if idx is not None:  # back to slot order (rows not run keep their progress; their outputs are unused)
            outs = {k: _set_rows(np.zeros((self.slots, *v.shape[1:]), v.dtype), idx, v) for k, v in outs.items()}
            prog = RowProgress(**{f.name: _set_rows(getattr(before, f.name), idx, getattr(prog, f.name))
                                  for f in dataclasses.fields(RowProgress)})
        self._length = int(length)
        n_new = prog.n_gen_B - before.n_gen_B
        self._prog = prog
        for job in live:
            self._collect(job, outs, int(n_new[job.slot]))
        return True

    def _run_burst(self, n_top: int, prog: RowProgress, idx: np.ndarray | None) -> tuple[dict, RowProgress]:
        """One decode burst of the pool's rows `idx` (None: the whole pool) on device; the pool state is replaced.
        Returns (outputs, progress) of those rows."""
        e = self.engine
        steps = jnp.asarray(self.decode_steps, jnp.int32)
        if idx is None:
            outs, self._state, prog = _decode_loop(e.graphdef, n_top, e._decode_params(self.slots), self._state, prog,
                                                   self._sampling(), steps, record=True)
        else:
            outs, self._state, prog = _decode_rows(e.graphdef, n_top, e._decode_params(len(idx)), self._state, prog,
                                                   self._sampling(), steps, jnp.asarray(idx), record=True)
        return outs, prog

    def _collect(self, job: _Job, outs: dict, n_new: int) -> None:
        """The host side of a burst for one request: its new tokens, text, stop strings, delta, finish."""
        i, k = job.slot, job.request.top_logprobs
        job.span += n_new  # every generated token was fed
        new_tokens, new_lps, new_top = [], [], []
        for j in range(n_new):
            new_tokens.append(int(outs["tokens"][i, j]))
            new_lps.append(float(outs["logprobs"][i, j]))
            if k:
                new_top.append([(int(t), float(lp)) for t, lp in
                                zip(outs["top_ids"][i, j, :k], outs["top_logprobs"][i, j, :k], strict=True)])
            job.text.push(new_tokens[-1])
            if job.text.cut is not None:
                self._prog.finished_B[i], self._prog.reason_B[i] = True, _STOP_STRING
                break
        job.tokens += new_tokens
        job.logprobs += new_lps
        job.top += new_top
        job.routed.append(outs["routed_experts"][i, :len(new_tokens)])
        self._generated += len(new_tokens)
        delta = Delta(token_ids=new_tokens, logprobs=new_lps, top_logprobs=new_top if k else None, text="",
                      finish_reason=None)
        if self._prog.finished_B[i]:
            self._finish(job, FINISH_REASONS[int(self._prog.reason_B[i])], delta)
        else:
            end = len(job.text.text) if job.text.cut is None else job.text.cut
            delta.text, job.emitted = job.text.text[job.emitted:end], end
            job.handle._deltas.put(delta)

    def _finish(self, job: _Job, reason: str, delta: Delta | None = None) -> None:
        """Deliver the last delta and the output of `job`, free its slot."""
        tok = self.engine.tokenizer
        text = None
        if tok is not None:
            text = tok.decode(job.tokens)
            if job.text.cut is not None:
                text = text[:job.text.cut]
        k = job.request.top_logprobs
        delta = delta or Delta(token_ids=[], logprobs=[], top_logprobs=[] if k else None, text="", finish_reason=None)
        delta.text, delta.finish_reason = (text or "")[job.emitted:], reason
        reasoning = reasoning_count(int(self._prog.reasoning_B[job.slot]), len(job.tokens)) if job.live else 0
        c = self.config
        routed = np.concatenate(job.routed or [np.zeros((0, c.num_hidden_layers, c.num_experts_per_tok))]
                                ).astype(np.int32)
        out = RequestOutput(request_id=job.request.request_id, prompt_tokens=len(job.prompt), tokens=job.tokens,
                            logprobs=job.logprobs, top_logprobs=job.top if k else None, text=text,
                            finish_reason=reason, reasoning_tokens=reasoning, cached_tokens=job.cached_tokens,
                            routing=routing_log(routed, c),
                            routed_experts=routed if job.request.return_routed_experts else None)
        if job.slot is not None:
            self._prog.finished_B[job.slot] = True
            self._jobs[job.slot] = None
            self._sp = None
        with self._lock:
            self._ids.discard(job.request.request_id)
        job.handle._finish(out, delta)

    def _cancel_now(self, request_id: str) -> None:
        with self._lock:
            waiting = [j for j in self._waiting if j.request.request_id == request_id]
            for j in waiting:
                self._waiting.remove(j)
        if self._prefilling is not None and self._prefilling.request.request_id == request_id:
            waiting.append(self._prefilling)
            self._prefilling = None
        for job in waiting + [j for j in self._jobs if j is not None and j.live
                              and j.request.request_id == request_id]:
            self._finish(job, "cancelled")

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                busy = self.step()
            except Exception as e:  # a failed step fails its requests, never the waiting callers
                self._fail_all(e)
                busy = False
            if not busy:
                with self._lock:
                    if not self._stopping and not self._waiting and not self._cancels:
                        self._wake.wait(0.1)

    def _fail_all(self, error: BaseException) -> None:
        jobs = [j for j in self._jobs if j is not None]
        with self._lock:
            jobs += list(self._waiting)
            self._waiting.clear()
            self._ids.clear()
        self._reset_pool()  # a failed call may have consumed (donated) the pool's buffers
        for job in jobs:
            job.handle._fail(error)
