"""The generation engine of m1jax: chunked prefill into the hybrid cache, a jitted decode loop, state save/resume.

One engine serves every entry point (CLI, batch jobs, the CISPO trainer's rollouts):

* Prompts of different lengths are left-padded into one batch; each sequence keeps its own RoPE positions, and
  padding never enters a softmax score or a lightning state (`MiniMaxM1` guarantees both).
* Prefill runs in fixed-size chunks (default 4096 tokens), so a prompt of any length needs bounded activation
  memory; lightning states carry across chunks, softmax K/V accumulate in the cache. `prefill_chunk=None` runs
  the whole prompt in one call: with the sequence sharded over a mesh (batch 1 at long context, see
  `sharding.RULES["seq"]`) every chip then holds only its share of the prompt's activations.
* Decode is one `lax.while_loop` (`_decode_loop`) over one step body (`decode_step`) that samples with each
  row's key stream `step_keys(seed, n_generated)`, records the model log-prob of every token (fp32 head; with
  top log-probs on request), applies stop tokens / max tokens / the repetition early stop and the thinking
  budget (forcing `THINK_CLOSE` once a row has generated its budget with no `</think>`), and exits when every
  sequence has finished or after a given number of steps. The per-row counters (`RowProgress`) are carried from
  one call to the next, so the same loop runs a static batch to completion (`Engine.generate`) and the bursts of
  the continuous-batching scheduler (`m1jax.serving`). Stop strings and streaming callbacks run on the host
  between bursts of `HOST_BURST` steps (no host callback inside the loop, no shared registry: concurrent
  `generate` calls from several threads are independent).
* The state after a prefill (cache, positions, next-token logits) can be saved with orbax and resumed later,
  in another process, with the same result as continuing in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils

from m1jax.cache import Cache, cache_shardings, init_cache
from m1jax.config import ModelConfig
from m1jax.loading import param_shardings
from m1jax.modules.moe import choose_impl, expert_weight_bytes, unstack_experts
from m1jax.modules.unfused import XLA_CPU_COMPILER_OPTIONS
from m1jax.sampling import SamplingParams, sample_tokens, step_keys

FINISH_REASONS = ("running", "stop", "length", "repetition", "stop_string", "cancelled")
_STOP, _LENGTH, _REPETITION, _STOP_STRING = 1, 2, 3, 4
CACHE_ALIGN = 128
HOST_BURST = 8  # decode steps between host visits (stop strings, streaming callbacks)


class GenerationError(ValueError):
    """A bad generation request (empty prompt, unknown token id, too long, bad sampling values)."""


@struct.dataclass
class EngineState:
    """Where a batch of sequences stands: the cache, the next RoPE position of each sequence, and the fp32
    logits of the next token (`[B, V]`)."""

    cache: Cache
    positions_B: jax.Array
    next_logits_BxV: jax.Array

    @property
    def batch_size(self) -> int:
        return self.positions_B.shape[0]


@dataclasses.dataclass
class GenerationResult:
    """One sequence's output. `logprobs`: log-prob of each token under the model (fp32 head, temperature 1);
    `sample_logprobs`: under the distribution it was sampled from. `finish_reason`: "stop" (a stop token, kept
    in `tokens`), "stop_string" (text cut before the stop string), "length" or "repetition". `routed_experts`
    (when asked): the experts each token was routed to in each layer — from `decode`, the generated tokens; from
    `generate`, the prompt's tokens followed by the generated ones."""

    tokens: list[int]
    logprobs: list[float]
    sample_logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    text: str | None = None
    reasoning_tokens: int = 0
    routed_experts: np.ndarray | None = None  # int32 [tokens, layers, k], −1 = dropped (`return_routed_experts`)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bucket(n: int) -> int:
    """Length bucket for compiled shapes: powers of two from 16 up."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------- jitted kernels
THINK_END = "</think>"
THINK_CLOSE = "\n</think>\n\n"  # the text forced when a thinking budget runs out
TOP_LOGPROBS = 20  # alternatives the decode step ranks when any row asks for top log-probs (OpenAI's maximum)


@struct.dataclass
class RowProgress:
    """Per-row decode counters, carried from one decode burst to the next.

    `n_gen_B`: tokens generated so far (also the index of the row's sampling key, `step_keys(seed, n_gen)`);
    `finished_B` / `reason_B`: the row stopped and why (index into `FINISH_REASONS`); `rep_B`: the current run of
    confident tokens (repetition stop); `think_open_B`: no `</think>` yet; `force_at_B`: the token index where
    the forced `THINK_CLOSE` began (−1: not forced); `match_B`: how many tokens of `</think>` the last tokens
    matched; `reasoning_B`: tokens up to and including the one that closed the think block (0: not closed)."""

    n_gen_B: jax.Array
    finished_B: jax.Array
    reason_B: jax.Array
    rep_B: jax.Array
    think_open_B: jax.Array
    force_at_B: jax.Array
    match_B: jax.Array
    reasoning_B: jax.Array

    @classmethod
    def start(cls, batch: int, finished: bool = False) -> RowProgress:
        """Host (numpy) counters of rows that have generated nothing (`finished=True`: empty slots)."""
        def zeros():
            return np.zeros(batch, np.int32)

        return cls(n_gen_B=zeros(), finished_B=np.full(batch, finished), reason_B=zeros(), rep_B=zeros(),
                   think_open_B=np.ones(batch, bool), force_at_B=np.full(batch, -1, np.int32), match_B=zeros(),
                   reasoning_B=zeros())


def _fresh(new, old):
    """`new` with every leaf that is still one of `old`'s arrays copied (so donating `new` keeps `old` alive)."""
    return jax.tree.map(lambda n, o: jnp.copy(n) if n is o else n, new, old)


def forward_chunk(graphdef, params, cache, tokens_BxC, positions_BxC, valid_BxC, threshold_B=None, *,
                  record: bool = False):
    """C tokens per row appended to the cache (a prefill chunk, or C = 1 in the decode loop); returns
    (cache, logits `[B, V]` fp32 after the last position), and with `record` a third element: the routed experts
    of the C tokens `[B, C, layers, k]` int32 (−1 = dropped). `threshold_B`: each row's expert threshold (None:
    the exact top-k; see `MiniMaxM1.__call__`)."""
    model = nnx.merge(graphdef, params)
    out = model(tokens_BxC, positions_BxL=positions_BxC, valid_BxL=valid_BxC, cache=cache, logits="last",
                expert_threshold=threshold_B, return_routing="experts" if record else False)
    if record:
        return out.cache, out.logits[:, 0], out.routed_experts()
    return out.cache, out.logits[:, 0]


_forward_chunk = jax.jit(forward_chunk, static_argnums=(0,), static_argnames=("record",), donate_argnums=(2,),
                         compiler_options=XLA_CPU_COMPILER_OPTIONS)


def expert_thresholds(value, batch: int) -> np.ndarray | None:
    """Per-row expert thresholds `[batch]` fp32 from one float or one per row (each in (0, 1]; None = 1.0); None
    when every row is exact (1.0: the exact top-k, so no threshold enters the compiled step)."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * batch
    if len(values) != batch:
        raise GenerationError(f"expert_threshold: got {len(values)} values for {batch} sequences")
    out = []
    for v in values:
        v = 1.0 if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0.0 < float(v) <= 1.0:
            raise GenerationError(f"expert_threshold must be a number in (0, 1] (1.0: the exact top-k), got {v!r}")
        out.append(float(v))
    tau_B = np.asarray(out, np.float32)
    return None if np.all(tau_B >= 1.0) else tau_B


def decode_step(graphdef, params, sp: dict, n_top: int, state: EngineState, prog: RowProgress, *,
                record: bool = False):
    """One decode step for every row: pick the next token (sampled with the row's key
    `step_keys(seed, n_gen)`, or forced: the `THINK_CLOSE` tokens once `n_gen` reaches the row's thinking budget
    with the think block still open), its model log-prob (fp32 head, temperature 1) and, with `n_top` > 0, the
    `n_top` best tokens of the model distribution; then the stop checks (stop tokens, length, repetition) and the
    token fed back into the cache (with the rows' expert thresholds `sp["expert_threshold_B"]` if present).
    Rows already finished only pass through padding.

    Returns (token `[B]`, model log-prob `[B]`, sampling log-prob `[B]`, top ids `[B, n_top]`, top log-probs
    `[B, n_top]`, active `[B]` (the row produced this token), state, progress, and the fed token's routed experts
    `[B, layers, k]` with `record` (else None))."""
    n_stop = sp["stop_ids_BxS"].shape[1]
    force_F, end_T = sp["force_ids_F"], sp["think_end_T"]
    n_force, n_end = force_F.shape[0], end_T.shape[0]
    active = ~prog.finished_B
    n_gen = prog.n_gen_B
    # thinking budget: the forced text starts once n_gen reaches the budget with the think block still open
    start_force = prog.think_open_B & (prog.force_at_B < 0) & (sp["budget_B"] >= 0) & (n_gen >= sp["budget_B"])
    force_at = jnp.where(start_force, n_gen, prog.force_at_B)
    fi = n_gen - force_at
    forcing = (force_at >= 0) & (fi < n_force)
    forced = jnp.where(forcing, force_F[jnp.clip(fi, 0, n_force - 1)], -1)
    keys = step_keys(sp["seed_B"], n_gen)
    tok, lp, slp = sample_tokens(keys, state.next_logits_BxV, sp["temperature_B"], sp["top_k_B"], sp["top_p_B"],
                                 sp["min_p_B"], forced_B=forced)
    b = tok.shape[0]
    if n_top:
        top_lp, top_id = jax.lax.top_k(jax.nn.log_softmax(state.next_logits_BxV.astype(jnp.float32), -1), n_top)
    else:
        top_lp, top_id = jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
    # `</think>` produced (or forced): the think block closes at this token
    m = prog.match_B
    m_next = jnp.where(tok == end_T[jnp.clip(m, 0, n_end - 1)], m + 1, jnp.where(tok == end_T[0], 1, 0))
    closes = active & prog.think_open_B & ((m_next >= n_end) | (forcing & (fi == n_force - 1)))
    n_gen = n_gen + active.astype(jnp.int32)
    is_stop = jnp.any((tok[:, None] == sp["stop_ids_BxS"]) & (sp["stop_ids_BxS"] >= 0), axis=1) if n_stop else \
        jnp.zeros((b,), bool)
    rep = jnp.where(slp > jnp.log(sp["rep_tau_B"]), prog.rep_B + 1, 0)
    rep_hit = (sp["rep_n_B"] > 0) & (rep >= sp["rep_n_B"])
    length_hit = n_gen >= sp["max_new_B"]
    new_reason = jnp.where(is_stop & ~forcing, _STOP,
                           jnp.where(rep_hit, _REPETITION, jnp.where(length_hit, _LENGTH, 0)))
    newly = active & (new_reason > 0)
    prog = RowProgress(
        n_gen_B=n_gen, finished_B=prog.finished_B | newly, reason_B=jnp.where(newly, new_reason, prog.reason_B),
        rep_B=jnp.where(active, rep, prog.rep_B), think_open_B=prog.think_open_B & ~closes,
        force_at_B=jnp.where(active, force_at, prog.force_at_B), match_B=jnp.where(active, m_next, prog.match_B),
        reasoning_B=jnp.where(closes, n_gen, prog.reasoning_B))

    c = nnx.merge(graphdef, params).config
    no_route = jnp.full((b, c.num_hidden_layers, c.num_experts_per_tok) if record else (0,), -1, jnp.int32)

    def feed(st):
        out = forward_chunk(graphdef, params, st.cache, tok[:, None], st.positions_B[:, None], active[:, None],
                            sp.get("expert_threshold_B"), record=record)
        cache, new_logits = out[:2]
        return EngineState(cache=cache, positions_B=st.positions_B + active.astype(st.positions_B.dtype),
                           next_logits_BxV=jnp.where(active[:, None], new_logits, st.next_logits_BxV)), \
            (out[2][:, 0] if record else no_route)

    # The token that finishes a row still enters its state (as HF does); afterwards the row is padding.
    state, routed = jax.lax.cond(jnp.any(active), feed, lambda st: (st, no_route), state)
    return tok, lp, slp, top_id, top_lp, active, state, prog, routed if record else None


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("record",), donate_argnums=(3,),
         compiler_options=XLA_CPU_COMPILER_OPTIONS)
def _decode_loop(graphdef, n_top: int, params, state: EngineState, prog: RowProgress, sp: dict, max_steps, *,
                 record: bool = False):
    """`decode_step` repeated until every row finished or `max_steps` steps ran (one decode burst).

    Row b's token of this burst with index j (its `n_gen` at the burst's start + j) lands in column j of the
    outputs `[B, C]` (C = `sp["out_capacity"]`, ≥ `max_steps`). Returns (outputs dict: tokens, logprobs,
    sample_logprobs, top_ids `[B, C, n_top]`, top_logprobs, and with `record` routed_experts `[B, C, layers, k]`),
    state, progress."""
    b = state.batch_size
    cap = sp["out_capacity"].shape[0]
    n0 = prog.n_gen_B

    def cond(carry):
        return (carry[0] < max_steps) & ~jnp.all(carry[2].finished_B)

    def body(carry):
        step, st, pr, outs = carry
        tok, lp, slp, top_id, top_lp, active, st, pr_new, routed = decode_step(graphdef, params, sp, n_top, st, pr,
                                                                               record=record)
        col = jnp.clip(pr.n_gen_B - n0, 0, cap - 1)
        rows = jnp.arange(b)

        def put(buf, x):
            return buf.at[rows, col].set(jnp.where(active.reshape((b,) + (1,) * (x.ndim - 1)), x, buf[rows, col]))

        new = {"tokens": tok, "logprobs": lp, "sample_logprobs": slp, "top_ids": top_id, "top_logprobs": top_lp}
        if record:
            new["routed_experts"] = routed
        outs = {k: put(outs[k], x) for k, x in new.items()}
        return step + 1, st, pr_new, outs

    outs = {"tokens": jnp.zeros((b, cap), jnp.int32), "logprobs": jnp.zeros((b, cap), jnp.float32),
            "sample_logprobs": jnp.zeros((b, cap), jnp.float32), "top_ids": jnp.zeros((b, cap, n_top), jnp.int32),
            "top_logprobs": jnp.zeros((b, cap, n_top), jnp.float32)}
    if record:
        c = nnx.merge(graphdef, params).config
        outs["routed_experts"] = jnp.full((b, cap, c.num_hidden_layers, c.num_experts_per_tok), -1, jnp.int32)
    prog = jax.tree.map(jnp.asarray, prog)
    _, state, prog, outs = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, prog, outs))
    return outs, state, prog


def to_host(x) -> np.ndarray:
    """`x` as a numpy array on this host. A global array with shards on other processes (multi-host) is
    all-gathered first (`process_allgather`: every process must make the same call, as SPMD code does)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def decode_expert_layout(config: ModelConfig, batch: int, platform: str) -> str | None:
    """How the decode loop of `batch` rows holds the expert weights (`moe.unstack_experts(over=...)`):
    "experts" on CPU when the batch's k·batch assignments make the MoE branch per expert (`experts_switch`,
    see `choose_impl`); "groups" on TPU/GPU for a scanned model, whose grouped GEMMs then read each group's
    weights in place instead of a copy of the scan's slice; None: as stored."""
    if platform == "cpu":
        n = batch * config.num_experts_per_tok
        return "experts" if choose_impl(config.moe_impl, n, config.num_local_experts, platform) == "switch" else None
    return "groups" if config.scan_groups else None


def available_memory_bytes() -> int:
    """Physical memory the OS reports available now (`MemAvailable`; free pages where /proc is absent)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------- engine
class Engine:
    """Batched generation for one model. Compiled functions are shared by every engine of the same model
    structure, so creating engines is cheap."""

    def __init__(self, model, tokenizer=None, *, prefill_chunk: int | None = 4096, max_len: int | None = None,
                 unstack_experts: bool = True, mesh=None, rules=None):
        """`mesh` (optional): run prefill and decode under `jax.set_mesh(mesh)` with the parameters and the
        cache laid out by the sharding rules (`rules`, default `m1jax.sharding.RULES`); parameters not yet in
        that layout are moved once here, and the cache is created directly sharded."""
        self.config: ModelConfig = model.config
        self.graphdef, self.params = nnx.split(model)
        self.mesh, self.rules = mesh, rules
        if mesh is not None:
            self.params = jax.device_put(self.params, param_shardings(self.params, mesh, rules))
        self.unstack_experts = unstack_experts
        self._unstacked = None
        self.tokenizer = tokenizer
        if prefill_chunk is not None and prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be ≥ 1 (or None: one call), got {prefill_chunk}")
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.max_len = int(max_len or self.config.max_position_embeddings)
        self._think = None

    def _on_mesh(self):
        """The context every compiled call runs in: the engine's mesh, if any."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _place(self, cache: Cache) -> Cache:
        """`cache` in its sharding on the engine's mesh (unchanged without a mesh)."""
        if self.mesh is None:
            return cache
        return jax.device_put(cache, cache_shardings(self.config, cache.batch_size, cache.max_len, self.mesh,
                                                     self.rules))

    # ---------------------------------------------------------------- validation
    def _check_prompts(self, prompts: Sequence[Sequence[int]], *, allow_empty: bool = False,
                       label: str | None = None) -> list[np.ndarray]:
        """`prompts` as int32 arrays, or a `GenerationError` naming the bad prompt (`label`: the name to use for
        a single prompt, instead of "prompt i")."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        out = []
        v = self.config.vocab_size
        for i, p in enumerate(prompts):
            name = label or f"prompt {i}"
            if isinstance(p, str):
                raise GenerationError(f"{name} is a string; pass token ids (or use generate_text with a "
                                      f"tokenizer)")
            arr = np.asarray(p)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise GenerationError(f"{name} must be a flat list of integer token ids")
            if arr.size == 0 and not allow_empty:
                raise GenerationError(f"{name} is empty")
            bad = arr[(arr < 0) | (arr >= v)]
            if bad.size:
                raise GenerationError(f"{name} has token id {int(bad[0])} outside the vocabulary [0, {v})")
            out.append(arr.astype(np.int32))
        return out

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompts: Sequence[Sequence[int]], *, state: EngineState | None = None,
                reserve: int = 256, consume_state: bool = False, expert_threshold=None) -> EngineState:
        """Run `prompts` (one token list per sequence) through the model, appending to `state` if given.

        Rows are left-padded to a common chunked length; `reserve` extra cache slots are allocated for the
        tokens generated next (the cache grows later if needed). The given `state` stays usable (e.g. to ask
        several questions about one prefilled document) unless `consume_state=True` lets its buffers be reused.
        `expert_threshold`: one float or one per row (see `expert_thresholds`; None: exact).
        """
        return self._prefill(prompts, state=state, reserve=reserve, consume_state=consume_state,
                             expert_threshold=expert_threshold)[0]

    def _prefill(self, prompts, *, state=None, reserve=256, consume_state=False, expert_threshold=None,
                 record: bool = False) -> tuple[EngineState, list[np.ndarray] | None]:
        """`prefill`, and with `record` the routed experts of each row's prompt tokens `[n_i, layers, k]`."""
        rows = self._check_prompts(prompts, allow_empty=state is not None)
        b = len(rows)
        tau_B = expert_thresholds(expert_threshold, b)
        if state is not None and state.batch_size != b:
            raise GenerationError(f"the state holds {state.batch_size} sequences, got {b} continuations")
        lens = np.array([len(r) for r in rows])
        start_pos = np.zeros(b, np.int64) if state is None else to_host(state.positions_B)
        too_long = np.nonzero(start_pos + lens > self.max_len)[0]
        if too_long.size:
            i = int(too_long[0])
            raise GenerationError(f"prompt {i} needs {int(start_pos[i] + lens[i])} positions, more than the "
                                  f"configured maximum {self.max_len}")
        tokens, positions, valid, calls = prefill_layout(rows, start_pos, self.prefill_chunk)
        padded = tokens.shape[1]
        if state is None:
            cache = init_cache(self.config, b, _round_up(padded + reserve, CACHE_ALIGN), mesh=self.mesh,
                               rules=self.rules)
            logits = jnp.zeros((b, self.config.vocab_size), jnp.float32)
        else:
            cache = self._place(grow_cache(state.cache, int(to_host(state.cache.length)) + padded + reserve))
            if not consume_state:
                cache = _fresh(cache, state.cache)
            logits = state.next_logits_BxV
        routed = []
        with self._on_mesh():
            for s, chunk in zip(np.cumsum([0] + calls[:-1]), calls, strict=True):
                out = _forward_chunk(self.graphdef, self.params, cache, jnp.asarray(tokens[:, s:s + chunk]),
                                     jnp.asarray(positions[:, s:s + chunk]), jnp.asarray(valid[:, s:s + chunk]),
                                     None if tau_B is None else jnp.asarray(tau_B), record=record)
                cache, last = out[:2]
                routed.extend(out[2:])
        has_new = jnp.asarray(lens > 0)
        logits = jnp.where(has_new[:, None], last, logits)
        state = EngineState(cache=cache, positions_B=jnp.asarray(start_pos + lens, jnp.int32), next_logits_BxV=logits)
        if not record:
            return state, None
        routed_BxPxNxK = np.concatenate([to_host(r) for r in routed], axis=1)
        return state, [routed_BxPxNxK[i, padded - n:] for i, n in enumerate(lens)]

    # ------------------------------------------------------------------- decode
    def _decode_params(self, batch: int):
        """The parameters the decode loop reads: with `unstack_experts`, the expert weights in the layout of
        `decode_expert_layout`, copied once per engine (at the price of the expert weights' memory once more):
        on CPU per expert — unless that copy would take more than a quarter of the memory available now, and
        not with several processes (each host's free memory would decide for it, and every process must run
        the same programs); on TPU/GPU per layer group of a scanned model."""
        c = self.config
        layout = decode_expert_layout(c, batch, jax.default_backend())
        if not self.unstack_experts or layout is None or (layout == "experts" and jax.process_count() > 1):
            return self.params
        if self._unstacked is None or self._unstacked[0] != layout:
            if layout == "experts" and expert_weight_bytes(self.params) > available_memory_bytes() / 4:
                self.unstack_experts = False
                return self.params
            self._unstacked = (layout, unstack_experts(self.params, over=layout))
        return self._unstacked[1]

    def eos_ids(self) -> tuple[int, ...]:
        """Default stop tokens: the config's eos ids and the tokenizer's eos."""
        eos = tuple(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos = tuple(sorted(set(eos) | {int(self.tokenizer.eos_token_id)}))
        return eos

    def think_tokens(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(ids of `THINK_CLOSE`, the text forced when a thinking budget runs out; ids of `</think>`, whose
        appearance closes the think block) in the engine's tokenizer; None without a tokenizer."""
        if self.tokenizer is None:
            return None
        if self._think is None:
            self._think = (tuple(self.tokenizer.encode(THINK_CLOSE)), tuple(self.tokenizer.encode(THINK_END)))
        return self._think

    def thinking_budgets(self, budget, batch: int) -> list[int | None]:
        """Per-row thinking budgets from `budget` (None: `config.thinking_budget` where a tokenizer can spell
        `</think>`, else unlimited; an int for every row; or one int/None per row)."""
        if budget is None:
            default = self.config.thinking_budget if self.tokenizer is not None else None
            return [default] * batch
        budgets = [budget] * batch if isinstance(budget, (int, np.integer)) else list(budget)
        if len(budgets) != batch:
            raise GenerationError(f"thinking_budget: got {len(budgets)} budgets for {batch} sequences")
        for bgt in budgets:
            if bgt is not None and (isinstance(bgt, bool) or not isinstance(bgt, (int, np.integer)) or bgt < 0):
                raise GenerationError(f"thinking_budget must be an integer ≥ 0 (tokens) or None, got {bgt!r}")
        if self.tokenizer is None and any(bgt is not None for bgt in budgets):
            raise GenerationError("thinking_budget needs a tokenizer (Engine(model, tokenizer)) to spell </think>")
        return budgets

    def decode(self, state: EngineState, sampling: SamplingParams | Sequence[SamplingParams], *,
               callback: Callable | None = None, prompt_tokens: Sequence[int] | None = None,
               consume_state: bool = False, thinking_budget=None, expert_threshold=None,
               return_routed_experts: bool = False) -> tuple[list[GenerationResult], EngineState]:
        """Generate from `state` with one `SamplingParams` for all rows or one per row.

        `expert_threshold`: one float or one per row (see `expert_thresholds`; None: exact);
        `return_routed_experts`: `GenerationResult.routed_experts` holds each generated token's routed experts.

        `callback(step, tokens [B], active [B])` is called on the host for every step (streaming), after each
        burst of `HOST_BURST` steps; stop strings are checked there too. `thinking_budget`: see
        `thinking_budgets`. Returns the results and the state after the last generated token (finished rows stop
        changing their state after their last token; a row cut by a stop string may hold up to `HOST_BURST` − 1
        tokens more). `state` stays usable unless `consume_state=True`.
        """
        b = state.batch_size
        params = [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != b or not all(isinstance(p, SamplingParams) for p in params):
            raise GenerationError(f"need one SamplingParams or {b} of them")
        if any(p.stop_strings for p in params) and self.tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (Engine(model, tokenizer))")
        max_new = max(p.max_new_tokens for p in params)
        room = int(np.max(to_host(state.positions_B))) + max_new
        if room > self.max_len:
            raise GenerationError(f"prompt + max_new_tokens = {room} positions exceeds the configured maximum "
                                  f"{self.max_len}")
        sp = sampling_arrays(params, self.eos_ids(), budgets=self.thinking_budgets(thinking_budget, b),
                             think=self.think_tokens())
        tau_B = expert_thresholds(expert_threshold, b)
        if tau_B is not None:
            sp["expert_threshold_B"] = tau_B
        grown = state.replace(cache=self._place(grow_cache(state.cache, int(to_host(state.cache.length)) + max_new)))
        state = grown if consume_state else _fresh(grown, state)
        texts = [RowText(self.tokenizer, p.stop_strings) for p in params]
        burst = HOST_BURST if callback is not None or any(p.stop_strings for p in params) else max_new
        prog = RowProgress.start(b)
        out = {k: [[] for _ in range(b)] for k in ("tokens", "logprobs", "sample_logprobs")
               + (("routed_experts",) if return_routed_experts else ())}
        decode_params, step = self._decode_params(b), 0
        while step < max_new and not prog.finished_B.all():
            with self._on_mesh():
                outs, state, new_prog = _decode_loop(self.graphdef, 0, decode_params, state, prog, sp,
                                                     jnp.asarray(min(burst, max_new - step), jnp.int32),
                                                     record=return_routed_experts)
            outs = {k: to_host(v) for k, v in outs.items()}  # waits for the burst
            new_prog = jax.tree.map(lambda x: np.array(to_host(x)), new_prog)
            ran = new_prog.n_gen_B - prog.n_gen_B  # tokens each row produced in this burst
            n_new = ran.copy()
            for i in np.nonzero(ran)[0]:
                if texts[i].stop_strings:  # text only where a stop string is watched for
                    for j in range(ran[i]):
                        texts[i].push(int(outs["tokens"][i, j]))
                        if texts[i].cut is not None:  # a stop string: the row ends at this token
                            n_new[i] = j + 1
                            new_prog.finished_B[i], new_prog.reason_B[i] = True, _STOP_STRING
                            break
                for k in out:
                    out[k][i] += outs[k][i, :n_new[i]].tolist()
            if callback is not None:
                for j in range(int(n_new.max(initial=0))):
                    callback(step + j, outs["tokens"][:, j], n_new > j)
            step, prog = step + int(ran.max(initial=0)), new_prog
        results = []
        for i in range(b):
            r = GenerationResult(tokens=out["tokens"][i], logprobs=out["logprobs"][i],
                                 sample_logprobs=out["sample_logprobs"][i],
                                 finish_reason=FINISH_REASONS[int(prog.reason_B[i])],
                                 prompt_tokens=0 if prompt_tokens is None else int(prompt_tokens[i]),
                                 reasoning_tokens=reasoning_count(int(prog.reasoning_B[i]), len(out["tokens"][i])),
                                 routed_experts=_stack_rows(out["routed_experts"][i], self.config)
                                 if return_routed_experts else None)
            if self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.tokens)
                if texts[i].cut is not None:
                    r.text = r.text[:texts[i].cut]
            results.append(r)
        return results, state

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams], *,
                 callback: Callable | None = None, thinking_budget=None, expert_threshold=None,
                 return_routed_experts: bool = False) -> list[GenerationResult]:
        """Prefill `prompts` and decode; one result per prompt (`thinking_budget`: see `thinking_budgets`;
        `expert_threshold`: one float or one per prompt, None: exact; `return_routed_experts`:
        `GenerationResult.routed_experts` holds the prompt's and then the generated tokens' routed experts,
        what a trainer replays)."""
        rows = self._check_prompts(prompts)
        params = [sampling] * len(rows) if isinstance(sampling, SamplingParams) else list(sampling)
        reserve = max(p.max_new_tokens for p in params) if params else 1
        state, prompt_routed = self._prefill(rows, reserve=reserve, expert_threshold=expert_threshold,
                                             record=return_routed_experts)
        results, _ = self.decode(state, params, callback=callback, prompt_tokens=[len(r) for r in rows],
                                 consume_state=True, thinking_budget=thinking_budget,
                                 expert_threshold=expert_threshold, return_routed_experts=return_routed_experts)
        if return_routed_experts:
            for r, before in zip(results, prompt_routed, strict=True):
                r.routed_experts = np.concatenate([before, r.routed_experts], axis=0)
        return results


def _stack_rows(rows: list, config: ModelConfig) -> np.ndarray:
    """Per-token `[layers, k]` routed experts (nested lists) as one `[tokens, layers, k]` int32 array."""
    return np.asarray(rows, np.int32).reshape(-1, config.num_hidden_layers, config.num_experts_per_tok)


def prefill_layout(rows: Sequence[np.ndarray], start_pos: Sequence[int], prefill_chunk: int | None):
    """How prompts enter the cache, as calls of at most `chunk` tokens (`prefill_chunk`, at most the length
    bucket of the longest row; None: that bucket): the rows are left-padded to one call of the length bucket of
    the remainder r = longest mod chunk (capped at the chunk; none when r = 0) followed by whole chunks (1341
    tokens, chunk 256: 64 + 5 × 256). Returns (tokens, positions, valid) `[B, padded]` host arrays and the calls'
    lengths in order (they sum to `padded`)."""
    longest = max(max(len(r) for r in rows), 1)
    chunk = _bucket(longest) if prefill_chunk is None else min(prefill_chunk, _bucket(longest))
    full, rest = divmod(longest, chunk)
    calls = ([min(chunk, _bucket(rest))] if rest else []) + [chunk] * full
    padded = sum(calls)
    b = len(rows)
    tokens = np.zeros((b, padded), np.int32)
    valid = np.zeros((b, padded), bool)
    positions = np.zeros((b, padded), np.int32)
    for i, r in enumerate(rows):
        n = len(r)
        tokens[i, padded - n:] = r
        valid[i, padded - n:] = True
        positions[i, padded - n:] = start_pos[i] + np.arange(n)
    return tokens, positions, valid, calls


def reasoning_count(closed_at: int, generated: int) -> int:
    """Reasoning tokens of a row whose think block closed at token `closed_at` (0: never): 0 when that token
    lies beyond the `generated` tokens kept."""
    return closed_at if 0 < closed_at <= generated else 0


def sampling_arrays(params: Sequence[SamplingParams], eos: tuple[int, ...], *,
                    budgets: Sequence[int | None] | None = None,
                    think: tuple[Sequence[int], Sequence[int]] | None = None, stop_width: int = 1
                    ) -> dict[str, np.ndarray]:
    """The per-row sampling and stopping settings the decode loop reads (`eos`: default stop tokens; `budgets`:
    thinking budgets, None = unlimited; `think`: the ids of `THINK_CLOSE` and `</think>`; `stop_width`: the
    least width of the stop-token table), as host arrays."""
    b = len(params)
    stops = [p.stop_token_ids if p.stop_token_ids is not None else eos for p in params]
    width = max([len(s) for s in stops] + [stop_width])
    stop_ids = np.full((b, width), -1, np.int32)
    for i, s in enumerate(stops):
        stop_ids[i, :len(s)] = s
    budgets = [None] * b if budgets is None else list(budgets)
    force, end = think if think is not None else ((), ())
    return {
        "temperature_B": np.asarray([p.temperature for p in params], np.float32),
        "top_k_B": np.asarray([p.top_k for p in params], np.int32),
        "top_p_B": np.asarray([p.top_p for p in params], np.float32),
        "min_p_B": np.asarray([p.min_p for p in params], np.float32),
        "seed_B": np.asarray([p.seed for p in params], np.uint32),
        "max_new_B": np.asarray([p.max_new_tokens for p in params], np.int32),
        "rep_n_B": np.asarray([p.repetition_stop or 0 for p in params], np.int32),
        "rep_tau_B": np.asarray([p.repetition_threshold for p in params], np.float32),
        "stop_ids_BxS": np.asarray(stop_ids),
        "budget_B": np.asarray([-1 if x is None else x for x in budgets], np.int32),
        "force_ids_F": np.asarray(list(force) or [-1], np.int32),
        "think_end_T": np.asarray(list(end) or [-1], np.int32),
        "out_capacity": np.zeros((_bucket(max(p.max_new_tokens for p in params)),), np.int8),
    }


class RowText:
    """The text of one generated row, detokenized incrementally as its tokens arrive (UTF-8-safe:
    `StreamDecoder` holds back a split character), and where the first of its stop strings begins (`cut`)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = None if tokenizer is None else tokenizer.stream_decoder()
        self.stop_strings = tuple(stop_strings)
        self.text = ""
        self.cut: int | None = None

    def push(self, token: int) -> str:
        """Adds one token; returns the text it completes (the first stop string found sets `cut`)."""
        if self.decoder is None:
            return ""
        new = self.decoder.push(token)
        if new and self.stop_strings and self.cut is None:
            since = max(0, len(self.text) - max(len(s) for s in self.stop_strings) + 1)
            self.text += new
            found = [f for f in (self.text.find(s, since) for s in self.stop_strings) if f >= 0]
            self.cut = min(found) if found else None
        else:
            self.text += new
        return new


def grow_cache(cache: Cache, needed: int) -> Cache:
    """The same cache with room for at least `needed` slots (K/V buffers extended with empty slots)."""
    if needed <= cache.max_len:
        return cache
    new_len = _round_up(needed, CACHE_ALIGN)
    extra = new_len - cache.max_len
    return cache.map_slots(lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)]))


def trim_cache(cache: Cache) -> Cache:
    """The cache cut to its written slots (what a saved state needs)."""
    n = int(cache.length)
    return cache.map_slots(lambda x, axis: jax.lax.slice_in_dim(x, 0, n, axis=axis))


# ------------------------------------------------------------------------------------- save / resume
STATE_MARKER = "m1jax_state.json"


def save_state(state: EngineState, path: str | os.PathLike, *, metadata: dict | None = None) -> None:
    """Save an engine state (cache trimmed to its written slots) with orbax; atomic via a temporary directory."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        raise GenerationError(f"{path} already exists; refusing to overwrite a saved state")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    trimmed = state.replace(cache=trim_cache(state.cache))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "arrays", jax.tree.map(np.asarray, _state_tree(trimmed)))
    ckptr.wait_until_finished()
    layout = ["state" if not isinstance(layer, tuple) else "kv" for layer in trimmed.cache.per_layer()]
    (tmp / STATE_MARKER).write_text(json.dumps({"format": 1, "layers": layout, "metadata": metadata or {}}))
    os.replace(tmp, path)


def load_state(path: str | os.PathLike, config: ModelConfig) -> EngineState:
    """Load a state written by `save_state` for a model with `config`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    marker = path / STATE_MARKER
    if not marker.exists():
        raise GenerationError(f"{path} is not a complete saved generation state (no {STATE_MARKER})")
    layout = json.loads(marker.read_text())["layers"]
    expected = ["state" if t == "linear_attention" else "kv" for t in config.layer_types]
    if layout != expected:
        raise GenerationError(f"{path} was saved for a model with a different layer pattern")
    tree = ocp.StandardCheckpointer().restore(path / "arrays")
    layers = tuple(tuple(jnp.asarray(x) for x in tree["layers"][str(i)]) if kind == "kv"
                   else jnp.asarray(tree["layers"][str(i)]) for i, kind in enumerate(layout))
    cache = Cache.from_per_layer(layers, jnp.asarray(tree["valid_BxS"]), jnp.asarray(tree["length"], jnp.int32),
                                 groups=config.scan_groups)
    return EngineState(cache=cache, positions_B=jnp.asarray(tree["positions_B"], jnp.int32),
                       next_logits_BxV=jnp.asarray(tree["next_logits_BxV"], jnp.float32))


def saved_state_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` a state was saved with by `save_state`."""
    marker = Path(path).absolute() / STATE_MARKER
    if not marker.exists():
        raise GenerationError(f"{path} is not a complete saved generation state (no {STATE_MARKER})")
    return json.loads(marker.read_text())["metadata"]


def _state_tree(state: EngineState) -> dict:
    layers = {str(i): (list(layer) if isinstance(layer, tuple) else layer) for i, layer in
              enumerate(state.cache.per_layer())}
    return {"layers": layers, "valid_BxS": state.cache.valid_BxS, "length": state.cache.length,
            "positions_B": state.positions_B, "next_logits_BxV": state.next_logits_BxV}


# ------------------------------------------------------------------------------------------ public API
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int | Sequence[int] = 0,
             stop_token_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             repetition_stop: int | None = 3000, repetition_threshold: float = 0.99, tokenizer=None,
             callback: Callable | None = None, prefill_chunk: int | None = 4096) -> list[GenerationResult]:
    """Generate continuations of token-id `prompts` (a list of lists); `temperature=0.0` is greedy.

    `seed` may be one int (request i uses seed + i) or one per prompt. Returns one `GenerationResult` per prompt
    with the new tokens, their log-probs and the finish reason (and text when a tokenizer is given).
    """
    n = len(prompts) if isinstance(prompts, Sequence) else 0
    seeds = [seed + i for i in range(n)] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != n:
        raise GenerationError(f"got {len(seeds)} seeds for {n} prompts")
    try:
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=int(s),
                                 max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                                 stop_strings=tuple(stop_strings), repetition_stop=repetition_stop,
                                 repetition_threshold=repetition_threshold) for s in seeds]
    except ValueError as e:
        raise GenerationError(str(e)) from None
    return Engine(model, tokenizer, prefill_chunk=prefill_chunk).generate(prompts, params, callback=callback)


def generate_text(model, tokenizer, prompts: Sequence[str] | None = None, *, messages: Sequence[list] | None = None,
                  tools=None, **kwargs) -> list[GenerationResult]:
    """`generate` for text prompts (encoded as is) or chat conversations (rendered with the tokenizer's template)."""
    if (prompts is None) == (messages is None):
        raise GenerationError("pass exactly one of prompts (texts) or messages (chat conversations)")
    if messages is not None:
        texts = [tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=True) for m in messages]
    else:
        texts = list(prompts)
    ids = [tokenizer.encode(t) for t in texts]
    return generate(model, ids, tokenizer=tokenizer, **kwargs)
