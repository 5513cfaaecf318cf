"""The m1jax model computes what MiniMax-M1 computes.

* vs transformers `MiniMaxForCausalLM` (PyTorch, CPU, fp32) where it agrees with the remote code (RC):
  `rotary_dim == head_dim` and a power-of-two head count. Its per-layer slope factor puts the RC's `+1e-5`
  inside the denominator (|Δslope| ≤ 6e-7); the oracle is patched to the RC factor (`m1jax.hf_reference.rc_slope_rate`)
  and one test also runs it unpatched.
* vs an independent float64 reference written from the spec (`rc_reference.py`) for what transformers cannot
  check: partial RoPE (`rotary_dim < head_dim`, ignored by transformers) and non-power-of-two head counts
  (transformers' slopes differ from RC's ALiBi interleave rule).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_oracle import make_hf_model, save_original_layout, save_transformers_layout
from m1jax.convert.hf_layout import expected_tensors
from m1jax.convert.safetensors_io import write_safetensors
from rc_reference import rc_forward

from m1jax.config import ModelConfig
from m1jax.loading import from_pretrained

TOL = 2e-5  # max |Δlogits| / max |logits|, fp32


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def tiny(layer_kinds, block_size, heads=4, kv=2, rotary=None, spelling="transformers", **kw):
    base = ModelConfig.from_preset("tiny-hf")
    types = tuple("full_attention" if t == "S" else "linear_attention" for t in layer_kinds)
    c = base.replace(num_hidden_layers=len(types), layer_types=types, block_size=block_size,
                     num_attention_heads=heads, num_key_value_heads=kv, rotary_dim=rotary, hf_source_json="{}",
                     hf_spelling=spelling, **kw)
    alpha = (2 * len(types)) ** 0.25
    return c.replace(full_attn_alpha=alpha, linear_attn_alpha=alpha, mlp_alpha=alpha)


HF_CASES = {
    "LLLS-b8": (tiny("LLLS", 8), [(2, 21), (1, 8)]),
    "LSLS-b4": (tiny("LSLS", 4), [(3, 13)]),
    "SLLL-b16-kv4": (tiny("SLLL", 16, heads=8, kv=4), [(2, 33)]),
    "LLLLLLLS-b256": (tiny("LLLLLLLS", 256, num_local_experts=8), [(1, 300)]),
}


def _logits(model, tokens):
    return np.asarray(jax.jit(lambda t: model(t).logits)(jnp.asarray(tokens)))


@pytest.mark.parametrize("layout", ["original", "transformers"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, layout, tmp_path):
    config, shapes = HF_CASES[case]
    hf = make_hf_model(config, seed=len(case))
    save = save_original_layout if layout == "original" else save_transformers_layout
    save(hf, config, tmp_path, shards=3)
    model = from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(0)
    for b, t in shapes:
        tokens = rng.integers(0, config.vocab_size, (b, t))
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        err = rel(_logits(model, tokens), ref)
        print(f"{case} {layout} batch {b} x {t}: max rel err {err:.2e}")
        assert err <= TOL


def test_unpatched_transformers_slopes_are_within_tolerance(tmp_path):
    config, _ = HF_CASES["LLLS-b8"]
    hf = make_hf_model(config, seed=1, rc_slopes=False)
    save_original_layout(hf, config, tmp_path)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert rel(_logits(from_pretrained(tmp_path, dtype="float32"), tokens), ref) <= TOL


@pytest.mark.parametrize("heads, kv, rotary, kinds, block", [
    (4, 2, 8, "LLLS", 8),  # partial RoPE: transformers would rotate all 16 dims
    (6, 2, 16, "LLSL", 4),  # 6 heads: RC's ALiBi interleave slopes
    (6, 3, 8, "LSLS", 8),  # both
])
def test_logits_match_independent_rc_reference(heads, kv, rotary, kinds, block, tmp_path):
    config = tiny(kinds, block, heads=heads, kv=kv, rotary=rotary, spelling="remote_code")
    rng = np.random.default_rng(heads)
    tensors = _random_original_weights(config, rng)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    model = from_pretrained(tmp_path, dtype="float32")
    tokens = rng.integers(0, config.vocab_size, (2, 19))
    ref = rc_forward(config.to_hf_dict(), tensors, tokens)
    err = rel(_logits(model, tokens), ref)
    print(f"RC reference heads={heads} rotary={rotary}: max rel err {err:.2e}")
    assert err <= TOL


def _random_original_weights(config, rng):
    out = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.08 * rng.standard_normal(shape)).astype(np.float32)
    return out
