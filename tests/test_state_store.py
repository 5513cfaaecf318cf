"""Resumable prefills on disk (`prefix_cache.StateStore`, `Scheduler(state_dir=...)`): a prefill interrupted after
a checkpoint and restarted in a new store resumes there, and a newcomer restores the deepest checkpoint of its
prompt (shared prefix ending at and inside a block), with exactly (bit for bit) the greedy tokens and log-probs of
the uninterrupted prefill; the memory and disk tiers combine; damaged, interrupted and other-fingerprint
checkpoints are ignored; the disk budget evicts the least recently used."""

import json
import logging

import numpy as np
import pytest
from prefix_helpers import BLOCK, CAPACITY, GREEDY, assert_same, tokens

from m1jax.demo import demo_model
from m1jax.generation import STATE_MARKER, Engine, GenerationError
from m1jax.prefix_cache import PrefixCache, RowPrefill, StateStore, block_keys, prefill_prompt, store_fingerprint
from m1jax.sampling import SamplingParams
from m1jax.serving import Request, Scheduler


@pytest.fixture(scope="module")
def engine():
    return Engine(demo_model("tiny", seed=0), prefill_chunk=BLOCK)


@pytest.fixture(scope="module")
def fp(engine):
    return store_fingerprint(engine, BLOCK, CAPACITY)


def store(path, fp, max_bytes=1 << 30) -> StateStore:
    return StateStore(path, fingerprint=fp, max_bytes=max_bytes)


def run(engine, prompt, *, every=2 * BLOCK, **stores):
    state, cached = prefill_prompt(engine, prompt, block=BLOCK, capacity=CAPACITY,
                                   checkpoint_every=every if "disk" in stores else None, **stores)
    logits = np.asarray(state.next_logits_BxV)
    [result], _ = engine.decode(state, GREEDY)
    if "disk" in stores:
        stores["disk"].flush()
    return result, cached, logits


def on_disk(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_interrupted_prefill_resumes_bit_exact(engine, fp, tmp_path):
    prompt = tokens(0, 5 * BLOCK + 3)
    keys = block_keys(prompt, BLOCK)
    first = store(tmp_path, fp)
    row = RowPrefill(engine, prompt, block=BLOCK, capacity=CAPACITY, disk=first, checkpoint_every=2 * BLOCK)
    for _ in range(3):  # "killed" during block 3: the checkpoint after block 1 is on disk
        row.step()
    first.flush()
    assert first.written == 1 and on_disk(tmp_path) == {keys[1].hex()}
    restarted = store(tmp_path, fp)  # a new process on the same directory
    resumed = run(engine, prompt, disk=restarted)
    assert resumed[1] == 2 * BLOCK and restarted.restores == 1 and restarted.restored_tokens == 2 * BLOCK
    assert_same(resumed, run(engine, prompt))
    assert on_disk(tmp_path) == {keys[1].hex(), keys[3].hex()}  # the restored checkpoint is kept


@pytest.mark.parametrize("shared", [4 * BLOCK, 4 * BLOCK + 5])  # the shared prefix ends at / inside a block
def test_newcomer_restores_the_deepest_checkpoint(engine, fp, tmp_path, shared):
    doc = tokens(1, 5 * BLOCK + 7)
    run(engine, doc, disk=store(tmp_path, fp))
    assert on_disk(tmp_path) == {block_keys(doc, BLOCK)[3].hex()}  # a prompt keeps only its deepest checkpoint
    prompt = doc[:shared] + tokens(2, 9)
    restarted = store(tmp_path, fp)
    on = run(engine, prompt, disk=restarted)
    assert on[1] == 4 * BLOCK and restarted.restored_tokens == 4 * BLOCK
    assert_same(on, run(engine, prompt))
    exact = run(engine, doc[:4 * BLOCK], disk=restarted)  # a prompt that is exactly the checkpoint: no call
    assert exact[1] == 4 * BLOCK
    assert_same(exact, run(engine, doc[:4 * BLOCK]))


def test_memory_and_disk_tiers_combine(engine, fp, tmp_path):
    doc = tokens(3, 6 * BLOCK)
    memory, disk = PrefixCache(BLOCK, 1 << 20), store(tmp_path, fp)
    run(engine, doc[:2 * BLOCK] + tokens(4, 5), store=memory)  # memory: blocks 0-1
    run(engine, doc[:4 * BLOCK], disk=disk, every=4 * BLOCK)  # disk: blocks 0-3
    prompt = doc + tokens(5, 3)
    deeper_on_disk = run(engine, prompt, store=memory, disk=disk, every=4 * BLOCK)
    assert deeper_on_disk[1] == 4 * BLOCK and disk.restores == 1 and memory.lookups == 2 and memory.hits == 0
    # the restored blocks went into memory (block 2 as a pass-through entry), and the prompt's blocks 4-5 after them
    assert [memory.get(k).complete for k in block_keys(doc, BLOCK)] == [True, True, False, True, True, True]
    again = run(engine, prompt, store=memory, disk=disk, every=4 * BLOCK)
    assert again[1] == 6 * BLOCK and disk.restores == 1 and memory.hits == 1
    through = doc[:3 * BLOCK + 2] + tokens(14, 4)  # its run ends at the pass-through block 2: blocks 0-1 restored
    assert run(engine, through, store=memory)[1] == 2 * BLOCK
    assert_same(run(engine, through, store=memory), run(engine, through))
    assert_same(again, deeper_on_disk)
    full_memory = PrefixCache(BLOCK, 1 << 20)
    run(engine, doc, store=full_memory)  # memory: blocks 0-5, deeper than the disk's
    deeper_in_memory = run(engine, prompt, store=full_memory, disk=disk, every=4 * BLOCK)
    assert deeper_in_memory[1] == 6 * BLOCK and disk.restores == 1 and full_memory.hits == 1
    plain = run(engine, prompt)
    assert_same(deeper_on_disk, plain)
    assert_same(deeper_in_memory, plain)


def test_damaged_interrupted_and_foreign_checkpoints_are_ignored(engine, fp, tmp_path, caplog):
    doc = tokens(6, 4 * BLOCK + 1)
    keys = block_keys(doc, BLOCK)
    first = store(tmp_path, fp)
    run(engine, doc[:2 * BLOCK], disk=first)
    run(engine, doc, disk=first)  # restores block 1's checkpoint, writes block 3's
    assert on_disk(tmp_path) == {keys[1].hex(), keys[3].hex()}
    interrupted = tmp_path / f".{'ab' * 32}.tmp-4242"  # what a kill during a save leaves
    (interrupted / "arrays").mkdir(parents=True)
    for f in (tmp_path / keys[3].hex() / "arrays").rglob("*"):  # block 3's arrays damaged
        if f.is_file():
            f.write_bytes(b"\0garbage")
    caplog.set_level(logging.WARNING, logger="m1jax.prefix_cache")
    again = store(tmp_path, fp)
    assert not interrupted.exists() and "save was interrupted" in caplog.text
    resumed = run(engine, doc, disk=again)  # block 3's checkpoint fails to load: deleted, block 1's used
    assert resumed[1] == 2 * BLOCK and again.ignored == 1 and again.restores == 1
    assert f"{keys[3].hex()}: unreadable" in caplog.text
    assert_same(resumed, run(engine, doc))
    (tmp_path / keys[1].hex() / STATE_MARKER).write_text("{not json")
    scanned = store(tmp_path, fp)  # an unreadable marker: deleted when the directory is indexed
    assert scanned.ignored == 1 and on_disk(tmp_path) == {keys[3].hex()}

    caplog.clear()
    other = store(tmp_path, {**fp, "model": "another model", "capacity": 512})
    assert len(other) == 0 and other.ignored == 1
    assert "made with another capacity, model" in caplog.text
    assert run(engine, doc, disk=other)[1] == 0  # not restored; its own checkpoint replaces the foreign one
    assert on_disk(tmp_path) == {keys[3].hex()}
    meta = json.loads((tmp_path / keys[3].hex() / STATE_MARKER).read_text())["metadata"]
    assert meta["fingerprint"]["model"] == "another model" and meta["tokens"] == 4 * BLOCK
    assert len(store(tmp_path, fp)) == 0


def test_disk_budget_evicts_the_least_recently_used(engine, fp, tmp_path, caplog):
    a, b, c = (tokens(10 + i, 2 * BLOCK) for i in range(3))
    probe = store(tmp_path / "probe", fp)
    run(engine, a, disk=probe)
    size = probe.bytes
    assert size > 0
    s = store(tmp_path / "lru", fp, max_bytes=int(2.5 * size))
    run(engine, a, disk=s)
    run(engine, b, disk=s)
    assert run(engine, a, disk=s)[1] == 2 * BLOCK  # a restored: more recently used than b
    run(engine, c, disk=s)
    assert on_disk(tmp_path / "lru") == {block_keys(p, BLOCK)[1].hex() for p in (a, c)} and s.bytes <= 2.5 * size
    caplog.set_level(logging.WARNING, logger="m1jax.prefix_cache")
    small = store(tmp_path / "small", fp, max_bytes=size // 2)
    run(engine, a, disk=small)
    assert small.written == 1 and on_disk(tmp_path / "small") == set() and "larger than" in caplog.text


def test_bad_options_are_refused(engine, fp, tmp_path):
    with pytest.raises(GenerationError, match="multiple of the block 16"):
        RowPrefill(engine, tokens(0, 5), block=BLOCK, capacity=CAPACITY, disk=store(tmp_path, fp),
                   checkpoint_every=24)
    with pytest.raises(GenerationError, match="budget must be an integer ≥ 0"):
        store(tmp_path, fp, max_bytes=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(GenerationError, match="cannot use .* as the state directory"):
        store(tmp_path / "file" / "sub", fp)
    with pytest.raises(GenerationError, match="checkpoint_every must be a positive multiple of prefill_chunk 16"):
        Scheduler(engine, slots=1, context_window=64, prefill_chunk=BLOCK, state_dir=tmp_path, checkpoint_every=40)
    with pytest.raises(GenerationError, match="checkpoint_every needs a state_dir"):
        Scheduler(engine, slots=1, context_window=64, prefill_chunk=BLOCK, checkpoint_every=32)


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint-every", "64"], "--checkpoint-every needs --state-dir"),
    (["--state-dir", "{tmp}", "--checkpoint-every", "100"], "checkpoint_every must be a positive multiple of "
                                                             "prefill_chunk 64, got 100"),
    (["--state-dir", "{tmp}/file/sub"], "as the state directory"),
    (["--state-dir", "{tmp}", "--state-max-gb", "-1"], "--state-max-gb must be ≥ 0"),
])
def test_serve_flags_are_checked(tmp_path, capsys, extra, message):
    from m1jax.cli import main

    (tmp_path / "file").write_text("x")
    argv = ["serve", "--preset", "tiny", "--prefill-chunk", "64", *(a.format(tmp=tmp_path) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# -------------------------------------------------------------------------------------------- scheduler
POOL = dict(slots=2, context_window=160, prefill_chunk=BLOCK, decode_steps=4)


def request(prompt, rid=None):
    return Request(prompt=prompt, sampling=GREEDY, request_id=rid, top_logprobs=2)


def assert_outputs_equal(a, b):
    assert a.tokens == b.tokens and a.logprobs == b.logprobs and a.top_logprobs == b.top_logprobs


def test_scheduler_resumes_a_killed_prefill_and_serves_prefixes_from_disk(engine, tmp_path):
    doc = tokens(7, 6 * BLOCK + 5)
    killed = Scheduler(engine, **POOL, state_dir=tmp_path, checkpoint_every=2 * BLOCK)
    handle = killed.submit(request(doc))
    for _ in range(5):  # five prefill blocks, then "kill -9" (no shutdown): checkpoints after blocks 1 and 3
        killed.step()
    killed.state_store.flush()
    assert not handle.done and killed.stats()["state_written"] == 2
    assert on_disk(tmp_path) == {block_keys(doc, BLOCK)[3].hex()}

    restarted = Scheduler(engine, **POOL, state_dir=tmp_path, checkpoint_every=2 * BLOCK)
    at_boundary, inside = doc[:6 * BLOCK] + tokens(8, 7), doc[:6 * BLOCK + 3] + tokens(9, 4)
    resumed, *shared = restarted.run([request(doc), request(at_boundary), request(inside)])
    restarted.shutdown()
    assert resumed.cached_tokens == 4 * BLOCK and [o.cached_tokens for o in shared] == [6 * BLOCK] * 2
    stats = restarted.stats()
    assert stats["state_restores"] == 3 and stats["state_restored_tokens"] == 16 * BLOCK
    reference = Scheduler(engine, **POOL, prefix_cache_tokens=1)  # block-aligned prefill, nothing cached
    for out, prompt in zip([resumed, *shared], [doc, at_boundary, inside], strict=True):
        [ref] = reference.run([request(prompt)])
        assert ref.cached_tokens == 0
        assert_outputs_equal(out, ref)


def test_metrics_show_the_state_directory(engine, tmp_path):
    from m1jax.serving.server import prometheus_text

    sched = Scheduler(engine, **POOL, state_dir=tmp_path, checkpoint_every=2 * BLOCK)
    sched.run([request(tokens(11, 2 * BLOCK + 1))])
    sched.run([request(tokens(11, 2 * BLOCK + 1) + [3])])
    sched.shutdown()
    text = prometheus_text(sched.stats(), {})
    assert "m1jax_state_checkpoints_written_total 1\n" in text and "m1jax_state_restores_total 1\n" in text
    assert f"m1jax_state_restored_tokens_total {2 * BLOCK}\n" in text
    assert f"m1jax_state_disk_bytes {sched.state_store.bytes}\n" in text
    assert "m1jax_state" not in prometheus_text(Scheduler(engine, **POOL).stats(), {})


# ------------------------------------------------------------------------------------------ the server
def _metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def _serve(port: int, state_dir, *extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-m", "m1jax", "serve", "--preset", "tiny", "--port", str(port),
                             "--slots", "2", "--context-window", "4096", "--prefill-chunk", "64", "--state-dir",
                             str(state_dir), "--checkpoint-every", "128", *extra], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_healthy(proc, url: str) -> None:
    import time

    import httpx

    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)


@pytest.mark.slow
def test_server_killed_mid_prefill_resumes_to_the_uninterrupted_output(tmp_path):
    """`m1jax serve --state-dir`: SIGKILL during the prefill of a 3.5K-token input, restart on the same directory,
    the same request resumes from the last checkpoint (/metrics, usage.cached_tokens) and returns exactly the
    uninterrupted output (text, tokens, log-probs; the uninterrupted run in-process with a fresh directory)."""
    import signal
    import socket
    import threading
    import time

    import httpx

    from m1jax.demo import demo_tokenizer
    from m1jax.serving.openai_protocol import Defaults, GenerateRequest, build_request, generate_body, parse_body
    from tests.test_streaming import document

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    body = {"input": document(80), "max_output_tokens": 8, "temperature": 0, "top_logprobs": 1, "seed": 0}
    state_dir = tmp_path / "state"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(port, state_dir)
    replies = []
    try:
        _wait_healthy(proc, url)
        def send():
            try:
                replies.append(httpx.post(url + "/v1/minimax-m1/generate", json=body, timeout=600))
            except httpx.TransportError:  # the kill
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 600
        while _metric(url, "m1jax_state_checkpoints_written_total") < 2:
            assert not replies and time.monotonic() < deadline, "no checkpoint written during the prefill"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    sender.join(60)
    assert not replies, "the request finished before the kill; the prefill was too short to interrupt"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(port, state_dir)
    try:
        _wait_healthy(proc, url)
        reply = httpx.post(url + "/v1/minimax-m1/generate", json=body, timeout=600)
        assert reply.status_code == 200, reply.text
        resumed = reply.json()
        restored = _metric(url, "m1jax_state_restored_tokens_total")
        assert _metric(url, "m1jax_state_restores_total") == 1
    finally:
        proc.kill()
        proc.wait()
    n_input = resumed["usage"]["input_tokens"]
    assert 2 * 64 <= restored < n_input - 64 and restored % 128 == 0  # resumed mid-prefill
    assert resumed["usage"]["cached_tokens"] == restored

    from m1jax.demo import demo_model
    from m1jax.generation import Engine

    model = demo_model("tiny", seed=0)
    tok = demo_tokenizer(model.config.vocab_size)
    prepared = build_request(parse_body(GenerateRequest, json.dumps(body)), tok, context_window=4096,
                             defaults=Defaults(), request_id="reference")
    sched = Scheduler(Engine(model, tok), slots=2, context_window=4096, prefill_chunk=64,
                      state_dir=tmp_path / "fresh", checkpoint_every=128)
    [ref] = sched.run([prepared.request])
    sched.shutdown()
    assert ref.cached_tokens == 0 and n_input == len(prepared.prompt_ids)
    expected = generate_body(ref, prepared, tok, model="m1jax-tiny", response_id=resumed["id"],
                             created=resumed["created"])
    for field in ("text", "reasoning", "content", "finish_reason", "logprobs"):  # log-probs exactly
        assert resumed[field] == expected[field], field
    assert resumed["usage"]["output_tokens"] == len(ref.tokens) == 8


def test_a_checkpoint_is_read_ahead_while_other_requests_decode(engine, tmp_path):
    doc = tokens(12, 4 * BLOCK + 3)
    first = Scheduler(engine, **POOL, state_dir=tmp_path, checkpoint_every=2 * BLOCK)
    first.run([request(doc)])
    first.shutdown()
    sched = Scheduler(engine, **POOL, state_dir=tmp_path, checkpoint_every=2 * BLOCK)
    busy = sched.submit(Request(prompt=tokens(13, 5), sampling=SamplingParams(
        temperature=0.0, max_new_tokens=60, stop_token_ids=(), repetition_stop=None)))
    sched.step()  # the first request joins the pool and decodes
    [out] = sched.run([request(doc)])  # admitted once its checkpoint is read (the decode goes on meanwhile)
    assert not busy.done or len(busy.result().tokens) > 4
    stats = sched.stats()
    assert stats["state_restores"] == stats["state_prefetched"] == 1 and out.cached_tokens == 4 * BLOCK
    [ref] = Scheduler(engine, **POOL, prefix_cache_tokens=1).run([request(doc)])
    assert_outputs_equal(out, ref)
    sched.shutdown()


@pytest.mark.slow  # a scanned model's compiles (~20 s)
def test_a_scanned_model_resumes_bit_exact(tmp_path):
    """Layers as a scan (the cache stacked per layer group): checkpoints restore the same state."""
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    types = ("linear_attention", "full_attention") * 2
    config = ModelConfig.from_preset("tiny-hf").replace(num_hidden_layers=4, layer_types=types, block_size=8,
                                                        hf_source_json="{}", scan_layers=True)
    scanned = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)), prefill_chunk=BLOCK)
    assert scanned.config.scan_groups == 2
    prompt = tokens(15, 3 * BLOCK + 2)
    fp = store_fingerprint(scanned, BLOCK, CAPACITY)
    run(scanned, prompt[:2 * BLOCK], disk=store(tmp_path, fp))
    resumed = run(scanned, prompt, disk=store(tmp_path, fp))
    assert resumed[1] == 2 * BLOCK
    assert_same(resumed, run(scanned, prompt))
