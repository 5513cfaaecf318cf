"""LoRA fine-tuning in the trainers (`model.lora` in the run config): only adapters are trained and checkpointed,
the base stays frozen, a LoRA run resumes and exports merged; the slow test: LoRA CISPO on a pretrained tiny
model learns the reverse-3 task."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.metrics_log import read_metrics
from m1jax.train.model_setup import LORA_FILE, build_model
from m1jax.train.run_config import ModelSpec, RunConfigError, load_run_config

from m1jax import lora

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "train" / "cispo_reverse3.yaml"
MODEL = yaml.safe_load(EXAMPLE.read_text())["model"]


def sft_run(tmp_path: Path, name: str, steps: int, model: dict) -> Path:
    from m1jax.cli import main

    rows = [{"tokens": [1, 4, 5, 6, 2, 6, 5, 4, 3]}, {"prompt": [1, 7, 8, 9, 2], "completion": [9, 8, 7, 3]},
            {"tokens": [1, 10, 11, 12, 2, 12, 11, 10, 3]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n")
    cfg = {"algorithm": "sft", "seed": 0, "steps": steps, "output_dir": str(tmp_path / name), "model": model,
           "sft": {"data": str(data), "seq_len": 10, "batch_size": 6, "micro_batches": 2},
           "optimizer": {"lr": 1e-2, "schedule": "constant"}, "checkpoint": {"every": steps, "keep": 1},
           "log": {"progress": False}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "sft", "--config", str(path)]) == 0
    return tmp_path / name


def test_lora_spec_errors_name_the_field():
    with pytest.raises(RunConfigError, match="'model.lora.rank'"):
        ModelSpec.parse({"preset": "tiny", "lora": {"rank": 0}}, "model")
    with pytest.raises(RunConfigError, match="'model.quantize'"):
        ModelSpec.parse({"preset": "tiny", "quantize": "int8-experts"}, "model")
    with pytest.raises(RunConfigError, match=r"'model.lora.targets\[0\]'"):
        ModelSpec.parse({"preset": "tiny", "lora": {"rank": 2, "targets": ["mlp"]}}, "model")


def test_lora_bundle_trains_only_adapters_from_a_frozen_base():
    full = build_model(ModelSpec.parse(MODEL, "model"), seed=0)
    spec = ModelSpec.parse({**MODEL, "lora": {"rank": 4, "targets": ["attention", "experts"]}}, "model")
    b = build_model(spec, seed=0)
    assert b.frozen is not None and b.config.lora_rank == 4
    n_adapter = sum(x.size for x in jax.tree.leaves(b.params))
    n_base = sum(x.size for x in jax.tree.leaves(b.frozen))
    assert n_adapter < 0.5 * n_base == 0.5 * sum(x.size for x in jax.tree.leaves(full.params))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(b.params))
    tokens = np.array([[1, 4, 5, 6, 2, 6, 5, 4]])
    np.testing.assert_array_equal(b.compute_model(b.params)(tokens).logits,
                                  full.compute_model(full.params)(tokens).logits)  # B = 0: the base model


@pytest.mark.slow
def test_lora_sft_run_learns_checkpoints_adapters_resumes_and_exports_merged(tmp_path):
    model = {**MODEL, "lora": {"rank": 8}}
    run = sft_run(tmp_path, "lora", 12, model)
    metrics = read_metrics(run / "metrics.jsonl")
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"], (metrics[0]["loss"], metrics[-1]["loss"])
    root = run / "checkpoints"
    assert json.loads((root / LORA_FILE).read_text())["model"]["lora"]["rank"] == 8

    # The checkpoint holds the adapters only; the base is rebuilt from the run's own model section.
    restored = build_model(ModelSpec.parse({"checkpoint": str(run)}, "model"), seed=0)
    fresh = build_model(ModelSpec.parse(model, "model"), seed=0)
    assert jax.tree.structure(restored.params) == jax.tree.structure(fresh.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(fresh.params)))
    for a, b in zip(jax.tree.leaves(restored.frozen), jax.tree.leaves(fresh.frozen)):
        np.testing.assert_array_equal(a, b)  # the base never moved
    names = TrainCheckpointer(root)
    assert names.latest_step() == 12
    names.close()

    # Merged for generation / export: a plain model with the adapted model's outputs.
    tokens = np.array([[1, 7, 8, 9, 2, 9, 8]])
    adapted = restored.compute_model(restored.params)
    merged = restored.inference_model(restored.params)
    assert merged.config.lora_rank == 0 and not lora.adapter_state(merged)
    assert not any(isinstance(v, lora.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
    np.testing.assert_allclose(merged(tokens).logits, adapted(tokens).logits, rtol=1e-5, atol=1e-5)

    # Resume: more steps continue from the adapters and optimizer state of step 12.
    more = sft_run(tmp_path, "lora", 16, model)
    assert [m["step"] for m in read_metrics(more / "metrics.jsonl")] == list(range(1, 17))


@pytest.mark.slow
def test_lora_cispo_on_a_pretrained_tiny_model_learns_reverse3(tmp_path):
    """Pretrain the example model by SFT on "copy 3 digits" (same format, answer d1 d2 d3), then LoRA CISPO
    (base frozen, rank 8 on attention and experts) on "reverse 3 digits" from that checkpoint raises the reward
    above the copy policy's (measured 0.35 → 0.73 and 0.35 → 0.55 over the last 10 of 150 steps in two runs; it
    plateaus near 0.75, two of the three digits right, where full fine-tuning from scratch reaches 0.9 in 350
    steps)."""
    import itertools

    from m1jax.train.cispo_trainer import CISPOTrainer

    from m1jax.cli import main

    rows = [{"prompt": [1, a + 4, b + 4, c + 4, 2], "completion": [a + 4, b + 4, c + 4, 3]}
            for a, b, c in itertools.product(range(10), repeat=3)]
    (tmp_path / "copy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sft = {"algorithm": "sft", "seed": 0, "steps": 200, "output_dir": str(tmp_path / "pre"), "model": MODEL,
           "sft": {"data": str(tmp_path / "copy.jsonl"), "seq_len": 9, "batch_size": 32, "micro_batches": 1},
           "optimizer": {"lr": 3e-3, "schedule": "constant"}, "checkpoint": {"every": 200, "keep": 1},
           "log": {"progress": False}}
    (tmp_path / "pre.json").write_text(json.dumps(sft))
    assert main(["train", "sft", "--config", str(tmp_path / "pre.json")]) == 0

    model = {"checkpoint": str(tmp_path / "pre"), "dtype": "float32", "lora": {"rank": 8, "alpha": 16.0}}
    cfg = load_run_config(EXAMPLE, "cispo", [f"output_dir={tmp_path / 'lora'}", "log.progress=false", "steps=150",
                                            "optimizer.lr=3e-3", f"model={json.dumps(model)}"])
    trainer = CISPOTrainer(cfg)
    rewards = [m["reward_mean"] for m in trainer.run()]
    trainer.close()
    start, end = float(np.mean(rewards[:10])), float(np.mean(rewards[-10:]))
    print(json.dumps({"lora_start": start, "lora_end": end}))
    assert start < 0.5 and end >= start + 0.15, (start, end)
