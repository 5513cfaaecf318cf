"""The hybrid prefix cache: a prompt restored from cached blocks gives exactly (bit for bit) the greedy tokens and
log-probs of the same prompt prefilled without the cache, for shared prefixes ending inside a block and at a
block end; different suffixes after one prefix; LRU eviction under a small budget; lookups and hits counted."""

import numpy as np
import pytest
from prefix_helpers import BLOCK, CAPACITY, GREEDY, assert_same, tokens

from m1jax.demo import demo_model
from m1jax.generation import Engine, GenerationError
from m1jax.prefix_cache import PrefixCache, block_keys, prefill_prompt
from m1jax.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(demo_model("tiny", seed=0), prefill_chunk=BLOCK)


def run(engine, prompt, store):
    state, cached = prefill_prompt(engine, prompt, block=BLOCK, capacity=CAPACITY, store=store)
    logits = np.asarray(state.next_logits_BxV)
    [result], _ = engine.decode(state, GREEDY)
    return result, cached, logits


@pytest.mark.parametrize("shared", [40, 48])  # ends inside block 2 / at the end of block 2
def test_cache_on_equals_off(engine, shared):
    store = PrefixCache(BLOCK, 1024)
    prefix = tokens(shared, shared)
    a, b = prefix + tokens(1, 13), prefix + tokens(2, 21)
    on_a, on_b = run(engine, a, store), run(engine, b, store)
    assert on_a[1] == 0 and on_b[1] == (shared // BLOCK) * BLOCK
    assert store.lookups == 2 and store.hits == 1 and store.hit_tokens == on_b[1]
    off_a, off_b = run(engine, a, None), run(engine, b, None)
    assert_same(on_a, off_a)
    assert_same(on_b, off_b)
    assert on_a[0].tokens != on_b[0].tokens  # different suffixes, different continuations
    [ref] = engine.generate([b], GREEDY)  # the engine's own (left-padded) prefill: same tokens, fp32-close
    assert ref.tokens == on_b[0].tokens
    np.testing.assert_allclose(ref.logprobs, on_b[0].logprobs, atol=1e-5)


def test_a_fully_cached_prompt_runs_no_call(engine):
    store = PrefixCache(BLOCK, 1024)
    prompt = tokens(7, 3 * BLOCK)
    first, again = run(engine, prompt, store), run(engine, prompt, store)
    assert first[1] == 0 and again[1] == 3 * BLOCK
    assert_same(again, first)
    assert_same(again, run(engine, prompt, None))


def test_lru_eviction_under_a_small_budget(engine):
    store = PrefixCache(BLOCK, 2 * BLOCK)
    p, q = tokens(3, 4 * BLOCK + 3), tokens(4, 3 * BLOCK)
    kp, kq = block_keys(p, BLOCK), block_keys(q, BLOCK)
    run(engine, p, store)
    assert len(store) == 2 and store.tokens == 2 * BLOCK
    assert [k in store for k in kp] == [True, True, False, False]  # the deepest blocks go first
    run(engine, q, store)  # p's blocks are older: evicted
    assert [k in store for k in kp + kq] == [False] * 4 + [True, True, False]
    again = run(engine, p, store)
    assert again[1] == 0 and [k in store for k in kp[:2]] == [True, True]
    assert_same(again, run(engine, p, None))
    hit = run(engine, p[:2 * BLOCK] + tokens(5, 9), store)
    assert hit[1] == 2 * BLOCK and store.hits == 1 and store.lookups == 4
    tiny = PrefixCache(BLOCK, BLOCK - 1)  # a budget below one block holds nothing
    run(engine, p, tiny)
    assert len(tiny) == 0


def test_bad_prefix_cache_input(engine):
    with pytest.raises(GenerationError, match="block must be"):
        PrefixCache(0, 10)
    with pytest.raises(GenerationError, match="does not fit a 32-slot prefill cache"):
        prefill_prompt(engine, tokens(1, 40), block=BLOCK, capacity=32)
    with pytest.raises(GenerationError, match="is empty"):
        prefill_prompt(engine, [], block=BLOCK, capacity=CAPACITY)
    with pytest.raises(GenerationError, match="holds 8-token blocks"):
        prefill_prompt(engine, tokens(1, 40), block=BLOCK, capacity=CAPACITY, store=PrefixCache(8, 64))


def test_packed_cache_drops_the_tail_padding(engine):
    from m1jax.prefix_cache import RowPrefill

    prompt = tokens(9, 2 * BLOCK + 5)
    run_ = RowPrefill(engine, prompt, block=BLOCK, capacity=CAPACITY).run()
    packed = run_.packed_cache()
    n = len(prompt)
    assert int(packed.length) == n and np.asarray(packed.valid_BxS)[0].tolist() == [True] * n + [False] * (
        CAPACITY - n)
    full = run_.state()
    for got, want in zip(packed.per_layer(), full.cache.per_layer(), strict=True):
        if isinstance(got, tuple):  # slot t holds token t: the blocks as they were, the tail moved left
            w = np.asarray(want[0][0])
            expected = np.concatenate([w[:2 * BLOCK], w[3 * BLOCK - 5:3 * BLOCK]])
            np.testing.assert_array_equal(np.asarray(got[0][0])[:n], expected)
            assert not np.asarray(got[0][0])[n:].any()
    [a], _ = engine.decode(full.replace(cache=packed), GREEDY)
    [b], _ = engine.decode(full, GREEDY)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


# ------------------------------------------------------------------------------------------- in the scheduler
POOL = dict(slots=2, context_window=64, prefill_chunk=BLOCK, decode_steps=4)  # test_scheduler's pool shape


def sched_sampling(max_new=6):
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_token_ids=(), repetition_stop=None)


@pytest.fixture(scope="module")
def sched_engine():
    from m1jax.demo import demo_tokenizer

    return Engine(demo_model("tiny", seed=0), demo_tokenizer())


def test_scheduler_cache_on_equals_off(sched_engine):
    """Questions after two shared documents (ending inside a block and at a block end), run together: with the
    cache every request after a document's first restores its full blocks and equals the run without it."""
    from m1jax.serving import Request, Scheduler

    inside, at_end = tokens(11, 2 * BLOCK + 5), tokens(12, 2 * BLOCK)
    prompts = [inside + tokens(20, 5), inside + tokens(21, 9), at_end + tokens(22, 3), at_end + tokens(23, 11),
               inside + tokens(24, 2)]
    requests = [Request(prompt=p, sampling=sched_sampling()) for p in prompts]
    on_sched = Scheduler(sched_engine, prefix_cache_tokens=8 * BLOCK, **POOL)
    on = on_sched.run(requests)
    off = Scheduler(sched_engine, **POOL).run(requests)
    assert [o.cached_tokens for o in on] == [0, 2 * BLOCK, 0, 2 * BLOCK, 2 * BLOCK]
    assert all(o.cached_tokens == 0 for o in off)
    for a, b in zip(on, off, strict=True):  # off prefills left-padded: same tokens, log-probs to fp32 rounding
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    stats = on_sched.stats()
    assert stats["prefix_lookups"] == 5 and stats["prefix_hits"] == 3

    # Bit for bit: a request restored from the cache equals the same request prefilled without a hit.
    hit = Scheduler(sched_engine, prefix_cache_tokens=8 * BLOCK, **POOL)
    hit.run(requests[:1])
    [restored] = hit.run(requests[1:2])
    [fresh] = Scheduler(sched_engine, prefix_cache_tokens=8 * BLOCK, **POOL).run(requests[1:2])
    assert restored.cached_tokens == 2 * BLOCK and fresh.cached_tokens == 0
    assert restored.tokens == fresh.tokens and restored.logprobs == fresh.logprobs


def test_scheduler_rejects_a_bad_budget(sched_engine):
    from m1jax.serving import Scheduler

    with pytest.raises(GenerationError, match="prefix_cache_tokens must be an integer ≥ 0"):
        Scheduler(sched_engine, prefix_cache_tokens=-1, **POOL)
