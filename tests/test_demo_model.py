"""The embedded default model (m1jax/demo.py): the fallback when the shipped files are missing, and `m1jax export`
of a training run (how the shipped model is written)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from m1jax import demo


def test_missing_demo_model_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", tmp_path / "absent")
    assert demo.demo_model_dir() is None
    with pytest.warns(UserWarning, match="trained demo model is not installed.*random weights"):
        model, tok = demo.load_default_model()
    assert model.config.hidden_size == 64 and tok.vocab_size == 512  # the `tiny` preset, demo_tokenizer()


def test_cli_tokenizer_without_model_is_one_line_error(capsys):
    from m1jax.cli import main

    assert main(["generate", "--tokenizer", "/some/dir"]) == 2
    assert "--tokenizer needs --model or --preset" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_training_run_loads_with_the_same_logits(tmp_path):
    """`m1jax export RUN DST --tokenizer DIR` writes the HF original layout of the run's latest checkpoint:
    loading it gives the trained model's logits exactly (fp32)."""
    from m1jax.train.model_setup import build_model
    from m1jax.train.run_config import ModelSpec
    from m1jax.train.update import compute_model

    from m1jax.cli import main
    from m1jax.loading import from_pretrained
    from m1jax.tokenizer import Tokenizer

    tok_dir = demo.make_bpe_tokenizer_dir(tmp_path / "tok", 512)
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"tokens": [508, 40 + i, 41 + i, 42 + i, 509]}) for i in range(8)) + "\n")
    cfg = {"algorithm": "sft", "seed": 0, "steps": 2, "output_dir": str(tmp_path / "run"), "tokenizer": str(tok_dir),
           "model": {"preset": "tiny"}, "sft": {"data": str(data), "seq_len": 8, "batch_size": 4},
           "optimizer": {"lr": 1e-2, "schedule": "constant"}, "log": {"progress": False}}
    (tmp_path / "sft.json").write_text(json.dumps(cfg))
    assert main(["train", "sft", "--config", str(tmp_path / "sft.json")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--quiet"]) == 2  # no --tokenizer
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--tokenizer", str(tok_dir), "--quiet"]) == 0

    hf = tmp_path / "hf"
    assert {p.name for p in hf.iterdir()} >= {"config.json", "model.safetensors.index.json", "tokenizer.json",
                                              "tokenizer_config.json", "model-00001-of-00001.safetensors"}
    bundle = build_model(ModelSpec(checkpoint=str(tmp_path / "run")), seed=0)
    trained = compute_model(bundle.graphdef, bundle.params, bundle.param_dtypes)
    exported = from_pretrained(hf)
    tokens = jnp.asarray([[508, 40, 41, 42, 509, 7]])
    np.testing.assert_array_equal(np.asarray(exported(tokens).logits), np.asarray(trained(tokens).logits))
    assert Tokenizer.from_pretrained(hf).chat_template == demo.M1_FORMAT_TEMPLATE


# ----------------------------------------------------------------------------------------------- the shipped model
def test_shipped_demo_model_is_a_valid_hf_checkpoint():
    """m1jax/demo_model: the HF original layout (config.json, safetensors + index, tokenizer files) of a small
    MiniMax-architecture model with lightning and softmax layers and a routed MoE, whose tokenizer matches it."""
    from m1jax.convert.hf_layout import ORIGINAL, expected_tensors
    from m1jax.convert.safetensors_io import SafetensorsFile

    from m1jax.config import ModelConfig
    from m1jax.tokenizer import Tokenizer

    directory = demo.demo_model_dir()
    assert directory is not None, f"the trained demo model is missing from {demo.DEMO_MODEL_DIR}"
    config = ModelConfig.from_json_file(directory / "config.json")
    assert {"linear_attention", "full_attention"} <= set(config.layer_types)
    assert config.num_local_experts > config.num_experts_per_tok >= 1
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    expected = expected_tensors(config, ORIGINAL)
    assert set(index["weight_map"]) == set(expected)
    shapes = {}
    for name in sorted(set(index["weight_map"].values())):
        f = SafetensorsFile(directory / name)
        shapes.update({n: tuple(info.shape) for n, info in f.infos.items()})
    assert shapes == {n: tuple(s) for n, s in expected.items()}
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 10 * 2**20, f"the demo model should be a few MB, it is {size / 2**20:.1f} MiB"
    tok = Tokenizer.from_pretrained(directory)
    assert tok.vocab_size == config.vocab_size and tok.eos_token_id == config.eos_token_id
    assert tok.chat_template == demo.M1_FORMAT_TEMPLATE


def test_shipped_demo_model_answers_held_out_questions():
    """The default model answers held-out questions (never trained on) greedily in M1's format, mostly right."""
    from m1jax.train.tasks import arithmetic

    model, tok = demo.load_default_model()
    rows = arithmetic.held_out_rows(tok, 9, seed=1)
    result = arithmetic.evaluate(model, tok, rows)
    assert result["format_rate"] == 1.0, result["replies"]
    assert result["accuracy"] >= 7 / 9, list(zip([r["question"] for r in rows], result["replies"]))


def test_shipped_demo_model_works_out_17_times_23():
    """The README's first command: greedily, the default model's reply to "What is 17 * 23?" is the reference
    reply, scratchpad step for step (`m1jax.train.tasks.arithmetic.reply`)."""
    from m1jax.train.tasks import arithmetic

    model, tok = demo.load_default_model()
    row = {"prompt": arithmetic.chat_prompt(tok, "What is 17 * 23?"), "answer": 391, "op": "mul"}
    [result] = arithmetic.evaluate(model, tok, [row])["replies"]
    assert result == arithmetic.reply("mul", 17, 23), result
