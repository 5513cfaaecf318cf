"""`m1jax verify`: passes on a good checkpoint, fails on a corrupted one naming the broken layer, and the
transformers reference mode finds a layer that differs."""

import json
import shutil

import numpy as np
import pytest
import torch
from hf_oracle import make_hf_model, save_original_layout
from m1jax.convert.safetensors_io import SafetensorsFile
from synthetic_checkpoint import edit_tensor

from m1jax import hf_reference
from m1jax.cli import main
from m1jax.config import ModelConfig
from m1jax.loading import from_pretrained
from m1jax.verify import FAIL, PASS, SKIP, verify

CONFIG = ModelConfig.from_preset("tiny-hf")  # L S L S, 4 experts top-2, block 8: transformers reproduces it
EXPERT_W1 = "model.layers.2.block_sparse_moe.experts.1.w1.weight"
ATTN_QKV = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    return save_original_layout(make_hf_model(CONFIG, seed=3), CONFIG, path, shards=2)


def corrupted(good, tmp_path, name, fn):
    """A copy of the `good` checkpoint with tensor `name` replaced by `fn(tensor)`."""
    path = tmp_path / "corrupted"
    shutil.copytree(good, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    f = SafetensorsFile(path / index["weight_map"][name])
    value = fn(np.array(f.get(name)))
    del f
    edit_tensor(path, name, value)
    return path


@pytest.fixture(scope="module")
def good_report(good):
    """The good checkpoint's report with the transformers reference (every check)."""
    return verify(from_pretrained(good, dtype="float32"), name=str(good), reference="transformers")


def test_a_good_checkpoint_passes_every_check(good_report):
    got = {c.name: c for c in good_report.checks}
    assert good_report.ok and good_report.first_divergence is None
    for name in ("weights finite", "weight scale vs peers", "activations finite", "bf16 vs fp32",
                 "lightning blocked vs recurrent", "chunked vs one-shot prefill", "cached decode vs full forward",
                 "sharded vs unsharded", "routing: dead / overloaded", "vs transformers: layers, logits",
                 "vs transformers: greedy tokens"):
        assert got[name].status == PASS, got[name]
    assert got["sharded vs unsharded"].detail.startswith("mesh expert=4, tensor=2")
    for name in ("lightning blocked vs recurrent", "chunked vs one-shot prefill", "cached decode vs full forward",
                 "sharded vs unsharded", "vs transformers: layers, logits"):
        assert got[name].value < 2e-5, got[name]  # fp32 paths of the same function
    assert 1e-4 < got["bf16 vs fp32"].value < 5e-2  # bf16 really ran
    assert got["vs transformers: greedy tokens"].value == 1.0
    assert json.loads(json.dumps(good_report.to_json()))["ok"] is True
    text = good_report.format()
    assert "RESULT: PASS (0 of 11 checks failed)" in text and len(text.splitlines()) < 25


def test_cli_exits_0_on_a_good_checkpoint(good, good_report, capsys):
    assert main(["verify", "--model", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["checks"]) == 9  # no reference asked for


def test_a_scaled_expert_weight_fails_naming_its_layer(good, tmp_path, capsys):
    path = corrupted(good, tmp_path, EXPERT_W1, lambda w: w * 100)
    assert main(["verify", "--model", str(path)]) == 1
    out = capsys.readouterr().out
    assert "weight scale vs peers" in out and "FAIL" in out
    assert "layer 2 expert 1 block_sparse_moe.w1" in out
    assert "first divergence: layer 2 (weight scale vs peers)" in out
    assert "RESULT: FAIL" in out


def test_a_nan_weight_fails_naming_its_layer(good, tmp_path):
    def poison(w):
        w = w.copy()
        w[3, 5] = np.nan
        return w

    model = from_pretrained(corrupted(good, tmp_path, ATTN_QKV, poison), dtype="float32")
    report = verify(model)
    got = {c.name: c for c in report.checks}
    assert not report.ok
    assert got["weights finite"].status == FAIL and got["weights finite"].layer == 1
    assert "layers.1.self_attn.q_proj" in got["weights finite"].detail
    assert got["activations finite"].status == FAIL and got["activations finite"].layer == 1
    assert report.first_divergence.layer == 1


def test_transformers_reference_names_the_layer_that_differs(good, monkeypatch):
    """A reference whose layer 2 differs (its expert weights scaled): the comparison fails at layer 2."""
    build = hf_reference.transformers_model

    def perturbed(model):
        hf = build(model)
        with torch.no_grad():
            hf.model.layers[2].mlp.experts.down_proj.mul_(1.5)
        return hf

    monkeypatch.setattr(hf_reference, "transformers_model", perturbed)
    report = verify(from_pretrained(good, dtype="float32"), reference="transformers")
    got = {c.name: c for c in report.checks}
    assert got["vs transformers: layers, logits"].status == FAIL
    assert got["vs transformers: layers, logits"].layer == 2
    assert report.first_divergence.layer == 2


def test_reference_mode_skips_a_config_transformers_cannot_reproduce():
    from m1jax.demo import demo_model
    from m1jax.verify import check_transformers

    model = demo_model()  # the tiny preset: partial rotary, 6 heads
    [check] = check_transformers(model, np.zeros((1, 4), np.int32), None)
    assert check.status == SKIP
    assert "partial rotary" in check.detail and "6 heads" in check.detail


def test_bad_input_is_named(tmp_path, capsys):
    assert main(["verify", "--model", str(tmp_path / "missing")]) == 2
    assert "m1jax verify: error:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reference must be"):
        verify(object(), reference="vllm")


def test_layer_outputs_of_scanned_and_unrolled_models_agree(good):
    """`return_hidden` (what verify compares per layer) gives every layer's output whether or not the layers run
    as one scan."""
    import jax
    import jax.numpy as jnp

    scanned = from_pretrained(good, dtype="float32")
    unrolled = from_pretrained(good, dtype="float32", scan_layers=False)
    assert scanned.config.scan_groups == 2 and unrolled.config.scan_groups == 0
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 11)))
    a, b = (jax.jit(lambda t, m=m: m(t, logits="none", return_hidden=True).layer_hidden)(tokens)
            for m in (scanned, unrolled))
    assert len(a) == len(b) == CONFIG.num_hidden_layers
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    assert jax.eval_shape(lambda t: unrolled(t).layer_hidden, tokens) is None
