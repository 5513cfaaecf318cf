"""The multi-host trainer (`m1jax.train.distributed`): the share helpers (fast), and (slow) the reverse-3 CISPO
example (plain, and with the options whose rows cross processes) and an SFT run as 2 processes × 4 CPU devices
(gloo, `m1jax train ... --coordinator`) equal to 1 process × 8 devices with the same global config and seed,
including a resume of the 2-process run.

Tolerance of the slow tests: the programs are the same SPMD programs over the same global mesh; only the
collectives differ (gloo across processes vs in-process), which sum partial results in another order. Losses and
gradient norms agree to rtol 1e-5 and parameters to rtol 1e-5 / atol 1e-6 (fp32 rounding, ~1e-7 relative per
operation, accumulated over a few steps of forward, backward and Adam); sampled tokens, rewards and every
count are compared exactly (a flipped sample would change them and fail the test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.data_sources import Reverse3Prompts, SftExamples
from m1jax.train.distributed import allgather_host, allgather_ragged, process_rows, share_slice
from m1jax.train.loop import as_batch, local_rows, take_rows
from m1jax.train.metrics_log import MetricsLog, read_metrics
from m1jax.train.model_setup import abstract_params
from m1jax.train.run_config import load_run_config
from multihost_worker import free_port, launch
from test_cispo_trainer import EXAMPLE, write_config

from m1jax.config import ModelConfig
from m1jax.sharding import make_mesh

MESH = {"data": 2, "expert": 2, "tensor": 2}  # batch rows over data × expert: both processes hold rows
TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------- helpers (fast)


def test_share_slice_splits_evenly_and_names_the_problem():
    assert [share_slice(8, i, 2) for i in range(2)] == [slice(0, 4), slice(4, 8)]
    assert [share_slice(6, i, 3) for i in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert share_slice(5, 0, 1) == slice(0, 5)
    with pytest.raises(ValueError, match="6 items cannot be split into 4 equal shares"):
        share_slice(6, 0, 4)
    with pytest.raises(ValueError, match=r"share index 2 must lie in \[0, 2\)"):
        share_slice(4, 2, 2)


class _Sharding:
    """A sharding stand-in: the row slices this process's devices hold."""

    def __init__(self, slices):
        self.slices = slices

    def addressable_devices_indices_map(self, shape):
        return {i: (s,) for i, s in enumerate(self.slices)}


def test_process_rows_is_the_union_of_the_local_devices_rows():
    # the example of `jax.make_array_from_process_local_data`: slices (8, 12) and (24, 28) → local rows 0..7
    np.testing.assert_array_equal(process_rows(32, _Sharding([slice(8, 12), slice(24, 28)])),
                                  list(range(8, 12)) + list(range(24, 28)))
    np.testing.assert_array_equal(process_rows(6, _Sharding([slice(None)] * 3)), np.arange(6))  # replicated rows
    np.testing.assert_array_equal(process_rows(5, None), np.arange(5))
    mesh = make_mesh(MESH)  # one process: it holds every row
    np.testing.assert_array_equal(local_rows(16, mesh), np.arange(16))


def test_single_process_exchanges_are_exact_identities():
    x = np.array([0.1, 1 / 3, np.pi], np.float64)
    y = allgather_host(x)
    assert y.dtype == np.float64 and np.array_equal(y, x)
    assert allgather_ragged([[1, 2, 3], [4]]) == [[1, 2, 3], [4]]


def test_as_batch_places_local_rows_and_take_rows_cuts_on_device():
    mesh = make_mesh(MESH)
    tokens = np.arange(32, dtype=np.int32).reshape(8, 4)
    with jax.set_mesh(mesh):
        batch = as_batch({"tokens_BxL": tokens}, mesh, 8)
        assert batch["tokens_BxL"].sharding.spec[0] == ("data", "expert")
        np.testing.assert_array_equal(batch["tokens_BxL"], tokens)
        sub = take_rows(batch, np.array([6, 1, 3, 0], np.int32), mesh)
        np.testing.assert_array_equal(sub["tokens_BxL"], tokens[[6, 1, 3, 0]])
        assert sub["tokens_BxL"].sharding.spec[0] == ("data", "expert")
        with pytest.raises(ValueError, match="'tokens_BxL': this process feeds 8 of its 8 rows, got 6"):
            as_batch({"tokens_BxL": tokens[:6]}, mesh, 8)


def test_data_sources_build_their_share_and_advance_by_the_whole_draw(tmp_path):
    full, part = Reverse3Prompts(3), Reverse3Prompts(3)
    for _ in range(2):
        whole = full.next_batch(8)
        mine = part.next_batch(8, slice(4, 8))
        assert [p.ids for p in mine] == [p.ids for p in whole[4:]]
    assert json.dumps(full.state_dict()) == json.dumps(part.state_dict())
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"tokens": [1, 2 + i, 3]}) + "\n" for i in range(5)))
    a, b = SftExamples(path, 4, seed=0), SftExamples(path, 4, seed=0)
    whole, mine = a.next_batch(4), b.next_batch(4, [1, 3])
    np.testing.assert_array_equal(mine.tokens_BxL, whole.tokens_BxL[[1, 3]])
    assert a.state_dict() == b.state_dict()


def test_metrics_log_of_another_process_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "m" / "metrics.jsonl", progress=True, enabled=False)
    log.write({"step": 1, "loss": 0.5})
    assert log.truncate_after(0) == 0 and not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------- 2 × 4 vs 1 × 8


def _train_processes(algorithm: str, config: Path, logs: Path, steps: int) -> list[str]:
    """`m1jax train` as 2 processes × 4 devices for `steps` steps (resuming from the run's checkpoints)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()

    def command(i: int) -> list[str]:
        return [sys.executable, "-m", "m1jax", "train", algorithm, "--config", str(config), "--steps", str(steps),
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]

    return launch(command, logs, timeout_s=TIMEOUT_S, extra_env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"})


def _train_one_process(algorithm: str, config: Path, output_dir: Path) -> None:
    """The same run in this process (8 devices from conftest)."""
    from m1jax.cli import main

    assert len(jax.devices()) == 8
    assert main(["train", algorithm, "--config", str(config), "--output-dir", str(output_dir)]) == 0


def _params(run_dir: Path, step: int, model_config: dict) -> list[np.ndarray]:
    config = ModelConfig.from_hf_dict(model_config, dtype="float32", param_dtype="float32")
    _, template = abstract_params(config, None)
    ckpt = TrainCheckpointer(run_dir / "checkpoints")
    params = ckpt.restore_params(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template))
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _compare(two: Path, one: Path, steps: int, exact: tuple[str, ...], model_config: dict, check_steps=()) -> None:
    """Assert the 2-process run `two` equals the 1-process run `one` (see the module docstring); prints the largest
    differences."""
    a, b = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))  # one writer
    diffs = {}
    for x, y in zip(a, b, strict=True):
        for key in exact:
            assert x[key] == y[key], (x["step"], key)
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
            diffs[f"{key} rel"] = max(diffs.get(f"{key} rel", 0.0), abs(x[key] - y[key]) / max(abs(y[key]), 1e-30))
    for step in (*check_steps, steps):
        for p, q in zip(_params(two, step, model_config), _params(one, step, model_config), strict=True):
            np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
            diffs["params abs"] = max(diffs.get("params abs", 0.0), float(np.max(np.abs(p - q))))
    print(f"{two.parent.name}: 2 processes vs 1, largest differences over {steps} steps: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@pytest.mark.slow
def test_two_process_cispo_equals_one_process_and_resumes(tmp_path):
    """Reverse-3 CISPO (the SMALL variant: 4 prompts × G 4, μ 2) on a data 2 × expert 2 × tensor 2 mesh: 2 steps
    as 2 processes, then the same 2-process job resumed to step 4 from its step-2 checkpoint, equal to one
    uninterrupted 1-process run of 4 steps: per-step loss and grad norm, rewards and samples, parameters at
    steps 2 and 4. Only process 0 writes metrics (one line per step) and the progress line."""
    overrides = {"mesh": MESH, "checkpoint.keep": 4, "log.progress": True}
    two = write_config(tmp_path / "two.yaml", tmp_path / "two", **overrides)
    first = _train_processes("cispo", two, tmp_path / "logs_a", steps=2)
    resumed = _train_processes("cispo", two, tmp_path / "logs_b", steps=4)
    assert "step 1/2" in first[0] and "step 1/2" not in first[1]
    assert "resumed from step 2" in resumed[0] and "step 3/4" in resumed[0] and "step 3/4" not in resumed[1]
    assert TrainCheckpointer(tmp_path / "two" / "checkpoints").all_steps() == [1, 2, 3, 4]

    one = write_config(tmp_path / "one.yaml", tmp_path / "one", **overrides)
    _train_one_process("cispo", one, tmp_path / "one")
    model_config = load_run_config(EXAMPLE, "cispo").source["model"]["config"]
    _compare(tmp_path / "two", tmp_path / "one", 4, ("reward_mean", "reward_std", "exact_match",
                                                     "response_len_mean", "response_tokens", "frac_zero_std"),
             model_config, check_steps=(2,))


@pytest.mark.slow
def test_two_process_cispo_options_equal_one_process(tmp_path):
    """The options whose rows cross processes: dynamic sampling (groups picked over 2 rounds from the whole batch),
    the shuffled-reward control (a permutation over all processes' rewards), the overlong penalty and routing
    replay (each process packs the routed experts of its rows): 2 steps, 2 processes equal 1 process."""
    overrides = {"mesh": MESH, "steps": 2, "control": "shuffle_rewards", "cispo.routing_replay": True,
                 "rollout.dynamic_sampling": {"max_rounds": 2}, "rollout.overlong": {"cache_tokens": 2, "penalty": 0.5}}
    two = write_config(tmp_path / "two.yaml", tmp_path / "two", **overrides)
    _train_processes("cispo", two, tmp_path / "logs", steps=2)
    one = write_config(tmp_path / "one.yaml", tmp_path / "one", **overrides)
    _train_one_process("cispo", one, tmp_path / "one")
    _compare(tmp_path / "two", tmp_path / "one", 2, ("reward_mean", "reward/overlong_penalty", "ds_rounds",
                                                     "ds_kept_groups", "response_tokens"),
             load_run_config(EXAMPLE, "cispo").source["model"]["config"])


@pytest.mark.slow
def test_two_process_sft_equals_one_process(tmp_path):
    """Next-token SFT (batch 8, rows over data × expert) as 2 processes, each building only its rows of every
    batch, equal to 1 process: per-step loss and grad norm, token counts, final parameters."""
    rows = [{"tokens": [1, 4 + i % 10, 5, 6, 2, 6, 5, 4 + i % 10, 3][: 5 + i % 5]} for i in range(12)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = load_run_config(EXAMPLE, "cispo").source["model"]
    configs = {}
    for name in ("two", "one"):
        cfg = {"algorithm": "sft", "seed": 0, "steps": 3, "output_dir": str(tmp_path / name), "model": model,
               "mesh": MESH, "sft": {"data": str(data), "seq_len": 10, "batch_size": 8, "micro_batches": 2},
               "optimizer": {"lr": 3e-3, "schedule": "constant", "eps": 1e-6}, "log": {"progress": False}}
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(json.dumps(cfg))
    _train_processes("sft", configs["two"], tmp_path / "logs", steps=3)
    _train_one_process("sft", configs["one"], tmp_path / "one")
    _compare(tmp_path / "two", tmp_path / "one", 3, ("num_tokens", "epoch"), model["config"])
