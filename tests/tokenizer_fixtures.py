"""Tiny tokenizers trained in-process for tests (no downloads): a byte-level BPE in M1's format and a sentencepiece
model, each written as a tokenizer directory that `m1jax.tokenizer.Tokenizer.from_pretrained` loads.

`make_bpe_tokenizer_dir` is shared with other tests (e.g. the generation CLI): its ids fit a model with
`vocab_size` rows, the 4 MiniMax special tokens sit at the top of the vocabulary (as in M1, above the BPE range),
and its `tokenizer_config.json` carries `M1_FORMAT_TEMPLATE`.
"""

from __future__ import annotations

import io
import json
import pathlib

from m1jax.demo import (  # noqa: F401  (re-exported for the tests)
    BOD,
    BOS,
    EOS,
    M1_FORMAT_TEMPLATE,
    MINIMAX_SPECIAL_TOKENS,
    UNK,
    make_bpe_tokenizer_dir,
    train_bpe_tokenizer,
    training_corpus,
)


def train_sentencepiece_model(vocab_size: int = 400) -> bytes:
    """Serialized sentencepiece BPE model with byte fallback, identity normalization and the MiniMax special
    tokens as user-defined symbols (ids 1-4; 0 is `<unk>`), trained in memory."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=list(MINIMAX_SPECIAL_TOKENS),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def make_sentencepiece_tokenizer_dir(path, vocab_size: int = 400, chat_template: str | None = M1_FORMAT_TEMPLATE):
    """Writes `tokenizer.model` + `tokenizer_config.json` (M1's special tokens) into `path`; returns the path."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(train_sentencepiece_model(vocab_size))
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "add_bos_token": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path
