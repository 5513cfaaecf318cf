"""The embedded default of m1jax: a tiny MiniMax-architecture model and a byte-level BPE tokenizer in M1's format,
both built in-process (nothing downloaded). The model has random weights until a trained demo model exists, so
its text is gibberish; it exercises the whole generation path (tokenizer, chat template, hybrid cache, sampling).
"""

from __future__ import annotations

import json
import pathlib

BOS, EOS, UNK, BOD = "<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>", "<begin_of_document>"
MINIMAX_SPECIAL_TOKENS = (BOS, EOS, UNK, BOD)

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


def train_bpe_tokenizer(vocab_size: int = 512):
    """A `tokenizers.Tokenizer`: GPT-2 style byte-level BPE with the MiniMax special tokens as the last 4 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MINIMAX_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    tok.add_special_tokens(list(MINIMAX_SPECIAL_TOKENS))
    return tok


def make_bpe_tokenizer_dir(path, vocab_size: int = 512, chat_template: str | None = M1_FORMAT_TEMPLATE):
    """Writes `tokenizer.json` + `tokenizer_config.json` (M1's special tokens, `chat_template`) into `path`.

    Every id is below `vocab_size`. Returns `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(vocab_size)
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


def demo_model(preset: str = "tiny", seed: int = 0, **runtime):
    """The `tiny` preset with random weights (seed `seed`)."""
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    return MiniMaxM1(ModelConfig.from_preset(preset, **runtime), rngs=nnx.Rngs(seed))
