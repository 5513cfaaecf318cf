"""m1jax.tokenizer: loading, special tokens, round trips, streaming detokenization and clear errors.

Tokenizers are trained in-process (tests/tokenizer_fixtures.py); nothing is downloaded.
"""

import json
import random
import shutil

import pytest
import sentencepiece
import tokenizers
from tokenizer_fixtures import (
    BOD,
    BOS,
    EOS,
    M1_FORMAT_TEMPLATE,
    MINIMAX_SPECIAL_TOKENS,
    UNK,
    make_bpe_tokenizer_dir,
    make_sentencepiece_tokenizer_dir,
    train_bpe_tokenizer,
    train_sentencepiece_model,
)

from m1jax.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n",
    "😀🎉🚀 emoji, 👍🏽 skin tone, ❤️ variation selector, 👨‍👩‍👧 family",
    "你好世界，今天天气很好。日本語のテキスト、한국어 텍스트",
    "mixed: café 😀 世界 naïve Zürich ∑∫√ 1234567890",
    f"{BOS}user name=user\nHi{EOS}\n{BOD}",
    '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_calls>',
    "",
]


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    return make_bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
    return make_sentencepiece_tokenizer_dir(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def bpe(bpe_dir):
    return Tokenizer.from_pretrained(bpe_dir)


@pytest.fixture(scope="session")
def sp(sp_dir):
    return Tokenizer.from_pretrained(sp_dir)


@pytest.fixture(params=["bpe", "sp"])
def tok(request):
    return request.getfixturevalue(request.param)


def test_bpe_fixture_fits_a_512_vocab_with_minimax_specials(bpe, bpe_dir):
    assert bpe.vocab_size == 512
    assert [bpe.token_to_id(t) for t in MINIMAX_SPECIAL_TOKENS] == [508, 509, 510, 511]
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.unk_token_id, bpe.pad_token_id) == (508, 509, 510, None)
    assert bpe.special_token_ids == {508, 509, 510, 511}
    assert bpe.id_to_token(509) == EOS and bpe.id_to_token(512) is None and bpe.token_to_id("<nope>") is None
    assert bpe.chat_template == M1_FORMAT_TEMPLATE
    ids = bpe.encode(" ".join(TEXTS))
    assert max(ids) < 512
    assert json.loads((bpe_dir / "tokenizer_config.json").read_text())["eos_token"] == EOS


def test_sentencepiece_fixture_special_tokens(sp):
    assert sp.vocab_size == 400
    assert (sp.bos_token_id, sp.eos_token_id, sp.unk_token_id) == (1, 2, 3)
    assert sp.token_to_id(BOD) == 4 and sp.token_to_id("<nope>") is None


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_token_strings_encode_to_single_ids(tok):
    ids = tok.encode(f"{BOS}Hi{EOS}")
    assert ids[-1] == tok.eos_token_id and tok.bos_token_id in ids[:2]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "Hi"
    assert tok.decode([tok.eos_token_id]) == EOS


def test_decode_accepts_numpy_arrays(bpe):
    np = pytest.importorskip("numpy")
    ids = bpe.encode("numpy ids 😀")
    assert bpe.decode(np.asarray(ids, dtype=np.int32)) == "numpy ids 😀"


def test_bpe_matches_transformers(bpe, bpe_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(bpe_dir))
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert bpe.encode(text) == ids
        assert bpe.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert bpe.eos_token_id == hf.eos_token_id and bpe.bos_token_id == hf.bos_token_id


def _stream(tok, ids, **kw):
    decoder = tok.stream_decoder(**kw)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_equals_full_decode(tok, text):
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces), "a split UTF-8 character leaked as U+FFFD"
    skipped, tail = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(skipped) + tail == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_holds_back_split_utf8_characters(bpe):
    ids = bpe.encode("😀")  # one 4-byte character, several byte-level tokens
    assert len(ids) > 1
    pieces, tail = _stream(bpe, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀" and tail == ""


def test_stream_decoder_on_random_ids_equals_full_decode(tok):
    """Random ids include invalid UTF-8 byte runs: the stream must still add up to decode(ids)."""
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_stream_decoder_flush_emits_incomplete_tail(bpe):
    ids = bpe.encode("ok 😀")[:-1]  # cut inside the emoji
    decoder = StreamDecoder(bpe)
    text = decoder.extend(ids)
    tail = decoder.flush()
    assert text.startswith("ok") and tail.endswith("\ufffd") and "\ufffd" not in text
    assert text + tail == bpe.decode(ids) and decoder.flush() == ""
    assert decoder.ids == ids


def test_add_special_tokens_follows_config(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("Hi", add_special_tokens=True) == [tok.bos_token_id, *tok.encode("Hi")]
    assert tok.encode(f"{BOS}Hi", add_special_tokens=True) == tok.encode(f"{BOS}Hi")  # not doubled
    tok.add_eos_token = True
    assert tok.encode("Hi", add_special_tokens=True)[-1] == tok.eos_token_id


def test_construct_from_objects():
    bpe = Tokenizer(train_bpe_tokenizer(), eos_token=EOS, pad_token=UNK)
    assert bpe.eos_token_id == 509 and bpe.pad_token_id == 510 and bpe.bos_token_id is None
    sp = Tokenizer(sentencepiece.SentencePieceProcessor(model_proto=train_sentencepiece_model()), eos_token=EOS)
    assert sp.decode(sp.encode("你好 😀")) == "你好 😀"


def test_added_token_dicts_and_real_m1_config(bpe_dir, tmp_path, fixtures_dir):
    """The real M1 tokenizer_config.json drives our small BPE: special tokens and template resolve."""
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    real = json.loads((fixtures_dir / "minimax-m1" / "tokenizer_config.json").read_text())
    real["eos_token"] = {"content": EOS, "lstrip": False, "rstrip": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(real))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == 509 and tok.unk_token_id == 510 and tok.chat_template == real["chat_template"]
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")  # M1 adds nothing by default


@pytest.mark.parametrize("make", [make_bpe_tokenizer_dir, make_sentencepiece_tokenizer_dir])
def test_save_pretrained_round_trip(make, tmp_path):
    tok = Tokenizer.from_pretrained(make(tmp_path / "src"))
    out = tok.save_pretrained(tmp_path / "out")
    again = Tokenizer.from_pretrained(out)
    text = "save 😀 世界 " + EOS
    assert again.encode(text) == tok.encode(text)
    assert again.special_tokens_map == tok.special_tokens_map and again.chat_template == tok.chat_template
    assert again.special_token_ids == tok.special_token_ids and again.vocab_size == tok.vocab_size


def test_save_pretrained_keeps_other_config_keys(bpe, tmp_path):
    config = json.loads((bpe.save_pretrained(tmp_path) / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 40960000 and config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_load_from_file_path_and_other_model_names(bpe_dir, sp_dir, tmp_path):
    assert Tokenizer.from_pretrained(bpe_dir / "tokenizer.json").eos_token_id == 509
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "spiece.model")
    assert Tokenizer.from_pretrained(tmp_path).vocab_size == 400  # the only *.model, no config
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "other.model")
    with pytest.raises(FileNotFoundError, match="several sentencepiece models"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_jinja_file_takes_precedence(bpe_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "{{ messages[0]['content'] }}"


# ---- errors ---------------------------------------------------------------------------------------------------


def test_missing_path_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer\.model"):
        Tokenizer.from_pretrained(tmp_path)


def _copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_files(bpe_dir, sp_dir, tmp_path):
    bad_config = _copy_dir(bpe_dir, tmp_path / "a")
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_pretrained(bad_config)
    (bad_config / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        Tokenizer.from_pretrained(bad_config)
    bad_json = _copy_dir(bpe_dir, tmp_path / "b")
    (bad_json / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizers JSON file"):
        Tokenizer.from_pretrained(bad_json)
    bad_sp = _copy_dir(sp_dir, tmp_path / "c")
    (bad_sp / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.from_pretrained(bad_sp)


def test_unknown_or_malformed_special_tokens(bpe_dir, tmp_path):
    d = _copy_dir(bpe_dir, tmp_path / "d")
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|im_end\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": 7}))
    with pytest.raises(ValueError, match="bos_token must be a string"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": ["<x>"]}))
    with pytest.raises(ValueError, match="additional special token '<x>'"):
        Tokenizer.from_pretrained(d)
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        Tokenizer(tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json")), pad_token="<pad>")


def test_bad_arguments(bpe):
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a sentencepiece"):
        Tokenizer(object())
    with pytest.raises(TypeError, match="encode expects a str"):
        bpe.encode(b"bytes")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\)"):
        bpe.decode([1, 512])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([-1])
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(train_bpe_tokenizer(), eos_token=EOS).apply_chat_template([{"role": "user", "content": "x"}])
