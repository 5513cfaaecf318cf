"""Streaming input for long documents: block-wise tokenization, chunk-by-chunk prefill, resumable checkpoints.

A million-token document never exists as one token list or one activation tensor here:

* `read_text` decodes the file in byte pieces (an incremental UTF-8 decoder, so a multibyte character split
  between pieces is whole again); `encode_blocks` tokenizes the text in blocks, cutting only at a point p whose
  two sides encode to exactly the tokens of the uncut text: encode(w[:p]) + encode(w[p:]) == encode(w) for the
  window w = text[block start : p + lookahead], and only after a non-whitespace character. A byte-level BPE merges
  only inside one pre-token, and a pre-token ending in a non-whitespace character ends where it does because of
  the next few characters (a special token's text: its length), so with a `lookahead` above that (1024 chars by
  default) the blocks concatenate to the whole text's encoding.
* `prefill_stream` feeds the tokens to `Engine.prefill(state=...)` in chunks of `engine.prefill_chunk` tokens at
  absolute multiples of the chunk, so only one chunk's activations exist at a time; the cache grows to
  power-of-two capacities (a function of the tokens consumed only).
* Every `checkpoint_every` tokens (a multiple of the chunk) the state is written with `save_state` (atomic) with
  the tokens consumed and a fingerprint of the input, model, tokenizer and chunk. A rerun resumes from the last
  checkpoint and performs exactly the chunk calls the uninterrupted run performs after that point, on a cache of
  the same capacity, so its result is the uninterrupted result; a checkpoint of a different input or model is
  refused.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.cache import init_cache
from m1jax.generation import (
    CACHE_ALIGN,
    Engine,
    EngineState,
    GenerationError,
    grow_cache,
    load_state,
    save_state,
    saved_state_metadata,
    to_host,
)

DEFAULT_CHUNK = 4096  # tokens per prefill call when the engine runs whole prompts in one call
_CHECKPOINT = re.compile(r"^state-(\d{12})$")
_PROBE = "Streaming probe: café naïve 你好 😀  \t\n  spaces   and\n\n\nnewlines <think>x</think>"


# --------------------------------------------------------------------------------------------- tokenization
BLOCK_CHARS = 1 << 16  # characters per tokenizer call when a text is encoded block by block


def read_text(path: str | os.PathLike, piece_bytes: int = 1 << 20) -> Iterator[str]:
    """The UTF-8 text of the file at `path` in pieces of about `piece_bytes` bytes (never a split character)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(piece_bytes)
            held = len(decoder.getstate()[0])  # bytes of a character begun in the previous piece
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise GenerationError(f"{path} is not UTF-8 text: invalid byte at offset "
                                      f"{offset - held + e.start}") from None
            if text:
                yield text
            if not data:
                return
            offset += len(data)


def _cut_candidates(window: str, lo: int, hi: int, tries: int) -> Iterator[int]:
    """Cut points p in (lo, hi] after a non-whitespace character, best first: starts of whitespace runs, then
    any such position (both descending). A cut never ends the left part inside a whitespace run, whose
    pre-tokenization depends on how far the run goes."""
    seen = 0
    for p in range(hi, lo, -1):
        if window[p].isspace() and not window[p - 1].isspace():
            seen += 1
            yield p
            if seen >= tries:
                break
    yield from (p for p in range(hi, max(lo, hi - tries), -1) if not window[p - 1].isspace())


def _safe_cut(encode: Callable[[str], list[int]], window: str, lo: int, hi: int, tries: int = 16) -> int | None:
    """A point p in (lo, hi] with encode(window[:p]) + encode(window[p:]) == encode(window), or None."""
    whole = encode(window)
    for p in _cut_candidates(window, lo, hi, tries):
        head = encode(window[:p])
        if head == whole[:len(head)] and head + encode(window[p:]) == whole:
            return p
    return None


def encode_blocks(tokenizer, pieces: Iterable[str], *, block_chars: int = BLOCK_CHARS,
                  lookahead: int = 1024) -> Iterator[list[int]]:
    """The token ids of the concatenated text `pieces` (e.g. `read_text(path)`), as consecutive blocks of about
    `block_chars` characters of text each; their concatenation is `tokenizer.encode(text)` (see the module
    docstring for the cut rule; `lookahead` is raised above the longest special token's text). A stretch with no
    safe cut is taken whole with the next block."""
    if block_chars < 1 or lookahead < 1:
        raise GenerationError(f"block_chars and lookahead must be ≥ 1, got {block_chars} and {lookahead}")
    specials = [tokenizer.id_to_token(i) or "" for i in getattr(tokenizer, "special_token_ids", ())]
    lookahead = max([lookahead, *(len(t) + 1 for t in specials)])  # a special token's text is seen whole
    buf, target = "", block_chars
    for piece in pieces:
        buf += piece
        while len(buf) > target + lookahead:
            cut = _safe_cut(tokenizer.encode, buf[:target + lookahead], target // 2, target)
            if cut is None:
                target *= 2
                continue
            yield tokenizer.encode(buf[:cut])
            buf, target = buf[cut:], block_chars
    if buf:
        yield tokenizer.encode(buf)


def encode_text(tokenizer, text: str, *, block_chars: int = BLOCK_CHARS, lookahead: int = 1024) -> list[int]:
    """`tokenizer.encode(text)` (the same ids), computed block by block with `encode_blocks` when the text is
    longer than `block_chars` characters, so a long document is never tokenized in one call."""
    if len(text) <= block_chars:
        return tokenizer.encode(text)
    pieces = (text[i:i + block_chars] for i in range(0, len(text), block_chars))
    return [t for block in encode_blocks(tokenizer, pieces, block_chars=block_chars, lookahead=lookahead)
            for t in block]


# ---------------------------------------------------------------------------------------------- fingerprints
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def model_fingerprint(engine: Engine) -> str:
    """Hex SHA-256 over the model's config (architecture and runtime fields) and, per parameter, its path, shape,
    dtype and the bytes of its first and last rows: a different config, dtype, seed or checkpoint changes it
    (not a proof that every weight is equal); cheap on a sharded model (two small slices per parameter)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(engine.config), sort_keys=True, default=str).encode())
    for path, x in sorted(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(engine.params)),
                          key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}".encode())
        lead = x.ndim - 1
        for idx in ((0,) * lead, (-1,) * lead) if x.ndim else ((),):
            h.update(np.ascontiguousarray(to_host(x[idx])).tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hex SHA-256 of the tokenizer's vocabulary size and its encoding of a probe text (multibyte, whitespace)."""
    return hashlib.sha256(json.dumps([tokenizer.vocab_size, tokenizer.encode(_PROBE)]).encode()).hexdigest()


# -------------------------------------------------------------------------------------------- chunked prefill
@dataclasses.dataclass
class StreamedPrefill:
    """The state after the whole input, its token count, and the token count restored from a checkpoint (0: none)."""

    state: EngineState
    tokens: int
    resumed_from: int


def _capacity(n: int) -> int:
    """Cache slots for `n` tokens: the next power of two ≥ max(n, CACHE_ALIGN)."""
    return 1 << (max(n, CACHE_ALIGN) - 1).bit_length()


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `directory` as (tokens consumed, path), oldest first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def _explain_mismatch(saved: dict, expected: dict, directory: Path) -> str:
    what = {"input": "the input changed", "model": "the model differs", "tokenizer": "the tokenizer differs",
            "prefill_chunk": "the prefill chunk differs",
            "context_window": "the context window differs"}
    diffs = [f"{what.get(k, k)} ({k}: checkpoint {saved.get(k)!r}, now {v!r})" for k, v in expected.items()
             if saved.get(k) != v]
    return (f"refusing to resume from {directory}: " + "; ".join(diffs) +
            ". Delete the directory or choose another --checkpoint-dir to start over.")


def prefill_stream(engine: Engine, token_blocks: Iterable[Sequence[int]], *, checkpoint_dir=None,
                   checkpoint_every: int | None = None, fingerprint: dict | None = None,
                   context_window: int | None = None, reserve: int = 0,
                   progress: Callable[[int], None] | None = None) -> StreamedPrefill:
    """Prefill one sequence with the concatenated `token_blocks`, chunk by chunk (see the module docstring).

    With `checkpoint_dir`, resumes from the newest checkpoint there whose `fingerprint` (a JSON-able dict naming
    the input and model) equals this one's — a different one is refused — and writes a checkpoint every
    `checkpoint_every` tokens, keeping only the newest. `context_window`: cache slots allocated up front (one
    compiled shape; the input plus `reserve` tokens to be generated must fit, else a `GenerationError`); without
    it the cache doubles as needed. `progress(tokens_consumed)` is called after each chunk.
    """
    chunk = engine.prefill_chunk or DEFAULT_CHUNK
    if context_window is not None and not 1 <= context_window <= engine.max_len:
        raise GenerationError(f"context_window must be in [1, {engine.max_len}], got {context_window}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise GenerationError("checkpoint_every needs a checkpoint directory")
    if checkpoint_dir is not None:
        checkpoint_every = checkpoint_every or chunk * max(1, 65536 // chunk)
        if checkpoint_every < 1 or checkpoint_every % chunk:
            raise GenerationError(f"checkpoint_every must be a positive multiple of the prefill chunk {chunk}, "
                                  f"got {checkpoint_every}")
    expected = {**(fingerprint or {}), "prefill_chunk": chunk, "context_window": context_window}
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    state, consumed = None, 0
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".state-*.tmp-*"):  # a save killed before its atomic rename
            shutil.rmtree(stale, ignore_errors=True)
        if found := _checkpoints(directory):
            consumed, path = found[-1]
            saved = saved_state_metadata(path)
            if any(saved.get(k) != v for k, v in expected.items()):
                raise GenerationError(_explain_mismatch(saved, expected, directory))
            state = load_state(path, engine.config)
            state = state.replace(cache=engine._place(state.cache))
    resumed_from = consumed
    def capacity(n: int) -> int:
        return _capacity(n) if context_window is None else -(-context_window // CACHE_ALIGN) * CACHE_ALIGN

    if state is None:
        state = EngineState(cache=init_cache(engine.config, 1, capacity(chunk), mesh=engine.mesh, rules=engine.rules),
                            positions_B=jnp.zeros((1,), jnp.int32),
                            next_logits_BxV=jnp.zeros((1, engine.config.vocab_size), jnp.float32))

    def feed(ids: list[int]):
        nonlocal state, consumed
        if context_window is not None and consumed + len(ids) + reserve > context_window:
            raise GenerationError(f"the input needs at least {consumed + len(ids)} tokens (+ {reserve} to generate), "
                                  f"more than the context window {context_window}")
        room = capacity(int(to_host(state.cache.length)) + chunk)
        state = state.replace(cache=engine._place(grow_cache(state.cache, room)))
        state = engine.prefill([ids], state=state, reserve=0, consume_state=True)
        consumed += len(ids)
        if directory is not None and consumed % checkpoint_every == 0 and len(ids) == chunk:
            path = directory / f"state-{consumed:012d}"
            save_state(state, path, metadata={**expected, "tokens_consumed": consumed})
            for _, old in _checkpoints(directory)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        if progress is not None:
            progress(consumed)

    seen, pending = 0, []
    for block in token_blocks:
        block = list(block)
        skip = min(len(block), max(0, resumed_from - seen))
        seen += len(block)
        pending.extend(block[skip:])
        while len(pending) >= chunk:
            feed(pending[:chunk])
            pending = pending[chunk:]
    if seen < resumed_from:
        raise GenerationError(f"the checkpoint has consumed {resumed_from} tokens but the input has only {seen}")
    if pending:
        feed(pending)
    if seen == 0:
        raise GenerationError("the input is empty (no tokens)")
    return StreamedPrefill(state=state, tokens=seen, resumed_from=resumed_from)


def prefill_file(engine: Engine, path: str | os.PathLike, *, block_chars: int = BLOCK_CHARS,
                 **stream) -> StreamedPrefill:
    """`prefill_stream(engine, blocks, **stream)` of a UTF-8 text file tokenized block-wise with the engine's
    tokenizer; checkpoints are fingerprinted by the file's SHA-256, the model and the tokenizer."""
    if engine.tokenizer is None:
        raise GenerationError("prefilling a text file needs a tokenizer (Engine(model, tokenizer))")
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"--input-file {path} is not a readable file")
    if stream.get("checkpoint_dir") is not None:
        stream["fingerprint"] = {"input": f"sha256:{file_sha256(path)}", "model": model_fingerprint(engine),
                                 "tokenizer": tokenizer_fingerprint(engine.tokenizer)}
    return prefill_stream(engine, encode_blocks(engine.tokenizer, read_text(path), block_chars=block_chars), **stream)
