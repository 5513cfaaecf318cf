"""Training data streams with a resumable position: prompt sources for RL, token batches for SFT.

Every source draws from its own `numpy.random.Generator` seeded from the run seed; `state_dict()` /
`load_state_dict()` capture the generator state and the position in the data, so a resumed run reads exactly
the prompts/batches the uninterrupted run would have read. In a run of several processes every process advances
its source by the whole step's draw (so the state is one value) and builds only its share of it (`share` /
`rows`, see `m1jax.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from m1jax.train.tasks import reverse3

DATA_STREAM = 1  # SeedSequence spawn key of the data sampler (the trainer RNG uses 2)


class DataError(ValueError):
    """A dataset file or row is malformed; the message names the file and line."""


def stream_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))


@dataclasses.dataclass
class Prompt:
    """One prompt: token ids, its text (what text rewards see) and dataset fields passed to rewards."""

    ids: list[int]
    text: str
    fields: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- prompts
class Reverse3Prompts:
    """Uniform reverse-3 prompts `BOS d1 d2 d3 SEP`; completions stop at EOS (the task's own 14-token vocab)."""

    prompt_len = reverse3.PROMPT_LEN
    stop_token_ids = (reverse3.EOS,)
    vocab_size = reverse3.VOCAB_SIZE

    def __init__(self, seed: int):
        self.rng = stream_rng(seed, DATA_STREAM)
        self.drawn = 0

    def next_batch(self, n: int, share: slice = slice(None)) -> list[Prompt]:
        """Prompts `share` of the next `n` (the state advances by `n`)."""
        prompts_NxP, _ = reverse3.sample_prompts(self.rng, n)
        self.drawn += n
        return [Prompt(ids=p.tolist(), text=reverse3.decode(p)) for p in prompts_NxP[share]]

    def decode(self, ids) -> str:
        return reverse3.decode(ids)

    def batch_metrics(self, prompt_ids_NxP, completions) -> dict[str, float]:
        """exact_match: fraction of completions exactly `d3 d2 d1 EOS`; pos{k}_acc: fraction with the right token
        at output position k = 1..4 (d3, d2, d1, EOS)."""
        width = max([len(c) for c in completions] + [reverse3.TARGET_LEN])
        comp = np.full((len(completions), width), reverse3.PAD, np.int64)
        for i, c in enumerate(completions):
            comp[i, :len(c)] = c
        prompts = np.asarray(prompt_ids_NxP)
        out = {"exact_match": float(np.mean(reverse3.exact_match(prompts, comp)))}
        right_Nx4 = comp[:, :reverse3.TARGET_LEN] == reverse3.target_ids(prompts)
        out.update({f"pos{k + 1}_acc": float(np.mean(right_Nx4[:, k])) for k in range(reverse3.TARGET_LEN)})
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])


def _read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read dataset {path}: {e}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
        rows.append((i, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


class _EpochOrder:
    """Rows visited in a fresh random permutation every epoch; the position is (epoch, index, rng state)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = stream_rng(seed, DATA_STREAM)
        self.epoch, self.index = 0, 0
        self.order = self.rng.permutation(n)

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self.order = self.rng.permutation(self.n)
            out.append(int(self.order[self.index]))
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "index": self.index,
                "order": self.order.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.order = np.asarray(state["order"], np.int64)


class JsonlPrompts:
    """Prompts from a JSONL file: each row has `prompt_field` (text, encoded with the tokenizer) or `prompt_ids`
    (token ids); every other key is passed to the reward functions (e.g. `answer`, `tests`)."""

    prompt_len = None
    stop_token_ids = None  # the tokenizer's / model's EOS

    def __init__(self, path: str | Path, tokenizer, seed: int, *, prompt_field: str = "prompt"):
        self.tokenizer = tokenizer
        self.prompts: list[Prompt] = []
        for line, row in _read_jsonl(path):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line}: each row must be a JSON object")
            fields = {k: v for k, v in row.items() if k not in (prompt_field, "prompt_ids")}
            if "prompt_ids" in row:
                ids = row["prompt_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
                    raise DataError(f"{path}:{line}: 'prompt_ids' must be a non-empty list of integers")
                text = row.get(prompt_field) or tokenizer.decode(ids)
            elif isinstance(row.get(prompt_field), str):
                text = row[prompt_field]
                ids = tokenizer.encode(text)
            else:
                raise DataError(f"{path}:{line}: needs a text field {prompt_field!r} or 'prompt_ids'")
            self.prompts.append(Prompt(ids=list(ids), text=text, fields=fields))
        self.order = _EpochOrder(len(self.prompts), seed)

    def next_batch(self, n: int, share: slice = slice(None)) -> list[Prompt]:
        """Prompts `share` of the next `n` (the position advances by `n`)."""
        return [self.prompts[i] for i in self.order.take(n)[share]]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def batch_metrics(self, prompt_ids_NxP, completions) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- SFT
@dataclasses.dataclass
class TokenBatch:
    """tokens_BxL int32 (right-padded with 0), valid_BxL bool, mask_BxL float32: the positions t whose token
    x_t is predicted and counts in the loss (t ≥ 1, real, and in the completion part if there is one)."""

    tokens_BxL: np.ndarray
    valid_BxL: np.ndarray
    mask_BxL: np.ndarray


class SftExamples:
    """Next-token training data from JSONL: rows `{"tokens": [...]}`, `{"text": "..."}` (needs a tokenizer) or
    `{"prompt": ..., "completion": ...}` (text or id lists; only completion tokens count in the loss).
    Sequences longer than `seq_len` are truncated; batches are drawn in per-epoch random order."""

    def __init__(self, path: str | Path, seq_len: int, *, tokenizer=None, seed: int = 0, vocab_size: int | None = None):
        self.seq_len = seq_len
        self.examples: list[tuple[list[int], int]] = []  # (ids, index of the first counted token)
        for line, row in _read_jsonl(path):
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: each row must be a JSON object")
            if "tokens" in row:
                ids, start = self._ids(row["tokens"], tokenizer, where, "tokens"), 1
            elif "text" in row:
                ids, start = self._ids(row["text"], tokenizer, where, "text"), 1
            elif "prompt" in row and "completion" in row:
                p = self._ids(row["prompt"], tokenizer, where, "prompt")
                c = self._ids(row["completion"], tokenizer, where, "completion")
                ids, start = p + c, max(len(p), 1)
            else:
                raise DataError(f"{where}: needs 'tokens', 'text' or 'prompt' + 'completion'")
            if len(ids) < 2:
                raise DataError(f"{where}: a sequence needs at least 2 tokens")
            if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
                raise DataError(f"{where}: token ids must lie in [0, {vocab_size})")
            self.examples.append((ids[:seq_len], start))
        self.order = _EpochOrder(len(self.examples), seed)

    @staticmethod
    def _ids(value, tokenizer, where, key) -> list[int]:
        if isinstance(value, str):
            if tokenizer is None:
                raise DataError(f"{where}: '{key}' is text; set `tokenizer` in the run config")
            return tokenizer.encode(value)
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return list(value)
        raise DataError(f"{where}: '{key}' must be text or a list of token ids")

    def next_batch(self, batch_size: int, rows=None) -> TokenBatch:
        """Rows `rows` (indices into the batch, default all) of the next `batch_size` sequences (the position
        advances by `batch_size`)."""
        picked = self.order.take(batch_size)
        picked = picked if rows is None else [picked[r] for r in rows]
        b, l = len(picked), self.seq_len
        tokens = np.zeros((b, l), np.int32)
        valid = np.zeros((b, l), bool)
        mask = np.zeros((b, l), np.float32)
        for row, i in enumerate(picked):
            ids, start = self.examples[i]
            tokens[row, :len(ids)] = ids
            valid[row, :len(ids)] = True
            mask[row, start:len(ids)] = 1.0
        return TokenBatch(tokens, valid, mask)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
