"""The generation engine of m1jax: chunked prefill into the hybrid cache, a jitted decode loop, state save/resume.

One engine serves every entry point (CLI, batch jobs, the CISPO trainer's rollouts):

* Prompts of different lengths are left-padded into one batch; each sequence keeps its own RoPE positions, and
  padding never enters a softmax score or a lightning state (`MiniMaxM1` guarantees both).
* Prefill runs in fixed-size chunks (default 4096 tokens), so a prompt of any length needs bounded activation
  memory; lightning states carry across chunks, softmax K/V accumulate in the cache. `prefill_chunk=None` runs
  the whole prompt in one call: with the sequence sharded over a mesh (batch 1 at long context, see
  `sharding.RULES["seq"]`) every chip then holds only its share of the prompt's activations.
* Decode is one `lax.while_loop` that samples, records the model log-prob of every token (fp32 head), applies
  stop tokens / max tokens / the repetition early stop, and exits when every sequence has finished. Stop strings
  and streaming callbacks run on the host through an ordered `io_callback` per step.
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
from jax.experimental import io_callback, multihost_utils

from m1jax.cache import Cache, cache_shardings, init_cache
from m1jax.config import ModelConfig
from m1jax.loading import param_shardings
from m1jax.modules.moe import choose_impl, expert_weight_bytes, unstack_experts
from m1jax.sampling import SamplingParams, sample_tokens, step_keys

FINISH_REASONS = ("running", "stop", "length", "repetition", "stop_string")
_STOP, _LENGTH, _REPETITION, _STOP_STRING = 1, 2, 3, 4
CACHE_ALIGN = 128


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
    in `tokens`), "stop_string" (text cut before the stop string), "length" or "repetition"."""

    tokens: list[int]
    logprobs: list[float]
    sample_logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    text: str | None = None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bucket(n: int) -> int:
    """Length bucket for compiled shapes: powers of two from 16 up."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


# ----------------------------------------------------------------------------------------- jitted kernels
_HOOKS: dict[int, Callable] = {}  # live host hooks, looked up by id so the compiled loop never changes


def _call_hook(hook_id, step, tokens, active):
    return _HOOKS[int(hook_id)](step, tokens, active)


def _fresh(new, old):
    """`new` with every leaf that is still one of `old`'s arrays copied (so donating `new` keeps `old` alive)."""
    return jax.tree.map(lambda n, o: jnp.copy(n) if n is o else n, new, old)


def forward_chunk(graphdef, params, cache, tokens_BxC, positions_BxC, valid_BxC):
    """C tokens per row appended to the cache (a prefill chunk, or C = 1 in the decode loop); returns
    (cache, logits `[B, V]` fp32 after the last position)."""
    model = nnx.merge(graphdef, params)
    out = model(tokens_BxC, positions_BxL=positions_BxC, valid_BxL=valid_BxC, cache=cache, logits="last")
    return out.cache, out.logits[:, 0]


_forward_chunk = jax.jit(forward_chunk, static_argnums=(0,), donate_argnums=(2,))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode_loop(graphdef, use_hook: bool, params, state: EngineState, sp: dict, max_steps, hook_id):
    """Sample → record → stop checks → feed the token back, until every row finished or `max_steps`."""
    b = state.batch_size
    cap = sp["out_capacity"].shape[0]
    n_stop = sp["stop_ids_BxS"].shape[1]

    def cond(carry):
        step, finished = carry[0], carry[1]
        return (step < max_steps) & ~jnp.all(finished)

    def body(carry):
        step, finished, reason, rep, n_gen, toks, lps, slps, cache, pos, logits = carry
        keys = step_keys(sp["seed_B"], step)
        tok, lp, slp = sample_tokens(keys, logits, sp["temperature_B"], sp["top_k_B"], sp["top_p_B"], sp["min_p_B"])
        active = ~finished
        col = jnp.minimum(step, cap - 1)
        toks = toks.at[:, col].set(jnp.where(active, tok, toks[:, col]))
        lps = lps.at[:, col].set(jnp.where(active, lp, lps[:, col]))
        slps = slps.at[:, col].set(jnp.where(active, slp, slps[:, col]))
        n_gen = n_gen + active.astype(jnp.int32)
        is_stop = jnp.any((tok[:, None] == sp["stop_ids_BxS"]) & (sp["stop_ids_BxS"] >= 0), axis=1) if n_stop else \
            jnp.zeros((b,), bool)
        rep = jnp.where(slp > jnp.log(sp["rep_tau_B"]), rep + 1, 0)
        rep_hit = (sp["rep_n_B"] > 0) & (rep >= sp["rep_n_B"])
        length_hit = n_gen >= sp["max_new_B"]
        if use_hook:
            string_hit = io_callback(_call_hook, jax.ShapeDtypeStruct((b,), jnp.bool_), hook_id, step, tok, active,
                                     ordered=True)
        else:
            string_hit = jnp.zeros((b,), bool)
        new_reason = jnp.where(is_stop, _STOP, jnp.where(string_hit, _STOP_STRING,
                               jnp.where(rep_hit, _REPETITION, jnp.where(length_hit, _LENGTH, 0))))
        newly = active & (new_reason > 0)
        reason = jnp.where(newly, new_reason, reason)

        def feed(args):
            cache, pos, logits = args
            cache, new_logits = forward_chunk(graphdef, params, cache, tok[:, None], pos[:, None], active[:, None])
            return cache, pos + active.astype(pos.dtype), jnp.where(active[:, None], new_logits, logits)

        finished = finished | newly
        # The token that finishes a row still enters its state (as HF does); afterwards the row is padding.
        cache, pos, logits = jax.lax.cond(jnp.any(active), feed, lambda a: a, (cache, pos, logits))
        return step + 1, finished, reason, rep, n_gen, toks, lps, slps, cache, pos, logits

    zeros_i = jnp.zeros((b,), jnp.int32)
    carry = (jnp.zeros((), jnp.int32), jnp.zeros((b,), bool), zeros_i, zeros_i, zeros_i,
             jnp.zeros((b, cap), jnp.int32), jnp.zeros((b, cap), jnp.float32), jnp.zeros((b, cap), jnp.float32),
             state.cache, state.positions_B, state.next_logits_BxV)
    out = jax.lax.while_loop(cond, body, carry)
    step, finished, reason, _, n_gen, toks, lps, slps, cache, pos, logits = out
    return (toks, lps, slps, n_gen, reason), EngineState(cache=cache, positions_B=pos, next_logits_BxV=logits)


def to_host(x) -> np.ndarray:
    """`x` as a numpy array on this host. A global array with shards on other processes (multi-host) is
    all-gathered first (`process_allgather`: every process must make the same call, as SPMD code does)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


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
    def _check_prompts(self, prompts: Sequence[Sequence[int]], *, allow_empty: bool = False) -> list[np.ndarray]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        out = []
        v = self.config.vocab_size
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                raise GenerationError(f"prompt {i} is a string; pass token ids (or use generate_text with a "
                                      f"tokenizer)")
            arr = np.asarray(p)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise GenerationError(f"prompt {i} must be a flat list of integer token ids")
            if arr.size == 0 and not allow_empty:
                raise GenerationError(f"prompt {i} is empty")
            bad = arr[(arr < 0) | (arr >= v)]
            if bad.size:
                raise GenerationError(f"prompt {i} has token id {int(bad[0])} outside the vocabulary [0, {v})")
            out.append(arr.astype(np.int32))
        return out

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompts: Sequence[Sequence[int]], *, state: EngineState | None = None,
                reserve: int = 256, consume_state: bool = False) -> EngineState:
        """Run `prompts` (one token list per sequence) through the model, appending to `state` if given.

        Rows are left-padded to a common chunked length; `reserve` extra cache slots are allocated for the
        tokens generated next (the cache grows later if needed). The given `state` stays usable (e.g. to ask
        several questions about one prefilled document) unless `consume_state=True` lets its buffers be reused.
        """
        rows = self._check_prompts(prompts, allow_empty=state is not None)
        b = len(rows)
        if state is not None and state.batch_size != b:
            raise GenerationError(f"the state holds {state.batch_size} sequences, got {b} continuations")
        lens = np.array([len(r) for r in rows])
        start_pos = np.zeros(b, np.int64) if state is None else to_host(state.positions_B)
        too_long = np.nonzero(start_pos + lens > self.max_len)[0]
        if too_long.size:
            i = int(too_long[0])
            raise GenerationError(f"prompt {i} needs {int(start_pos[i] + lens[i])} positions, more than the "
                                  f"configured maximum {self.max_len}")
        longest = int(lens.max())
        chunk = _bucket(longest) if self.prefill_chunk is None else min(self.prefill_chunk, _bucket(longest))
        padded = _round_up(max(longest, 1), chunk)
        tokens = np.zeros((b, padded), np.int32)
        valid = np.zeros((b, padded), bool)
        positions = np.zeros((b, padded), np.int32)
        for i, r in enumerate(rows):
            n = len(r)
            tokens[i, padded - n:] = r
            valid[i, padded - n:] = True
            positions[i, padded - n:] = start_pos[i] + np.arange(n)
        if state is None:
            cache = init_cache(self.config, b, _round_up(padded + reserve, CACHE_ALIGN), mesh=self.mesh,
                               rules=self.rules)
            logits = jnp.zeros((b, self.config.vocab_size), jnp.float32)
        else:
            cache = self._place(grow_cache(state.cache, int(to_host(state.cache.length)) + padded + reserve))
            if not consume_state:
                cache = _fresh(cache, state.cache)
            logits = state.next_logits_BxV
        with self._on_mesh():
            for s in range(0, padded, chunk):
                cache, last = _forward_chunk(self.graphdef, self.params, cache, jnp.asarray(tokens[:, s:s + chunk]),
                                             jnp.asarray(positions[:, s:s + chunk]),
                                             jnp.asarray(valid[:, s:s + chunk]))
        has_new = jnp.asarray(lens > 0)
        logits = jnp.where(has_new[:, None], last, logits)
        return EngineState(cache=cache, positions_B=jnp.asarray(start_pos + lens, jnp.int32), next_logits_BxV=logits)

    # ------------------------------------------------------------------- decode
    def _decode_params(self, batch: int):
        """The parameters the decode loop reads: on CPU, when `batch`·k assignments make the MoE branch per
        expert (`experts_switch`, see `choose_impl`), a per-expert copy of the expert weights made once per
        engine (`unstack_experts`: no slice copies per step, at the price of the expert weights' memory once
        more) — unless that copy would take more than a quarter of the memory available now. Not with several
        processes: each host's free memory would decide for it, and every process must run the same programs."""
        c = self.config
        if (not self.unstack_experts or jax.default_backend() != "cpu" or jax.process_count() > 1
                or choose_impl(c.moe_impl, batch * c.num_experts_per_tok, c.num_local_experts) != "switch"):
            return self.params
        if self._unstacked is None:
            if expert_weight_bytes(self.params) > available_memory_bytes() / 4:
                self.unstack_experts = False
                return self.params
            self._unstacked = unstack_experts(self.params)
        return self._unstacked

    def decode(self, state: EngineState, sampling: SamplingParams | Sequence[SamplingParams], *,
               callback: Callable | None = None, prompt_tokens: Sequence[int] | None = None,
               consume_state: bool = False) -> tuple[list[GenerationResult], EngineState]:
        """Generate from `state` with one `SamplingParams` for all rows or one per row.

        `callback(step, tokens [B], active [B])` is called on the host after every step (streaming).
        Returns the results and the state after the last generated token (finished rows stop changing their
        state after their last token). `state` stays usable unless `consume_state=True`.
        """
        b = state.batch_size
        params = [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != b or not all(isinstance(p, SamplingParams) for p in params):
            raise GenerationError(f"need one SamplingParams or {b} of them")
        max_new = max(p.max_new_tokens for p in params)
        room = int(np.max(to_host(state.positions_B))) + max_new
        if room > self.max_len:
            raise GenerationError(f"prompt + max_new_tokens = {room} positions exceeds the configured maximum "
                                  f"{self.max_len}")
        grown = state.replace(cache=self._place(grow_cache(state.cache, int(to_host(state.cache.length)) + max_new)))
        state = grown if consume_state else _fresh(grown, state)
        eos = tuple(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos = tuple(sorted(set(eos) | {int(self.tokenizer.eos_token_id)}))
        sp = sampling_arrays(params, eos)
        hook = _HostHook(params, self.tokenizer, callback) if (callback or any(p.stop_strings for p in params)) \
            else None
        if hook is not None and any(p.stop_strings for p in params) and self.tokenizer is None:
            raise GenerationError("stop_strings need a tokenizer (Engine(model, tokenizer))")
        hook_id = id(hook) % (2**31)
        if hook is not None:
            _HOOKS[hook_id] = hook
        try:
            with self._on_mesh():
                (toks, lps, slps, n_gen, reason), new_state = _decode_loop(
                    self.graphdef, hook is not None, self._decode_params(b), state, sp,
                    jnp.asarray(max_new, jnp.int32), jnp.asarray(hook_id, jnp.int32))
            toks = to_host(toks)  # waits for the loop (and its host callbacks) to finish
        finally:
            _HOOKS.pop(hook_id, None)
        lps, slps, n_gen, reason = to_host(lps), to_host(slps), to_host(n_gen), to_host(reason)
        results = []
        for i in range(b):
            n = int(n_gen[i])
            r = GenerationResult(tokens=toks[i, :n].tolist(), logprobs=lps[i, :n].tolist(),
                                 sample_logprobs=slps[i, :n].tolist(), finish_reason=FINISH_REASONS[int(reason[i])],
                                 prompt_tokens=0 if prompt_tokens is None else int(prompt_tokens[i]))
            if self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.tokens)
                if hook is not None and hook.cut[i] is not None:
                    r.text = r.text[:hook.cut[i]]
            results.append(r)
        return results, new_state

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams], *,
                 callback: Callable | None = None) -> list[GenerationResult]:
        """Prefill `prompts` and decode; one result per prompt."""
        rows = self._check_prompts(prompts)
        params = [sampling] * len(rows) if isinstance(sampling, SamplingParams) else list(sampling)
        reserve = max(p.max_new_tokens for p in params) if params else 1
        state = self.prefill(rows, reserve=reserve)
        results, _ = self.decode(state, params, callback=callback, prompt_tokens=[len(r) for r in rows],
                                 consume_state=True)
        return results


def sampling_arrays(params: Sequence[SamplingParams], eos: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The per-row sampling and stopping settings the decode loop reads (`eos`: default stop tokens), as host
    arrays."""
    b = len(params)
    stops = [p.stop_token_ids if p.stop_token_ids is not None else eos for p in params]
    width = max([len(s) for s in stops] + [1])
    stop_ids = np.full((b, width), -1, np.int32)
    for i, s in enumerate(stops):
        stop_ids[i, :len(s)] = s
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
        "out_capacity": np.zeros((_bucket(max(p.max_new_tokens for p in params)),), np.int8),
    }


class _HostHook:
    """Per-step host work inside the decode loop: streaming callback and stop-string detection."""

    def __init__(self, params: list[SamplingParams], tokenizer, callback):
        self.params, self.tokenizer, self.callback = params, tokenizer, callback
        self.ids: list[list[int]] = [[] for _ in params]
        self.cut: list[int | None] = [None] * len(params)

    def __call__(self, step, tokens, active):
        tokens, active = np.asarray(tokens), np.asarray(active)
        hit = np.zeros(len(self.params), bool)
        for i, p in enumerate(self.params):
            if not active[i]:
                continue
            self.ids[i].append(int(tokens[i]))
            if p.stop_strings and self.tokenizer is not None:
                text = self.tokenizer.decode(self.ids[i])
                window = max(len(s) for s in p.stop_strings) + 16
                found = [text.find(s, max(0, len(text) - window - 64)) for s in p.stop_strings]
                found = [f for f in found if f >= 0]
                if found:
                    hit[i] = True
                    self.cut[i] = min(found)
        if self.callback is not None:
            self.callback(int(step), tokens, active)
        return hit


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
