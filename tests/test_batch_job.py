"""`m1jax batch`: an OpenAI Batch API file with good and bad lines; kill -9 mid-run then rerun gives files identical
to an uninterrupted run's; duplicate custom_ids and a resume with a changed model are refused clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m1jax.serving import Scheduler
from m1jax.serving.batch import BatchError, model_fingerprint, read_input, run_batch

REPO = Path(__file__).resolve().parents[1]
CONTEXT, SLOTS = 256, 4
CLI_FLAGS = ["--preset", "tiny", "--slots", str(SLOTS), "--context-window", str(CONTEXT), "--prefill-chunk", "64",
             "--served-model-name", "m1jax-tiny", "--no-progress"]


def _line(custom_id, body, url="/v1/chat/completions"):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _input_lines():
    chat = [{"role": "user", "content": "Tell me about the moon"}]
    lines = [_line(f"greedy-{i}", {"messages": chat + [{"role": "user", "content": f"and {i}"}], "max_tokens": 3 + i,
                                   "temperature": 0, "logprobs": True, "top_logprobs": 2}) for i in range(4)]
    lines += [
        _line("sampled", {"messages": chat, "max_tokens": 5, "temperature": 0.9, "top_p": 0.9}),
        "{not json",
        json.dumps({"custom_id": "no-url", "method": "POST", "body": {}}),
        _line("bad-body", {"messages": [{"role": "user", "content": 3}]}),
        "",
        _line("too-long", {"messages": chat, "max_tokens": 10**6}),
        _line("completion", {"prompt": "The lightning attention", "max_tokens": 4, "temperature": 0},
              url="/v1/completions"),
        _line("seeded", {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 11},
              url="/v1/completions"),
    ]
    return lines


@pytest.fixture(scope="module")
def tiny():
    from m1jax.demo import demo_model, demo_tokenizer

    model = demo_model()
    return model, demo_tokenizer(model.config.vocab_size)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run in-process: (input path, output dir, summary)."""
    from m1jax.generation import Engine

    model, tok = tiny
    root = tmp_path_factory.mktemp("batch")
    inp = root / "input.jsonl"
    inp.write_text("\n".join(_input_lines()) + "\n")
    scheduler = Scheduler(Engine(model, tok), slots=SLOTS, context_window=CONTEXT, prefill_chunk=64)
    summary = run_batch(inp, root / "ref", scheduler, tok, model_name="m1jax-tiny",
                        model_fingerprint=model_fingerprint(model), context_window=CONTEXT, progress=False)
    return inp, root / "ref", summary


def _read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_good_and_bad_lines(reference):
    """Results in input order in OpenAI's shape; each bad line or refused request is an error line naming why."""
    _, out, summary = reference
    ok, errors = _read(out / "output.jsonl"), _read(out / "errors.jsonl")
    assert [r["custom_id"] for r in ok] == ["greedy-0", "greedy-1", "greedy-2", "greedy-3", "sampled", "completion",
                                            "seeded"]
    assert summary.total == 11 and summary.errors == 4 and summary.completed == 11
    for r in ok:
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["usage"]["completion_tokens"] >= 1 and body["model"] == "m1jax-tiny"
    chat = ok[2]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] <= 5
    assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"]
    assert ok[5]["response"]["body"]["object"] == "text_completion"
    by_id = {e["custom_id"]: e for e in errors}
    assert [e["custom_id"] for e in errors] == [None, "no-url", "bad-body", "too-long"]
    assert "line 6" in by_id[None]["error"]["message"] and "not valid JSON" in by_id[None]["error"]["message"]
    assert "'url'" in by_id["no-url"]["error"]["message"]
    assert by_id["bad-body"]["response"]["status_code"] == 400
    assert by_id["bad-body"]["response"]["body"]["error"]["param"] == "messages.0.content"
    assert by_id["too-long"]["response"]["body"]["error"]["param"] == "max_tokens"


def test_rerun_of_a_finished_job_changes_nothing(reference, tiny):
    from m1jax.generation import Engine

    inp, out, _ = reference
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model, tok = tiny
    scheduler = Scheduler(Engine(model, tok), slots=SLOTS, context_window=CONTEXT, prefill_chunk=64)
    summary = run_batch(inp, out, scheduler, tok, model_name="m1jax-tiny", model_fingerprint=model_fingerprint(model),
                        context_window=CONTEXT, progress=False)
    assert summary.resumed == 11 and summary.completed == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_changed_model_or_defaults_refused(reference, tiny):
    from m1jax.demo import demo_model
    from m1jax.serving.openai_protocol import Defaults

    inp, out, _ = reference
    model, tok = tiny
    other = model_fingerprint(demo_model(seed=1))
    with pytest.raises(BatchError, match="the model .* changed"):
        run_batch(inp, out, None, tok, model_name="m1jax-tiny", model_fingerprint=other, context_window=CONTEXT)
    with pytest.raises(BatchError, match="the sampling defaults changed"):
        run_batch(inp, out, None, tok, model_name="m1jax-tiny", model_fingerprint=model_fingerprint(model),
                  context_window=CONTEXT, defaults=Defaults(temperature=0.5))


def test_duplicate_custom_ids_refused(tmp_path):
    inp = tmp_path / "dup.jsonl"
    inp.write_text("\n".join([_line("a", {}), _line("b", {}), _line("a", {})]) + "\n")
    with pytest.raises(BatchError, match=r"duplicate custom_id 'a' \(lines 1 and 3\)"):
        read_input(inp)


def test_replicas_take_disjoint_deterministic_shares(reference, tiny, tmp_path):
    """Two replicas split the lines by position; together they hold exactly the single run's records."""
    from m1jax.generation import Engine

    inp, out, _ = reference
    model, tok = tiny
    fp = model_fingerprint(model)
    for r in range(2):
        scheduler = Scheduler(Engine(model, tok), slots=SLOTS, context_window=CONTEXT, prefill_chunk=64)
        run_batch(inp, tmp_path, scheduler, tok, model_name="m1jax-tiny", model_fingerprint=fp,
                  context_window=CONTEXT, replica=r, replicas=2, progress=False)
    def records(*paths):  # by custom_id, without the job's creation time
        out = {}
        for path in paths:
            for r in _read(path):
                if r["response"] and "created" in r["response"]["body"]:
                    del r["response"]["body"]["created"]
                out[str(r["custom_id"])] = r
        return out

    for name in ("output", "errors"):
        assert records(tmp_path / f"{name}.0-of-2.jsonl", tmp_path / f"{name}.1-of-2.jsonl") == \
            records(out / f"{name}.jsonl")
    assert {r["custom_id"] for r in _read(tmp_path / "output.0-of-2.jsonl")} == {"greedy-0", "greedy-2", "sampled",
                                                                                  "seeded"}


def _cli(inp, out):
    return [sys.executable, "-m", "m1jax", "batch", str(inp), str(out), *CLI_FLAGS]


def _journal_lines(out):
    path = out / "journal.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_at(inp, out, journaled: int, timeout: float = 600):
    """Starts the CLI job and SIGKILLs it once `journaled` requests are in the journal (0: right after start)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(inp, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while _journal_lines(out) < journaled and proc.poll() is None:
        assert time.monotonic() < deadline, "the batch job made no progress"
        time.sleep(0.05)
    if journaled == 0:
        time.sleep(3)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return finished


def _rerun(inp, out):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(_cli(inp, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _assert_same_files(ref, out):
    for name in ("output.jsonl", "errors.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def _copy_manifest(ref, out):
    """The run being killed starts from the reference's manifest (its creation time is in every response)."""
    out.mkdir()
    (out / "manifest.json").write_bytes((ref / "manifest.json").read_bytes())


def test_kill9_mid_run_then_rerun_gives_identical_files(reference, tiny, tmp_path):
    """`m1jax batch` killed with SIGKILL after 3 finished requests, then resumed (in-process here, on the same
    model; the slow tests rerun the command): the final files equal the uninterrupted run's."""
    from m1jax.generation import Engine

    inp, ref, _ = reference
    out = tmp_path / "out"
    _copy_manifest(ref, out)
    assert not _kill_at(inp, out, journaled=3), "the job finished before the kill"
    assert 3 <= _journal_lines(out) < 11
    model, tok = tiny
    scheduler = Scheduler(Engine(model, tok), slots=SLOTS, context_window=CONTEXT, prefill_chunk=64)
    summary = run_batch(inp, out, scheduler, tok, model_name="m1jax-tiny", model_fingerprint=model_fingerprint(model),
                        context_window=CONTEXT, progress=False)
    assert summary.resumed >= 3 and summary.resumed + summary.completed == 11
    _assert_same_files(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("points", [(0,), (1, 6), (11,)])
def test_kill9_at_several_points(reference, tmp_path, points):
    """Killed at start-up, twice in a row mid-run, and after the last request (before or while writing the final
    files): the rerun's files equal the uninterrupted run's, with no duplicate or lost line."""
    inp, ref, _ = reference
    out = tmp_path / "out"
    _copy_manifest(ref, out)
    for k in points:
        _kill_at(inp, out, journaled=k)
    assert "resumed from the journal" in _rerun(inp, out)
    _assert_same_files(ref, out)
    entries = [json.loads(x)["position"] for x in (out / "journal.jsonl").read_text().splitlines()]
    assert sorted(entries) == sorted(set(entries)) == list(range(11))
