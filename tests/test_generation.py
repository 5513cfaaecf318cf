"""The generation engine: exact vs transformers and vs full forwards, chunked prefill, state save/resume across
processes, batched continuation, stop rules, streaming, bad input."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_oracle import make_hf_model, save_original_layout

from m1jax.config import ModelConfig
from m1jax.demo import demo_model, demo_tokenizer
from m1jax.generation import Engine, GenerationError, generate, load_state, prefill_layout, save_state
from m1jax.loading import from_pretrained
from m1jax.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(), repetition_stop=None)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny():
    return demo_model("tiny", seed=0)


@pytest.fixture(scope="module")
def full_logits(tiny):
    """Logits of a full (uncached) forward over each token list; right-padded to one compiled length, which
    leaves the logits of the real (earlier) positions unchanged in a causal model."""
    fwd = jax.jit(lambda t: tiny(t).logits)

    def run(seqs, length=64):
        batch = np.zeros((len(seqs), length), np.int32)
        for i, s in enumerate(seqs):
            batch[i, :len(s)] = s
        out = np.asarray(fwd(jnp.asarray(batch)))
        return [out[i, :len(s)] for i, s in enumerate(seqs)]

    return run


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 500, n).tolist() for n in (3, 29, 12)]


# --------------------------------------------------------------------------------- vs transformers
HF_CONFIGS = {
    "LSLS-b4": ("LSLS", 4),
    "LLLS-b8": ("LLLS", 8),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_equals_transformers_generate(name, tmp_path):
    kinds, block = HF_CONFIGS[name]
    base = ModelConfig.from_preset("tiny-hf")
    config = base.replace(layer_types=tuple("full_attention" if k == "S" else "linear_attention" for k in kinds),
                          block_size=block, hf_source_json="{}")
    hf = make_hf_model(config, seed=3)
    save_original_layout(hf, config, tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (2, 23, 11)]
    # chunk 8 does not divide the padded length of every prompt mix; batch generated together in m1jax
    results = Engine(model, prefill_chunk=8).generate(prompts, GREEDY.__class__(**{**GREEDY.__dict__,
                                                                                   "max_new_tokens": 12}))
    for p, r in zip(prompts, results, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(p):].tolist()
        assert r.tokens == ref, (name, len(p))
        assert r.finish_reason == "length"


# ------------------------------------------------------------------------------- vs full forwards
def test_cached_decode_logits_equal_full_forward(tiny):
    """Model level: prefill into a cache, then one token at a time; logits == a full forward at each step."""
    from m1jax.cache import init_cache

    rng = np.random.default_rng(2)
    seq = jnp.asarray(rng.integers(0, 500, (2, 30)))
    full = np.asarray(jax.jit(lambda t: tiny(t).logits)(seq))
    cache = init_cache(tiny.config, 2, 64)
    step = jax.jit(lambda t, c: tiny(t, cache=c))
    out = step(seq[:, :21], cache)
    assert rel(out.logits, full[:, :21]) <= 1e-5
    cache = out.cache
    for i in range(21, 30):
        out = step(seq[:, i:i + 1], cache)
        cache = out.cache
        assert rel(out.logits[:, 0], full[:, i]) <= 1e-5, i


def test_batch1_decode_on_unstacked_experts_equals_stacked_and_full_forward(tiny, prompts, full_logits):
    """Batch 1 on CPU decodes with a per-expert copy of the weights (`unstack_experts`, made once per engine):
    same tokens and log-probs as the stacked weights, log-probs equal to a full forward."""
    eng = Engine(tiny, prefill_chunk=8)
    r = eng.generate([prompts[1]], GREEDY)[0]
    assert (eng._unstacked is not None) == (jax.default_backend() == "cpu")
    ref = Engine(tiny, prefill_chunk=8, unstack_experts=False).generate([prompts[1]], GREEDY)[0]
    assert r.tokens == ref.tokens
    np.testing.assert_allclose(r.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
    logp = np.asarray(jax.nn.log_softmax(full_logits([prompts[1] + r.tokens])[0], -1))
    n = len(prompts[1])
    np.testing.assert_allclose(r.logprobs, logp[np.arange(n - 1, n + len(r.tokens) - 1), r.tokens], atol=1e-4)


def test_expert_copy_is_skipped_when_memory_is_short(tiny, prompts, monkeypatch):
    import m1jax.generation as generation
    from m1jax.modules.moe import expert_weight_bytes

    c = tiny.config
    per_layer = 3 * c.num_local_experts * c.hidden_size * c.intermediate_size * 4
    assert expert_weight_bytes(nnx.split(tiny)[1]) == c.num_hidden_layers * per_layer
    monkeypatch.setattr(generation, "available_memory_bytes", lambda: 1000)
    eng = Engine(tiny, prefill_chunk=8)
    r = eng.generate([prompts[1]], GREEDY)[0]
    assert eng._unstacked is None and not eng.unstack_experts
    assert r.tokens == Engine(tiny, prefill_chunk=8, unstack_experts=False).generate([prompts[1]], GREEDY)[0].tokens


def test_engine_logprobs_equal_full_forward_of_each_sequence(tiny, prompts, full_logits):
    results = Engine(tiny, prefill_chunk=8).generate(prompts, GREEDY)
    fulls = full_logits([p + r.tokens for p, r in zip(prompts, results, strict=True)])
    for p, r, full in zip(prompts, results, fulls, strict=True):
        logp = np.asarray(jax.nn.log_softmax(full, -1))
        expected = logp[np.arange(len(p) - 1, len(p) + len(r.tokens) - 1), r.tokens]
        assert rel(r.logprobs, expected) <= 1e-5
        assert r.tokens == list(np.argmax(logp[len(p) - 1:-1], -1))  # greedy w.r.t. the full forward


@pytest.mark.parametrize("chunk", [5, 7, 16])
def test_chunked_prefill_equals_one_shot(tiny, prompts, chunk):
    one = Engine(tiny, prefill_chunk=4096).prefill(prompts)
    chunked = Engine(tiny, prefill_chunk=chunk).prefill(prompts)
    assert rel(chunked.next_logits_BxV, one.next_logits_BxV) <= 1e-5
    np.testing.assert_array_equal(chunked.positions_B, [3, 29, 12])
    for a, b in zip(chunked.cache.layers, one.cache.layers, strict=True):
        if not isinstance(a, tuple):  # lightning states
            assert rel(a, b) <= 1e-5


def test_prefill_layout_pads_a_long_prompt_to_the_bucket_of_its_remainder():
    """Prompts longer than the chunk: one call of the remainder's length bucket, then whole chunks."""
    def calls(n, chunk):
        tokens, positions, valid, calls = prefill_layout([np.arange(n)], [5], chunk)
        assert tokens.shape[1] == sum(calls) and valid.sum() == n and positions[0, -1] == 5 + n - 1
        return calls

    assert calls(1341, 256) == [64] + [256] * 5  # not 6 × 256
    assert calls(1280, 256) == [256] * 5
    assert calls(300, 256) == [64, 256]
    assert calls(250, 256) == [256]  # one call: the prompt's bucket, as before
    assert calls(20, 256) == [32]
    assert calls(29, 8) == [8] * 4  # a chunk below the smallest bucket
    assert calls(1341, None) == [2048]


def test_prefill_with_a_short_first_call_equals_one_shot(tiny):
    """A 70-token prompt in calls of 16 + 32 + 32 (left-padded first call) equals one call, batched with shorter
    prompts."""
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, tiny.config.vocab_size, n).tolist() for n in (70, 40, 3)]
    one = Engine(tiny, prefill_chunk=4096).prefill(rows)
    chunked = Engine(tiny, prefill_chunk=32).prefill(rows)
    assert int(chunked.cache.length) == 80
    assert rel(chunked.next_logits_BxV, one.next_logits_BxV) <= 1e-5
    for a, b in zip(chunked.cache.layers, one.cache.layers, strict=True):
        if not isinstance(a, tuple):  # lightning states
            assert rel(a, b) <= 1e-5


def test_batched_continuation_of_unequal_lengths_equals_full_forward(tiny, prompts, full_logits):
    """Append turns of different lengths to a batched state (left-padded chunks mid-sequence)."""
    engine = Engine(tiny, prefill_chunk=8)
    state = engine.prefill(prompts)
    turns = [[7, 8, 9, 10, 11, 12, 13], [42], [5, 6, 7, 8]]
    state = engine.prefill(turns, state=state)
    fulls = full_logits([p + t for p, t in zip(prompts, turns, strict=True)])
    for i, full in enumerate(fulls):
        assert rel(state.next_logits_BxV[i], full[-1]) <= 1e-5, i
    results, _ = engine.decode(state, GREEDY)
    one_shot = engine.generate([p + t for p, t in zip(prompts, turns, strict=True)], GREEDY)
    assert [r.tokens for r in results] == [r.tokens for r in one_shot]


# --------------------------------------------------------------------------------- save / resume
RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from m1jax.demo import demo_model
    from m1jax.generation import Engine, save_state
    doc, path = json.loads(sys.argv[1]), sys.argv[2]
    state = Engine(demo_model("tiny", seed=0), prefill_chunk=16).prefill([doc])
    save_state(state, path, metadata={"doc_tokens": len(doc)})
""")


@pytest.mark.slow
def test_saved_state_resumes_in_another_process(tiny, tmp_path):
    doc = np.random.default_rng(4).integers(0, 500, 150).tolist()
    question = [11, 22, 33, 44]
    path = tmp_path / "doc_state"
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(doc), str(path)], check=True,
                   cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    engine = Engine(tiny, prefill_chunk=16)
    resumed = load_state(path, tiny.config)
    in_process = engine.prefill([doc])
    assert rel(resumed.next_logits_BxV, in_process.next_logits_BxV) <= 1e-6
    for q in (question, [5, 6]):  # many questions from one saved state
        a, _ = engine.decode(engine.prefill([q], state=resumed), GREEDY)
        b, _ = engine.decode(engine.prefill([q], state=in_process), GREEDY)
        c = engine.generate([doc + q], GREEDY)
        assert a[0].tokens == b[0].tokens == c[0].tokens
        assert rel(a[0].logprobs, c[0].logprobs) <= 1e-5
    with pytest.raises(GenerationError, match="already exists"):
        save_state(in_process, path)
    with pytest.raises(GenerationError, match="not a complete saved generation state"):
        load_state(tmp_path, tiny.config)


# ----------------------------------------------------------------------------------- stop rules
def test_stop_token_and_max_tokens(tiny, prompts):
    free = Engine(tiny).generate(prompts[:1], GREEDY)[0]
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    r = Engine(tiny).generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,),
                                                          repetition_stop=None))[0]
    assert r.finish_reason == "stop" and r.tokens == free.tokens[:first + 1]
    assert free.finish_reason == "length" and len(free.tokens) == 10


@pytest.mark.parametrize("n", [1, 4, 7])
def test_repetition_stop_fires_exactly_at_n(tiny, prompts, n):
    # τ = 0: every sampled token has p > τ, so the run of confident tokens reaches N at step N exactly
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, stop_token_ids=(), repetition_stop=n,
                        repetition_threshold=0.0)
    r = Engine(tiny).generate(prompts[:2], sp)
    assert [x.finish_reason for x in r] == ["repetition"] * 2 and [len(x.tokens) for x in r] == [n, n]
    # the random tiny model is never 99% sure: the default rule does not fire
    default = Engine(tiny).generate(prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=10,
                                                                stop_token_ids=(), repetition_stop=1))
    assert [x.finish_reason for x in default] == ["length"] * 2


def test_stop_strings_and_streaming_callback(tiny):
    tok = demo_tokenizer()
    engine = Engine(tiny, tok)
    ids = tok.encode("The model")
    base = engine.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=12, repetition_stop=None,
                                                 stop_token_ids=()))[0]
    stop = base.text[4:7]
    assert stop and stop in base.text
    seen = []
    r = engine.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=12, repetition_stop=None,
                                              stop_token_ids=(), stop_strings=(stop,)),
                        callback=lambda step, toks, active: seen.append((step, int(toks[0]), bool(active[0]))))[0]
    assert r.finish_reason == "stop_string"
    assert r.text == base.text[:base.text.find(stop)]
    assert [t for _, t, a in seen if a] == r.tokens == base.tokens[:len(r.tokens)]
    assert [s for s, _, _ in seen] == list(range(len(seen)))


def test_seeds_are_per_request(tiny, prompts):
    sp = dict(temperature=1.0, max_new_tokens=8, stop_token_ids=(), repetition_stop=None)
    a = generate(tiny, prompts, seed=[5, 6, 7], **sp)
    b = generate(tiny, [prompts[2], prompts[0]], seed=[7, 5], **sp)  # other batch composition, same seeds
    assert a[0].tokens == b[1].tokens and a[2].tokens == b[0].tokens
    c = generate(tiny, prompts, seed=[9, 6, 7], **sp)
    assert c[0].tokens != a[0].tokens and c[1].tokens == a[1].tokens


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "non-empty list"),
    ([[1, 2, 600]], {}, "token id 600 outside the vocabulary"),
    ([[1, -3]], {}, "token id -3"),
    (["hello"], {}, "is a string"),
    ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_k": -2}, "top_k"),
    ([[1, 2]], {"min_p": 1.5}, "min_p"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1, 2] * 2100], {}, "configured maximum 4096"),
    ([[1, 2]], {"max_new_tokens": 5000}, "exceeds the configured maximum"),
    ([[1, 2], [3]], {"seed": [1]}, "2 prompts"),
])
def test_bad_requests_are_named(tiny, prompts, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        generate(tiny, prompts, **kwargs)


def test_cli_generate_on_the_embedded_default(capsys):
    from m1jax.cli import main

    assert main(["generate", "--chat", "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0",
                 "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "6 generated" in err and "finish reason: length" in err
    assert main(["generate", "--max-new-tokens", "3", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_cache_memory_at_m1_scale():
    from m1jax.cache import cache_memory

    mem = cache_memory(ModelConfig.from_preset("minimax-m1-80k"), dtype="bfloat16")
    assert mem["per_token"] == 40_960  # 10 softmax layers x K and V x 8 heads x 128 x 2 bytes
    assert mem["per_sequence"] == 70 * 64 * 128 * 128 * 4 == 293_601_280  # ≈ 294 MB of fp32 lightning state
