"""TEMPORARY: a stand-in for the contract's Scheduler (scheduler_contract.md) until the real one lands on main.
Runs each request alone through Engine.generate on a background thread. Deleted once m1jax.serving.scheduler exists.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import uuid

import numpy as np

from m1jax.generation import Engine, GenerationError
from m1jax.sampling import SamplingParams


@dataclasses.dataclass
class Request:
    prompt: list
    sampling: SamplingParams
    request_id: str | None = None
    thinking_budget: int | None = None
    expert_threshold: float = 1.0
    top_logprobs: int = 0
    return_routed_experts: bool = False


@dataclasses.dataclass
class Delta:
    token_ids: list
    logprobs: list
    top_logprobs: list | None
    text: str
    finish_reason: str | None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    tokens: list
    logprobs: list
    top_logprobs: list | None
    text: str | None
    finish_reason: str
    reasoning_tokens: int
    cached_tokens: int
    routing: dict | None
    routed_experts: object


class RequestHandle:
    def __init__(self, request_id):
        self.request_id = request_id
        self._q = queue.Queue()
        self._done = threading.Event()
        self._out = None
        self._cancel = False

    def deltas(self, timeout=None):
        while True:
            d = self._q.get(timeout=timeout)
            yield d
            if d.finish_reason is not None:
                return

    def result(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError
        return self._out

    def cancel(self):
        self._cancel = True


class Scheduler:
    def __init__(self, engine: Engine, *, slots=8, context_window=None, prefill_chunk=256, decode_steps=4,
                 prefix_cache_tokens=0):
        self.engine = engine
        self.context_window = context_window or 4096
        self.slots = slots
        self._q = queue.Queue()
        self._thread = None
        self.generated = 0

    def submit(self, request):
        if not request.prompt:
            raise GenerationError("empty prompt")
        rid = request.request_id or uuid.uuid4().hex
        h = RequestHandle(rid)
        self._q.put((request, h))
        return h

    def _one(self, request, h):
        tok = self.engine.tokenizer
        [r] = self.engine.generate([request.prompt], request.sampling)
        stream = tok.stream_decoder()
        for i, t in enumerate(r.tokens):
            last = i == len(r.tokens) - 1
            top = [[(t, r.logprobs[i])] * request.top_logprobs] if request.top_logprobs else None
            h._q.put(Delta([t], [r.logprobs[i]], top, stream.push(t) + (stream.flush() if last else ""),
                           r.finish_reason if last else None))
        self.generated += len(r.tokens)
        h._out = RequestOutput(h.request_id, len(request.prompt), r.tokens, r.logprobs,
                               [[(t, lp)] * request.top_logprobs for t, lp in zip(r.tokens, r.logprobs)]
                               if request.top_logprobs else None, r.text, r.finish_reason,
                               0, 0, {"layers": [{"tokens_per_expert": np.arange(4)}]},
                               np.zeros((len(r.tokens), 4, 2), np.int32) if request.return_routed_experts else None)
        h._done.set()

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            self._one(*item)

    def start(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def shutdown(self):
        self._q.put(None)

    def run(self, requests):
        hs = [self.submit(r) for r in requests]
        for r, h in [(r, h) for r, h in zip(requests, hs)]:
            self._q.get()
            self._one(r, h)
        return [h.result() for h in hs]

    def step(self):
        if self._thread is not None or self._q.empty():
            return False
        self._one(*self._q.get())
        return True

    def stats(self):
        return {"waiting": self._q.qsize(), "running": 0, "slots": self.slots, "generated_tokens": self.generated,
                "tokens_per_s": 0.0, "prefix_lookups": 0, "prefix_hits": 0}


def install():
    """Expose the fake under the contract's names (m1jax.serving.*) when the real one is absent."""
    import m1jax.serving as serving

    if not hasattr(serving, "Scheduler"):
        for name in ("Scheduler", "Request", "RequestHandle", "RequestOutput", "Delta"):
            setattr(serving, name, globals()[name])
