"""The continuous-batching scheduler: every request equals `Engine.generate` of its prompt alone (greedy and
sampled, staggered arrivals, slot reuse, timeline shifts, cancellation), thinking budgets, top log-probs
against a full forward, streaming deltas with stop strings, concurrent `generate` calls, bad requests."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.demo import demo_model, demo_tokenizer
from m1jax.generation import THINK_CLOSE, Engine, GenerationError
from m1jax.sampling import SamplingParams
from m1jax.serving import Request, Scheduler
from m1jax.serving import scheduler as scheduler_module

# One pool shape for every test (compiles are shared): 2 slots, a 64-token context window (so long runs move the
# timeline), 16-token prefill chunks, bursts of 4.
POOL = dict(slots=2, context_window=64, prefill_chunk=16, decode_steps=4)


def sp(max_new, temperature=0.0, seed=0, **kw):
    return SamplingParams(temperature=temperature, max_new_tokens=max_new, seed=seed, stop_token_ids=(),
                          repetition_stop=None, **kw)


@pytest.fixture(scope="module")
def tiny():
    return demo_model("tiny", seed=0)


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


@pytest.fixture(scope="module")
def engine(tiny, tok):
    return Engine(tiny, tok)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 500, n).tolist() for n in (3, 29, 12, 21, 7)]


def alone(engine, prompt, sampling, **kw):
    return engine.generate([prompt], sampling, **kw)[0]


def assert_same(out, ref):
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert out.finish_reason == ref.finish_reason


def test_staggered_requests_equal_generate_alone(engine, prompts):
    """Five requests (greedy and sampled, different lengths and budgets) through two slots, arriving at different
    steps: slots are reused, the timeline moves, and each request equals its own `generate` run."""
    samplings = [sp(10), sp(11, temperature=0.9, seed=3, top_k=50), sp(13), sp(12, temperature=1.0, seed=11),
                 sp(9, temperature=0.7, seed=5, top_p=0.9)]
    sched = Scheduler(engine, **POOL)
    handles = [sched.submit(Request(prompts[i], samplings[i])) for i in (0, 1)]
    for _ in range(3):
        sched.step()
    handles += [sched.submit(Request(prompts[i], samplings[i])) for i in (2, 3)]
    sched.step()
    handles.append(sched.submit(Request(prompts[4], samplings[4])))
    while sched.step():
        pass
    for h, p, s in zip(handles, prompts, samplings, strict=True):
        out = h.result(timeout=0)
        assert out.prompt_tokens == len(p) and out.reasoning_tokens == 0 and out.top_logprobs is None
        assert_same(out, alone(engine, p, s))
    assert sched.shifts > 0  # the 64-token window forced the timeline to move
    assert sched.stats()["running"] == 0 and sched.stats()["generated_tokens"] == 10 + 11 + 13 + 12 + 9


def test_compacted_bursts_run_only_the_live_rows(engine, prompts, monkeypatch):
    """With 3 of 4 slots live and then fewer, the bursts run batches of 3, 2 and 1 rows (`_decode_rows`), and every
    request's tokens and log-probs equal `generate` alone (the whole pool's bursts: the other tests)."""
    samplings = [sp(14), sp(14, temperature=0.8, seed=2, top_k=40), sp(10)]
    calls = []
    decode_rows = scheduler_module._decode_rows

    def spy(*args, **kw):
        calls.append(int(args[7].shape[0]))
        return decode_rows(*args, **kw)

    monkeypatch.setattr(scheduler_module, "_decode_rows", spy)
    sched = Scheduler(engine, **{**POOL, "slots": 4})
    assert sched.compact  # the default on CPU without a mesh
    outs = sched.run([Request(p, s) for p, s in zip(prompts[:3], samplings, strict=True)])
    assert {3, 2, 1} <= set(calls) and max(calls) == 3
    for out, p, s in zip(outs, prompts[:3], samplings, strict=True):
        assert_same(out, alone(engine, p, s))


@pytest.mark.slow  # a scanned model's compiles
def test_compacted_bursts_of_a_scanned_model(prompts):
    """The cache stacked per layer group (rows on axis 1): compacted bursts still equal `generate` alone."""
    from flax import nnx

    from m1jax.config import ModelConfig
    from m1jax.model import MiniMaxM1

    types = ("linear_attention", "full_attention") * 2
    config = ModelConfig.from_preset("tiny-hf").replace(num_hidden_layers=4, layer_types=types, block_size=8,
                                                        hf_source_json="{}", scan_layers=True)
    scanned = Engine(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    assert scanned.config.scan_groups == 2
    samplings = [sp(14), sp(14, temperature=0.8, seed=2, top_k=40), sp(10)]
    sched = Scheduler(scanned, **{**POOL, "slots": 4})
    outs = sched.run([Request(p, s) for p, s in zip(prompts[:3], samplings, strict=True)])
    for out, p, s in zip(outs, prompts[:3], samplings, strict=True):
        assert_same(out, alone(scanned, p, s))


def test_warmup_compiles_every_burst_and_chunk_so_requests_compile_nothing(engine, prompts):
    """A pool shape no other test uses (3 slots, 72-token window): warmup() compiles the whole-pool burst, the
    compacted bursts of 1 and 2 rows and the prefill chunks of 16 and 32 tokens; serving requests of every
    size afterwards compiles nothing more."""
    from m1jax import generation

    fns = {"loop": generation._decode_loop, "rows": scheduler_module._decode_rows, "chunk": generation._forward_chunk}
    sched = Scheduler(engine, slots=3, context_window=72, prefill_chunk=32, decode_steps=4)
    before = {k: f._cache_size() for k, f in fns.items()}
    sched.warmup()
    warm = {k: f._cache_size() for k, f in fns.items()}
    assert warm["loop"] - before["loop"] == 1 and warm["rows"] - before["rows"] == 2
    assert warm["chunk"] - before["chunk"] == 2  # chunks of 16 and 32 tokens
    samplings = [sp(12), sp(5), sp(9, temperature=0.7, seed=1)]
    outs = sched.run([Request(p, s) for p, s in zip(prompts[:3], samplings, strict=True)])
    assert {k: f._cache_size() for k, f in fns.items()} == warm
    for out, p, s in zip(outs, prompts[:3], samplings, strict=True):
        assert_same(out, alone(engine, p, s))
    sched.submit(Request(prompts[0], sp(4)))
    with pytest.raises(GenerationError, match="idle scheduler"):
        sched.warmup()


def test_cli_warmup_flag_warms_the_scheduler(monkeypatch, capsys):
    from m1jax import cli

    warmed = []
    monkeypatch.setattr(Scheduler, "warmup", lambda self: warmed.append(self.slots))
    for command in ("serve", "batch"):
        extra = ["in.jsonl", "out"] if command == "batch" else []
        args = cli.build_parser().parse_args([command, *extra, "--slots", "3", "--context-window", "256", "--warmup"])
        cli._serving_setup(args)
        args = cli.build_parser().parse_args([command, *extra, "--slots", "3", "--context-window", "256"])
        cli._serving_setup(args)
    assert warmed == [3, 3] and capsys.readouterr().err.count("compiled the decode bursts") == 2


def test_compact_rows_buckets():
    assert [scheduler_module.compact_rows(n, 8) for n in range(1, 9)] == list(range(1, 9))
    assert scheduler_module.compact_rows(9, 64) == 16 and scheduler_module.compact_rows(33, 64) == 64
    assert scheduler_module.compact_rows(9, 12) == 12  # never more than the pool


def test_cancel_frees_the_slot_and_leaves_the_others_exact(engine, prompts):
    sched = Scheduler(engine, **POOL)
    a = sched.submit(Request(prompts[0], sp(16), request_id="a"))
    b = sched.submit(Request(prompts[1], sp(12), request_id="b"))
    c = sched.submit(Request(prompts[2], sp(9), request_id="c"))  # waits for a slot
    for _ in range(2):
        sched.step()
    assert sched.stats()["waiting"] == 1
    a.cancel()
    sched.step()
    out_a = a.result(timeout=0)  # cancelled at once
    assert out_a.finish_reason == "cancelled" and 0 < len(out_a.tokens) < 16
    sched.step()
    assert sched.stats()["waiting"] == 0  # c took a's slot
    while sched.step():
        pass
    assert out_a.tokens == alone(engine, prompts[0], sp(16)).tokens[:len(out_a.tokens)]
    assert_same(b.result(timeout=0), alone(engine, prompts[1], sp(12)))
    assert_same(c.result(timeout=0), alone(engine, prompts[2], sp(9)))
    sched.cancel("a")  # finished: ignored


def test_thinking_budget_and_top_logprobs(engine, tiny, tok, prompts):
    """The budget forces `\\n</think>\\n\\n` at exactly the budget (scheduler and `generate` alike), the forced
    tokens carry the model's log-probs, and the top log-probs are those of the full forward's log-softmax."""
    force = tok.encode(THINK_CLOSE)
    budget, s = 5, sp(16)
    sched = Scheduler(engine, **POOL)
    [out] = sched.run([Request(prompts[1], s, thinking_budget=budget, top_logprobs=5)])
    assert out.tokens[budget:budget + len(force)] == force
    assert out.reasoning_tokens == budget + force.index(tok.encode("</think>")[-1]) + 1
    ref = alone(engine, prompts[1], s, thinking_budget=budget)
    assert_same(out, ref)
    assert ref.reasoning_tokens == out.reasoning_tokens
    free = alone(engine, prompts[1], s)
    assert free.tokens[:budget] == out.tokens[:budget] and free.tokens[budget:budget + len(force)] != force
    assert free.reasoning_tokens == 0
    # against a full forward over prompt + output
    seq = prompts[1] + out.tokens
    logp = np.asarray(jax.nn.log_softmax(tiny(jnp.asarray([seq])).logits[0], -1))[len(prompts[1]) - 1:-1]
    np.testing.assert_allclose(out.logprobs, logp[np.arange(len(out.tokens)), out.tokens], atol=1e-5)
    for t, top in enumerate(out.top_logprobs):
        ids = [i for i, _ in top]
        assert len(top) == 5 and ids == np.argsort(-logp[t])[:5].tolist()
        np.testing.assert_allclose([v for _, v in top], logp[t, ids], atol=1e-5)


def test_streaming_deltas_and_stop_strings_on_the_background_thread(engine, tok):
    ids = tok.encode("The model")
    base = alone(engine, ids, sp(12))
    stop = base.text[4:7]
    assert stop and stop in base.text
    sched = Scheduler(engine, **POOL)
    sched.start()
    try:
        h = sched.submit(Request(ids, sp(12, stop_strings=(stop,))))
        deltas = list(h.deltas(timeout=300))
        out = h.result(timeout=300)
    finally:
        sched.shutdown()
    assert out.finish_reason == "stop_string" and deltas[-1].finish_reason == "stop_string"
    assert out.text == base.text[:base.text.find(stop)] == "".join(d.text for d in deltas)
    assert out.tokens == base.tokens[:len(out.tokens)] == [t for d in deltas for t in d.token_ids]
    assert sum(d.finish_reason is not None for d in deltas) == 1


def test_concurrent_generate_calls_with_stop_strings_do_not_cross_talk(engine, tok):
    texts = ["The model", "Lightning attention", "A mixture of experts"]
    samplings = [sp(10, stop_strings=(s,)) for s in ("e", "n", "t")]
    expected = [alone(engine, tok.encode(t), s) for t, s in zip(texts, samplings, strict=True)]
    got, seen = [None] * 3, [[] for _ in range(3)]

    def work(i):
        got[i] = alone(engine, tok.encode(texts[i]), samplings[i],
                       callback=lambda step, toks, active: seen[i].append(int(toks[0])) if active[0] else None)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e, s in zip(got, expected, seen, strict=True):
        assert g.tokens == e.tokens and g.text == e.text and g.finish_reason == e.finish_reason
        assert s == g.tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1, 2, 600]), "prompt has token id 600"),
    (dict(prompt=[1] * 60), "context_window 64"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(thinking_budget=-1), "thinking_budget"),
    (dict(expert_threshold=0.0), "expert_threshold"),
    (dict(expert_threshold=1.5), "expert_threshold"),
    (dict(sampling="greedy"), "sampling"),
    (dict(request_id=7), "request_id"),
])
def test_bad_requests_are_named(engine, kwargs, match):
    sched = Scheduler(engine, **POOL)
    request = dict(prompt=[1, 2, 3], sampling=sp(8))
    with pytest.raises(GenerationError, match=match):
        sched.submit(Request(**{**request, **kwargs}))


def test_bad_scheduler_settings_are_named(engine):
    with pytest.raises(GenerationError, match="slots"):
        Scheduler(engine, slots=0)
    with pytest.raises(GenerationError, match="context_window"):
        Scheduler(engine, context_window=10**9)
    sched = Scheduler(engine, **POOL)
    sched.submit(Request([1, 2], sp(4), request_id="x"))
    with pytest.raises(GenerationError, match="already in use"):
        sched.submit(Request([1, 2], sp(4), request_id="x"))


def test_thinking_budget_defaults_to_the_config(tiny, tok):
    engine = Engine(tiny, tok)
    engine.config = engine.config.replace(thinking_budget=7)
    assert engine.thinking_budgets(None, 2) == [7, 7] and engine.thinking_budgets([3, None], 2) == [3, None]
    bare = Engine(tiny)  # no tokenizer: no text to force, so the config default does not apply
    bare.config = engine.config
    assert bare.thinking_budgets(None, 1) == [None]
    with pytest.raises(GenerationError, match="thinking_budget needs a tokenizer"):
        bare.thinking_budgets(4, 1)


def test_cli_generate_thinking_budget(capsys):
    from m1jax.cli import main

    assert main(["generate", "--preset", "tiny", "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "0",
                 "--thinking-budget", "2", "--no-stream"]) == 0
    out, err = capsys.readouterr()
    assert out.count("</think>") >= 1 and "7 reasoning tokens" in err  # 2 + the 5 tokens of "\n</think>"
    assert main(["generate", "--preset", "tiny", "--max-new-tokens", "3", "--thinking-budget", "-1"]) == 2
    assert "thinking_budget" in capsys.readouterr().err
