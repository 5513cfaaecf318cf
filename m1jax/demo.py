"""The embedded default of m1jax: a small trained MiniMax-architecture reasoning model, shipped as package data.

`load_default_model()` is the model `m1jax generate` (and any other entry point given no model) uses: the demo
model in `m1jax/demo_model/` (HF original layout: config.json, safetensors, tokenizer files; 4.9 MB). It is a
4-layer lightning + softmax model with a 4-expert top-2 MoE, trained from scratch by this project's trainers
(`m1jax train sft`, then `m1jax train cispo`; recipe in configs/train/demo_sft.yaml and demo_cispo.yaml, accuracy
in benchmarks/RESULTS.md) to answer two-digit addition, subtraction and multiplication asked in English, in M1's
format: a worked scratchpad in `<think>…</think>`, then the answer (train/tasks/arithmetic.py). Its tokenizer is
a byte-level BPE in M1's format (special tokens, chat template) whose digits are single tokens.

When the shipped files are missing (a partial install), it falls back, with a warning, to the `tiny` preset with
random weights and `demo_tokenizer()` (gibberish text that still exercises the whole generation path). The
helpers below build that tokenizer in-process (nothing downloaded) and the demo model's tokenizer.
"""

from __future__ import annotations

import json
import pathlib

BOS, EOS, UNK, BOD = "<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>", "<begin_of_document>"
MINIMAX_SPECIAL_TOKENS = (BOS, EOS, UNK, BOD)
DEMO_VOCAB_SIZE = 512

# M1's prompt format (spec §8) written compactly: renders the same text as the real template in
# tests/fixtures/minimax-m1/tokenizer_config.json (tests/test_chat.py checks this).
M1_FORMAT_TEMPLATE = (
    "{{- '<begin_of_document>' -}}\n"
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'][0]['text'] -%}"
    "{%- endfor -%}\n"
    "{%- if ns.system != '' -%}"
    "{{- '<beginning_of_sentence>system ai_setting=assistant\\n' + ns.system + '<end_of_sentence>\\n' -}}"
    "{%- endif -%}\n"
    "{%- if tools -%}\n"
    "{{- '<beginning_of_sentence>system tool_setting=tools\\nYou are provided with these tools:\\n<tools>\\n' -}}\n"
    "{%- for tool in tools -%}{{- tool | tojson ~ '\\n' -}}{%- endfor -%}\n"
    "{{- '</tools>\\n\\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and "
    "provide tool-name and json-object of arguments, following the format below:\\n<tool_calls>\\n"
    "{name: <tool-name-1>, arguments: <args-json-object-1>}\\n...\\n</tool_calls><end_of_sentence>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<beginning_of_sentence>user name=user\\n' + m['content'][0]['text'] + '<end_of_sentence>\\n' -}}\n"
    "{%- elif m['role'] == 'assistant' -%}{{- '<beginning_of_sentence>ai name=assistant\\n' -}}"
    "{%- for c in m['content'] if c['type'] == 'text' -%}{{- c['text'] -}}{%- endfor -%}"
    "{{- '<end_of_sentence>\\n' -}}\n"
    "{%- elif m['role'] == 'tool' -%}{{- '<beginning_of_sentence>tool name=tools\\n' -}}"
    "{%- for c in m['content'] -%}{{- 'tool name: ' + c['name'] + '\\ntool result: ' + c['text'] + '\\n\\n' -}}"
    "{%- endfor -%}{{- '<end_of_sentence>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<beginning_of_sentence>ai name=assistant\\n' -}}{%- endif -%}\n"
)

_WORDS = (
    "the of and to in is that it was for on are as with his they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many "
    "then them these so some her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come made may part model "
    "token attention lightning expert router layer weight cache prompt answer think tool result weather sunny "
    "assistant user system penguin swan poem moon cloud flower river mountain"
).split()
_EXTRA_TEXT = (
    "你好世界，今天天气很好。我们一起去公园散步吧。机器学习模型需要大量数据。",
    "Emoji: 😀 😃 🎉 🚀 🐧 ❤️ 👍🏽 — and accents: café naïve façade São Paulo Zürich.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "def forward(x):\n    return x * 2  # tabs\tand  spaces\n",
    "<think>\nLet me reason step by step.\n</think>\nThe answer is 42.",
)


def training_corpus(n_lines: int = 400) -> list[str]:
    """A deterministic mixed corpus: English-like word salad, CJK, emoji, JSON and code."""
    lines = []
    for i in range(n_lines):
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 11) % len(_WORDS)] for j in range(8 + i % 9)]
        lines.append(" ".join(words).capitalize() + (".", "?", "!", ",")[i % 4])
    return lines + list(_EXTRA_TEXT) * 20


def train_bpe_tokenizer(vocab_size: int = 512, *, extra_corpus: list[str] | None = None, split_digits: bool = False):
    """A `tokenizers.Tokenizer`: GPT-2 style byte-level BPE with the MiniMax special tokens as the last 4 ids,
    merges trained on `training_corpus()` plus `extra_corpus`; with `split_digits` every digit is its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MINIMAX_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus() + list(extra_corpus or ()), trainer)
    tok.add_special_tokens(list(MINIMAX_SPECIAL_TOKENS))
    return tok


def make_bpe_tokenizer_dir(path, vocab_size: int = 512, chat_template: str | None = M1_FORMAT_TEMPLATE, *,
                           extra_corpus: list[str] | None = None, split_digits: bool = False):
    """Writes `tokenizer.json` + `tokenizer_config.json` (M1's special tokens, `chat_template`) into `path`;
    `extra_corpus` and `split_digits` as in `train_bpe_tokenizer`.

    Every id is below `vocab_size`. Returns `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(vocab_size, extra_corpus=extra_corpus, split_digits=split_digits)
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab_size
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": 40960000,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def demo_tokenizer(vocab_size: int = 512):
    """An `m1jax.tokenizer.Tokenizer` over `train_bpe_tokenizer(vocab_size)` with M1's special tokens and template."""
    from m1jax.tokenizer import Tokenizer

    return Tokenizer(train_bpe_tokenizer(vocab_size), bos_token=BOS, eos_token=EOS, unk_token=UNK,
                     chat_template=M1_FORMAT_TEMPLATE)


DEMO_MODEL_DIR = pathlib.Path(__file__).parent / "demo_model"
_DEMO_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json")


def demo_model_dir() -> pathlib.Path | None:
    """The directory of the shipped trained demo model, or None when its files are not installed."""
    return DEMO_MODEL_DIR if all((DEMO_MODEL_DIR / f).is_file() for f in _DEMO_FILES) else None


def load_default_model(*, dtype: str | None = None, quantize: str | None = None, mesh=None):
    """(model, tokenizer) of the embedded default: the trained demo model (module docstring), or, when its files
    are missing, the `tiny` preset with random weights and `demo_tokenizer()`, with a warning saying so."""
    directory = demo_model_dir()
    if directory is None:
        import warnings

        warnings.warn(f"the trained demo model is not installed ({DEMO_MODEL_DIR} lacks {', '.join(_DEMO_FILES)}); "
                      f"using the 'tiny' preset with random weights instead: its text is gibberish", stacklevel=2)
        model = demo_model("tiny", dtype=dtype or "float32", quantize=quantize)
        return model, demo_tokenizer(model.config.vocab_size)
    from m1jax.loading import from_pretrained
    from m1jax.tokenizer import Tokenizer

    return from_pretrained(directory, dtype=dtype, quantize=quantize, mesh=mesh), Tokenizer.from_pretrained(directory)


def demo_model(preset: str = "tiny", seed: int = 0, **runtime):
    """The preset `preset` with random weights (seed `seed`)."""
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    return MiniMaxM1(ModelConfig.from_preset(preset, **runtime), rngs=nnx.Rngs(seed))
