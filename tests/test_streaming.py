"""Streaming input: block-wise tokenization equals whole-text encoding, the chunked prefill equals `generate`, a
prefill killed with SIGKILL resumes from its checkpoint to the uninterrupted output, changed inputs are refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m1jax.cli import main
from m1jax.demo import demo_model, demo_tokenizer, training_corpus
from m1jax.generation import Engine, GenerationError
from m1jax.sampling import SamplingParams
from m1jax.streaming import encode_blocks, encode_text, prefill_file, prefill_stream, read_text

REPO = Path(__file__).parents[1]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(), repetition_stop=None)
MIXED = ("Zürich café naïve — 你好世界，今天天气很好。 😀😃🎉 👍🏽\n\n\n   \t\t  indented   runs    of     spaces\n"
         "<think>reasoning</think>\r\n<end_of_sentence>  tail\u3000\u3000full-width spaces\n")


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer(512)


def document(n_lines: int) -> str:
    """Word salad interleaved with multibyte text and whitespace runs."""
    lines = training_corpus(n_lines)[:n_lines]
    return "".join(line + (MIXED if i % 5 == 0 else " " * (i % 7) + "\n") for i, line in enumerate(lines))


@pytest.mark.parametrize("block_chars, lookahead, piece_bytes", [(37, 16, 7), (100, 8, 1), (1000, 64, 3),
                                                                 (5, 8, 1 << 20)])
def test_blocks_concatenate_to_the_whole_encoding(tokenizer, tmp_path, block_chars, lookahead, piece_bytes):
    text = document(40)
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_text(path, piece_bytes))
    assert "".join(pieces) == text  # multibyte characters split between byte pieces come back whole
    blocks = list(encode_blocks(tokenizer, pieces, block_chars=block_chars, lookahead=lookahead))
    assert len(blocks) > len(text) // (4 * block_chars + 2 * lookahead)
    assert [t for b in blocks for t in b] == tokenizer.encode(text)


class _Spy:
    """A tokenizer that records the length of every text it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text, **kw):
        self.lengths.append(len(text))
        return self.tokenizer.encode(text, **kw)


@pytest.mark.parametrize("block_chars", [7, 64, 1000])
def test_api_prompts_are_tokenized_blockwise_to_the_whole_text_ids(tokenizer, monkeypatch, block_chars):
    """The server's long inputs (generate `input`, completion `prompt`, chat messages) are encoded in blocks
    (`encode_text`) to exactly the ids of the whole-text encoding: multibyte text, whitespace runs, special-token
    text at any offset."""
    import json

    from m1jax.serving import openai_protocol as op

    text = document(30) + " " * 300 + "<think>\n" + "你好😀\u3000" * 40 + "</think>" + MIXED
    spy = _Spy(tokenizer)
    assert encode_text(spy, text, block_chars=block_chars) == tokenizer.encode(text)
    assert max(spy.lengths) < len(text)  # never the whole text in one call
    monkeypatch.setattr(op, "ENCODE_BLOCK_CHARS", block_chars)
    chat_text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    for url, body, whole in [(op.GENERATE_URL, {"input": text}, text), (op.COMPLETIONS_URL, {"prompt": text}, text),
                             (op.CHAT_URL, {"messages": [{"role": "user", "content": text}]}, chat_text)]:
        spy.lengths.clear()
        prepared = op.build_request(op.parse_body(op.SCHEMAS[url], json.dumps(body)), spy, context_window=1 << 20)
        assert prepared.prompt_ids == tokenizer.encode(whole), url
        assert max(spy.lengths) < len(text), url


def test_invalid_utf8_names_the_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo ".encode() + b"\xff\xfe rest")
    with pytest.raises(GenerationError, match=r"not UTF-8 text: invalid byte at offset 7"):
        list(read_text(path, piece_bytes=2))
    path.write_bytes("ends inside é".encode()[:-1])
    with pytest.raises(GenerationError, match="not UTF-8"):
        list(read_text(path))


def test_streamed_prefill_equals_generate(tokenizer, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(document(12), encoding="utf-8")
    engine = Engine(demo_model("tiny", seed=0), tokenizer, prefill_chunk=64)
    ids = tokenizer.encode(path.read_bytes().decode())
    streamed = prefill_file(engine, path, block_chars=50, context_window=2048)
    assert streamed.tokens == len(ids) and streamed.resumed_from == 0 and len(ids) % 64
    [a], _ = engine.decode(streamed.state, GREEDY)
    [b] = engine.generate([ids], GREEDY)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    with pytest.raises(GenerationError, match="context window 256"):
        prefill_stream(engine, [ids], context_window=256)
    with pytest.raises(GenerationError, match="multiple of the prefill chunk 64"):
        prefill_stream(engine, [ids], checkpoint_dir=tmp_path / "c", checkpoint_every=100)
    with pytest.raises(GenerationError, match="input is empty"):
        prefill_stream(engine, [[]])


def cli_args(path, ckpt, *extra):
    return ["generate", "--preset", "tiny", "--input-file", str(path), "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "128", "--prefill-chunk", "64", "--context-window", "2048", "--temperature", "0",
            "--max-new-tokens", "12", "--repetition-stop", "0", "--no-stream", *extra]


@pytest.mark.slow  # CLI subprocesses killed and rerun (~16 s)
def test_sigkilled_prefill_resumes_to_the_uninterrupted_output(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(document(24), encoding="utf-8")
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "m1jax", *cli_args(path, ckpt)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (ckpt.exists() and any(p.name.startswith("state-") for p in ckpt.iterdir())):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint written in 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert main(cli_args(path, ckpt)) == 0  # the rerun resumes
    resumed = capsys.readouterr()
    assert main(cli_args(path, tmp_path / "fresh")) == 0  # an uninterrupted run
    fresh = capsys.readouterr()
    n_tokens = len(demo_tokenizer(512).encode(path.read_bytes().decode()))
    assert f"[{n_tokens} prompt tokens (resumed from the checkpoint at token " in resumed.err
    at = int(resumed.err.split("at token ")[1].split(")")[0])
    assert 0 < at < n_tokens and at % 128 == 0
    assert "resumed" not in fresh.err
    assert resumed.out == fresh.out and len(fresh.out.strip()) > 0
    assert resumed.err.split(", ", 1)[1] == fresh.err.split(", ", 1)[1]  # generated count and finish reason

    path.write_text(document(24) + "one more line\n", encoding="utf-8")
    assert main(cli_args(path, ckpt)) == 2
    assert "the input changed" in capsys.readouterr().err
    path.write_text(document(24), encoding="utf-8")
    assert main(cli_args(path, ckpt, "--model-seed", "1")) == 2
    err = capsys.readouterr().err
    assert "the model differs" in err and "the input changed" not in err


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "x"], "cannot be combined with --prompt"),
    (["--checkpoint-every", "64"], "--checkpoint-every needs --checkpoint-dir"),
])
def test_cli_rejects_bad_combinations(tmp_path, capsys, extra, message):
    path = tmp_path / "doc.txt"
    path.write_text("hello", encoding="utf-8")
    assert main(["generate", "--preset", "tiny", "--input-file", str(path), *extra]) == 2
    assert message in capsys.readouterr().err
