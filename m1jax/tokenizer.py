"""Tokenizer for MiniMax-M1: byte-level BPE (`tokenizer.json`) or sentencepiece (`*.model`), special tokens and
chat template from `tokenizer_config.json`, and an incremental detokenizer for streaming.

M1 ships a GPT-2 style byte-level BPE (spec §8): `<beginning_of_sentence>` (bos), `<end_of_sentence>` (eos, id
200020), `<end_of_document>` (unk) and `<begin_of_document>` (opens every chat). Nothing is added by default
(`add_bos_token` is unset); the chat template writes the special tokens as text, which the BPE matches as added
tokens.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sentencepiece
import tokenizers

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class _BPEBackend:
    """A `tokenizers.Tokenizer` (the format of M1's `tokenizer.json`)."""

    file_name = TOKENIZER_JSON

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        added = tok.get_added_tokens_decoder()
        self.vocab_size = max([tok.get_vocab_size(with_added_tokens=False) - 1, *added]) + 1
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def save(self, directory: pathlib.Path) -> None:
        self.tok.save(str(directory / self.file_name))


class _SentencePieceBackend:
    """A `sentencepiece.SentencePieceProcessor` (e.g. a `tokenizer.model`)."""

    file_name = SENTENCEPIECE_MODEL

    def __init__(self, sp: sentencepiece.SentencePieceProcessor):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.vocab_size) if sp.is_control(i))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)  # unknown pieces map to unk_id: check the round trip
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def save(self, directory: pathlib.Path) -> None:
        (directory / self.file_name).write_bytes(self.sp.serialized_model_proto())


def _make_backend(obj: Any) -> _BPEBackend | _SentencePieceBackend:
    if isinstance(obj, (_BPEBackend, _SentencePieceBackend)):
        return obj
    if isinstance(obj, tokenizers.Tokenizer):
        return _BPEBackend(obj)
    if isinstance(obj, sentencepiece.SentencePieceProcessor):
        return _SentencePieceBackend(obj)
    raise TypeError(
        f"Tokenizer needs a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor, got {type(obj).__name__}"
    )


def _token_content(key: str, value: Any, source: str) -> str | None:
    """The string of a special token given as a string or an AddedToken dict `{"content": ...}`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key} must be a string or a dict with a 'content' string, got {value!r}")


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _find_model_file(directory: pathlib.Path) -> pathlib.Path:
    """`tokenizer.json` if present, else `tokenizer.model`, else the only `*.model` file of `directory`."""
    for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL):
        if (directory / name).is_file():
            return directory / name
    models = sorted(directory.glob("*.model"))
    if len(models) == 1:
        return models[0]
    if len(models) > 1:
        raise FileNotFoundError(
            f"{directory} holds several sentencepiece models ({', '.join(m.name for m in models)}) and no "
            f"{SENTENCEPIECE_MODEL}; pass the one to use as the path"
        )
    raise FileNotFoundError(
        f"no tokenizer found in {directory}: looked for {TOKENIZER_JSON} (byte-level BPE) and a sentencepiece "
        f"{SENTENCEPIECE_MODEL} or other *.model file"
    )


def _load_backend(model_file: pathlib.Path) -> _BPEBackend | _SentencePieceBackend:
    if model_file.suffix == ".json":
        try:
            return _BPEBackend(tokenizers.Tokenizer.from_file(str(model_file)))
        except Exception as err:  # tokenizers raises a bare Exception for bad files
            raise ValueError(f"{model_file} is not a valid tokenizers JSON file: {err}") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(model_file))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{model_file} is not a valid sentencepiece model: {err}") from None
    return _SentencePieceBackend(sp)


def _config_chat_template(value: Any, source: str) -> str | None:
    """The chat template string of a config entry: a string, or a list of `{"name", "template"}` (the default)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{source}: chat_template is a list without a 'default' template (names: {sorted(named)})")
    raise ValueError(f"{source}: chat_template must be a string, got {type(value).__name__}")


class Tokenizer:
    """Text <-> token ids with M1's special tokens and chat template.

    `backend` is a `tokenizers.Tokenizer` (byte-level BPE) or a `sentencepiece.SentencePieceProcessor`. Special
    tokens are given as strings and must be in the vocabulary (a `ValueError` names any that is not).
    `encode(..., add_special_tokens=True)` applies the BPE's own post-processor, then prepends bos /
    appends eos where `add_bos_token` / `add_eos_token` ask for it and they are not already there.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: Sequence[str] = (),
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        config: Mapping[str, Any] | None = None,
    ):
        self._backend = _make_backend(backend)
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self._config = dict(config or {})  # other tokenizer_config.json keys, written back by save_pretrained
        tokens = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
        self.special_tokens_map = {k: v for k, v in tokens.items() if v is not None}
        self.additional_special_tokens = list(additional_special_tokens)
        self._special_ids = {k: self._require_id(k, v) for k, v in self.special_tokens_map.items()}
        extra_ids = [self._require_id("additional special token", t) for t in self.additional_special_tokens]
        self.special_token_ids = frozenset([*self._special_ids.values(), *extra_ids, *self._backend.special_ids])

    def _require_id(self, what: str, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    # ---- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> Tokenizer:
        """Loads a tokenizer directory (or a `tokenizer.json` / `*.model` file with its config beside it).

        Reads `tokenizer.json` (preferred) or a sentencepiece `*.model`, plus `tokenizer_config.json` if present
        (special tokens, `chat_template`, `add_bos_token`, `add_eos_token`) and `chat_template.jinja` if present
        (it takes precedence over the config's template).
        """
        path = pathlib.Path(path)
        if path.is_file():
            directory, model_file = path.parent, path
        elif path.is_dir():
            directory, model_file = path, _find_model_file(path)
        else:
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        backend = _load_backend(model_file)
        config_file = directory / TOKENIZER_CONFIG
        config = _read_json(config_file) if config_file.is_file() else {}
        source = str(config_file)
        tokens = {k: _token_content(k, config.get(k), source) for k in NAMED_SPECIAL_TOKENS}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = extra.values() if isinstance(extra, Mapping) else extra
        extra = [_token_content("additional_special_tokens", t, source) for t in extra]
        template = _config_chat_template(config.get("chat_template"), source)
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        try:
            return cls(
                backend,
                **tokens,
                additional_special_tokens=extra,
                chat_template=template,
                add_bos_token=config.get("add_bos_token", False),
                add_eos_token=config.get("add_eos_token", False),
                config=config,
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err} ({model_file.name})") from None

    def save_pretrained(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes `tokenizer.json` or `tokenizer.model` and `tokenizer_config.json` into `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        config = {k: v for k, v in self._config.items() if k not in NAMED_SPECIAL_TOKENS}
        if isinstance(self._backend, _BPEBackend):
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special_tokens_map)
        config.pop("extra_special_tokens", None)
        config["additional_special_tokens"] = self.additional_special_tokens
        config["add_bos_token"], config["add_eos_token"] = self.add_bos_token, self.add_eos_token
        config["chat_template"] = self.chat_template
        config = {k: v for k, v in config.items() if v is not None}
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / TOKENIZER_CONFIG).write_text(text, encoding="utf-8")
        return directory

    # ---- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """1 + the largest token id (special tokens included): every id the tokenizer produces is below it."""
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_ids.get("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_ids.get("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_ids.get("pad_token")

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` (a vocabulary entry, e.g. `"<end_of_sentence>"`), or None if there is none."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id`, or None when the id is out of range."""
        return self._backend.id_to_token(int(token_id))

    # ---- encoding and decoding ----------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = list(self._backend.encode(text, add_special_tokens))
        if add_special_tokens:
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos_token and bos is not None and ids[:1] != [bos]:
                ids.insert(0, bos)
            if self.add_eos_token and eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; with `skip_special_tokens` the ids in `special_token_ids` are left out."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        return self._backend.decode(ids)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        normalize: bool = True,
        **extra: Any,
    ) -> str | list[int]:
        """Renders `messages` with this tokenizer's chat template (see `m1jax.chat.apply_chat_template`).

        The template also sees the special tokens (`bos_token`, `eos_token`, ...) as transformers passes them;
        `extra` overrides them. With `tokenize=True` returns the ids of the text (no special tokens added: the
        template writes them).
        """
        from m1jax import chat

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (none in tokenizer_config.json); pass one to chat")
        kwargs = {**self.special_tokens_map, **extra}
        text = chat.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            normalize=normalize,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_")
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, eos={self.special_tokens_map.get('eos_token')!r})"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that id completes.

    Keeps a short window of ids: the text of the window minus the text of its already-emitted head is new, unless
    it ends in U+FFFD (a byte-level or byte-fallback token that split a UTF-8 character), in which case it waits
    for more ids. Decoding the window, not single tokens, keeps sentencepiece's space handling right. Invariant:
    the concatenation of every `push` result and `flush()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: text of ids[_prefix:_read] was emitted
        self._read = 0  # end of the emitted part

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        head = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) <= len(head) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(head) :]

    def extend(self, ids: Iterable[int]) -> str:
        """Adds several ids; returns the text they complete."""
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Returns the text still held back (e.g. an incomplete UTF-8 tail, as U+FFFD) and ends the window."""
        head = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(head) :]
