"""`m1jax batch`: an OpenAI Batch API input file through the continuous-batching scheduler, resumable after a kill.

Input: one JSON object per line, `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}` (the files users already have for OpenAI or vLLM). Output directory:

* `output.jsonl` — one line per successful request, in input order, in OpenAI's result shape
  `{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}`;
* `errors.jsonl` — bad lines (`"response": null, "error": {"code", "message"}`) and refused requests
  (`"response": {"status_code": 400, "body": {"error": ...}}`), in input order; the job goes on past them;
* `manifest.json` — fingerprints of the model, the chat template, the sampling defaults and the input file; a
  resume with any of them changed is refused;
* `journal.jsonl` — every finished request, appended and fsync'ed as it finishes (by a writer thread, in groups,
  while the scheduler keeps stepping). A rerun after `kill -9` at any
  moment skips the journaled `custom_id`s (a torn last line is dropped) and, once all are done, writes the final
  files atomically from the journal. Everything in a response is a function of the request and the manifest
  (ids from the `custom_id`, `created` from the manifest, the default seed from the `custom_id`), so with greedy
  or seeded sampling the final files equal an uninterrupted run's byte for byte.

With several data-parallel replicas (`replicas` > 1: one per process, or given), replica `r` takes the input
lines whose position `i` has `i % replicas == r` and writes its own files, suffixed `.r-of-n` (`output.0-of-2.jsonl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from m1jax.errors import UserError
from m1jax.generation import GenerationError
from m1jax.serving.openai_protocol import (
    CHAT_URL,
    COMPLETIONS_URL,
    SCHEMAS,
    ApiError,
    Defaults,
    build_request,
    chat_completion_body,
    completion_body,
    parse_body,
    refused,
)

BATCH_URLS = (CHAT_URL, COMPLETIONS_URL)
MANIFEST_FORMAT = 1


class BatchError(UserError):
    """A batch job that cannot start or resume (duplicate custom_ids, a changed model, an unreadable input)."""


@dataclasses.dataclass
class InputLine:
    """One request line of the input: its position, line number, custom_id, url and raw body (or why it is bad)."""

    position: int
    line_no: int
    custom_id: str | None
    url: str | None = None
    body: bytes | None = None
    error: str | None = None


def read_input(path: str | os.PathLike) -> list[InputLine]:
    """Every non-blank line of an OpenAI Batch API input file; lines that are not a usable request object carry
    `error`. BatchError when two lines share a `custom_id` (the key a resume skips by)."""
    try:
        raw_lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise BatchError(f"cannot read the input file {path}: {e.strerror}") from None
    lines, seen, dups = [], {}, []
    for line_no, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        item = InputLine(position=len(lines), line_no=line_no, custom_id=None)
        lines.append(item)
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            item.error = f"line {line_no}: not valid JSON ({e})"
            continue
        if not isinstance(obj, dict):
            item.error = f"line {line_no}: expected a JSON object, got {type(obj).__name__}"
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            item.error = f"line {line_no}: 'custom_id' must be a non-empty string"
            continue
        item.custom_id = cid
        if cid in seen:
            dups.append(f"{cid!r} (lines {seen[cid]} and {line_no})")
        seen.setdefault(cid, line_no)
        if obj.get("method", "POST") != "POST":
            item.error = f"line {line_no}: 'method' must be \"POST\", got {obj.get('method')!r}"
        elif obj.get("url") not in BATCH_URLS:
            item.error = f"line {line_no}: 'url' must be one of {', '.join(BATCH_URLS)}, got {obj.get('url')!r}"
        elif not isinstance(obj.get("body"), dict):
            item.error = f"line {line_no}: 'body' must be a JSON object"
        else:
            item.url, item.body = obj["url"], json.dumps(obj["body"]).encode()
    if dups:
        raise BatchError(f"{path}: duplicate custom_id {', '.join(dups[:5])}"
                         f"{f' and {len(dups) - 5} more' if len(dups) > 5 else ''}; every custom_id must be unique")
    return lines


def model_fingerprint(model) -> str:
    """sha256 of the model's config and every parameter's path, shape, dtype and first 64 values (tells apart
    checkpoints and random seeds without reading all the weights)."""
    import jax
    from flax import nnx

    from m1jax.generation import to_host

    h = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}".encode())
        h.update(np.ascontiguousarray(to_host(leaf.reshape(-1)[:64])).tobytes())
    return h.hexdigest()


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` via a temporary file, fsync'ed and renamed (readers see the old or the new file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Journal:
    """Append-only record of finished requests (`{"position", "custom_id", "ok", "record"}` per line).

    `add` queues a line; a writer thread appends queued lines and fsyncs them in groups, so the scheduler keeps
    stepping while the disk syncs (one fsync costs milliseconds: per request it would stall the decode loop).
    A line lost to a kill before its fsync is a request recomputed by the rerun; `close` writes and syncs the rest.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[int, dict] = {}
        if path.exists():
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]  # a line torn by a kill has no newline yet
            for raw in complete.splitlines():
                entry = json.loads(raw)
                self.records[entry["position"]] = entry
            if len(complete) != len(data):
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
        self.file = open(path, "ab")
        self._queue: list[bytes] = []
        self._cond = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="m1jax-batch-journal", daemon=True)
        self._writer.start()

    def add(self, position: int, custom_id: str | None, ok: bool, record: dict) -> None:
        entry = {"position": position, "custom_id": custom_id, "ok": ok, "record": record}
        self.records[position] = entry
        line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        with self._cond:
            if self._error is not None:
                raise self._error
            self._queue.append(line)
            self._cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                lines, self._queue = self._queue, []
                if not lines and self._closing:
                    return
            try:
                self.file.write(b"".join(lines))
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:  # reported by the next add / close
                with self._cond:
                    self._error = e
                return

    def close(self) -> None:
        """Writes and fsyncs every queued line, then closes the file."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._writer.join()
        self.file.close()
        if self._error is not None:
            raise self._error


def _error_record(item: InputLine, err: ApiError | None = None, message: str | None = None) -> dict:
    """OpenAI's error result line: a refused request (status 400 with the API error body) or a bad line."""
    rid = f"batch_req_{_short_hash(item.custom_id or f'line {item.line_no}')}"
    if err is not None:
        return {"id": rid, "custom_id": item.custom_id,
                "response": {"status_code": err.status, "request_id": rid, "body": err.body()}, "error": None}
    return {"id": rid, "custom_id": item.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message, "line": item.line_no}}


@dataclasses.dataclass
class BatchSummary:
    """What a run did: requests in this replica's share, done before (resumed), done now, errors, tokens, time."""

    total: int
    resumed: int
    completed: int
    errors: int
    generated_tokens: int
    seconds: float
    output: str
    errors_file: str

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.total} requests: {self.completed} done now, {self.resumed} resumed from the journal, "
                f"{self.errors} errors in total; {self.generated_tokens} tokens generated in {self.seconds:.1f} s "
                f"({self.tokens_per_s:.1f} tokens/s); results in {self.output}, errors in {self.errors_file}")


def run_batch(input_path, output_dir, scheduler, tokenizer, *, model_name: str, model_fingerprint: str,
              context_window: int, defaults: Defaults = Defaults(), replica: int = 0, replicas: int = 1,
              progress: bool = True, window: int | None = None) -> BatchSummary:
    """Runs (or resumes) the batch job of `input_path` into `output_dir` on `scheduler` (driven here with
    `submit` / `step`, not started). `window` bounds the requests submitted but unfinished (default 4 × slots).
    """
    from tqdm import tqdm

    if not 0 <= replica < replicas:
        raise BatchError(f"replica {replica} is not in [0, {replicas})")
    lines = read_input(input_path)
    share = [x for x in lines if x.position % replicas == replica]
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if replicas == 1 else f".{replica}-of-{replicas}"
    manifest = {"format": MANIFEST_FORMAT, "model": model_fingerprint,
                "chat_template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
                "sampling_defaults": defaults.as_dict(), "context_window": context_window,
                "input": _sha256_file(input_path), "replica": replica, "replicas": replicas}
    manifest_path = out_dir / f"manifest{suffix}.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        changed = [k for k in manifest if old.get(k) != manifest[k]]
        if changed:
            what = {"model": "the model (weights or config)", "chat_template": "the chat template",
                    "sampling_defaults": "the sampling defaults", "input": "the input file"}
            raise BatchError(f"{out_dir} holds a batch job started with different settings: "
                             f"{', '.join(what.get(k, k) for k in changed)} changed since "
                             f"(recorded {old.get(changed[0])!r}, now {manifest[changed[0]]!r}); resume with the "
                             f"original settings or use a new output directory")
        manifest["created"] = old["created"]
    else:
        manifest["created"] = int(time.time())
        _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    created = manifest["created"]

    journal = Journal(out_dir / f"journal{suffix}.jsonl")
    for pos, entry in journal.records.items():
        if pos >= len(lines) or entry["custom_id"] != lines[pos].custom_id:
            raise BatchError(f"{journal.path} does not match the input file (position {pos}); use a new output "
                             f"directory")
    resumed = sum(1 for x in share if x.position in journal.records)
    todo = [x for x in share if x.position not in journal.records]
    slots = int(scheduler.stats().get("slots", 8))
    window = window or 4 * slots
    bar = tqdm(total=len(share), initial=resumed, unit="req", disable=not progress, dynamic_ncols=True,
               file=sys.stderr, desc="m1jax batch")
    t0, tokens, completed = time.perf_counter(), 0, 0
    pending: dict[int, tuple] = {}  # position -> (item, prepared, handle)
    queue = iter(todo)

    def finish(item: InputLine, ok: bool, record: dict) -> None:
        nonlocal completed
        journal.add(item.position, item.custom_id, ok, record)
        completed += 1
        bar.update(1)

    def submit_next() -> bool:
        for item in queue:
            if item.error is not None:
                finish(item, False, _error_record(item, message=item.error))
                continue
            try:
                body = parse_body(SCHEMAS[item.url], item.body)
                if getattr(body, "stream", False):
                    raise ApiError("stream is not supported in a batch", param="stream")
                prepared = build_request(body, tokenizer, context_window=context_window, defaults=defaults,
                                         request_id=f"{item.position}", default_seed=_seed_of(item.custom_id))
                try:
                    handle = scheduler.submit(prepared.request)
                except GenerationError as e:
                    raise refused(e, prepared) from None
            except ApiError as e:
                finish(item, False, _error_record(item, e))
                continue
            pending[item.position] = (item, prepared, handle)
            return True
        return False

    try:
        while len(pending) < window and submit_next():
            pass
        while pending:
            scheduler.step()
            for pos in [p for p, (_, _, h) in pending.items() if _finished(h)]:
                item, prepared, handle = pending.pop(pos)
                try:
                    output = handle.result()
                except GenerationError as e:  # the scheduler failed it: an error line, the job goes on
                    finish(item, False, _error_record(item, ApiError(str(e), status=500, type="server_error")))
                    continue
                build = chat_completion_body if item.url == CHAT_URL else completion_body
                prefix = "chatcmpl" if item.url == CHAT_URL else "cmpl"
                rid = f"{prefix}-{_short_hash(item.custom_id)}"
                body = build(output, prepared, tokenizer, model=model_name, response_id=rid, created=created)
                tokens += len(output.tokens)
                finish(item, True, {"id": f"batch_req_{_short_hash(item.custom_id)}", "custom_id": item.custom_id,
                                    "response": {"status_code": 200, "request_id": rid, "body": body},
                                    "error": None})
                while len(pending) < window and submit_next():
                    pass
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{tokens / elapsed if elapsed > 0 else 0:.1f} tok/s", refresh=False)
        while submit_next():  # only error lines can remain
            pass
    finally:
        bar.close()
        journal.close()

    records = [journal.records[x.position] for x in share]
    out_path, err_path = out_dir / f"output{suffix}.jsonl", out_dir / f"errors{suffix}.jsonl"
    _write_atomic(out_path, b"".join(json.dumps(r["record"], ensure_ascii=False).encode() + b"\n"
                                     for r in records if r["ok"]))
    _write_atomic(err_path, b"".join(json.dumps(r["record"], ensure_ascii=False).encode() + b"\n"
                                     for r in records if not r["ok"]))
    return BatchSummary(total=len(share), resumed=resumed, completed=completed,
                        errors=sum(1 for r in records if not r["ok"]), generated_tokens=tokens,
                        seconds=time.perf_counter() - t0, output=str(out_path), errors_file=str(err_path))


def _seed_of(custom_id: str) -> int:
    """The seed of a request that gives none: from its custom_id, so a rerun samples the same tokens."""
    return int.from_bytes(hashlib.sha256(custom_id.encode()).digest()[:4], "little")


def _finished(handle) -> bool:
    """Whether a scheduler request has finished (its result is ready), without blocking."""
    try:
        handle.result(timeout=0)
    except TimeoutError:
        return False
    except GenerationError:
        return True
    return True
