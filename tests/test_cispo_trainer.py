"""The CISPO / SFT trainer (train/): run-config validation, reward stage with the code sandbox, update step on a
mesh and with micro-batches, exact resume after SIGKILL, SFT, and (slow) the reverse-3 end-to-end check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.cispo_trainer import CISPOTrainer
from m1jax.train.data_sources import SftExamples
from m1jax.train.logprobs import probability_agreement, sequence_logprobs
from m1jax.train.loop import KILL_ENV, as_batch
from m1jax.train.losses import token_normalizer
from m1jax.train.metrics_log import read_metrics, strip_timing
from m1jax.train.model_setup import build_model
from m1jax.train.optim import schedule_horizon
from m1jax.train.reward_stage import build_reward_set, overlong_penalty, score_rollouts
from m1jax.train.rewards import RewardSet, make_code_reward
from m1jax.train.rollout import pack_rollouts, rollout_seed
from m1jax.train.run_config import (
    CispoSpec,
    OptimizerSpec,
    RewardsSpec,
    RolloutSpec,
    RunConfigError,
    load_run_config,
    parse_run_config,
)
from m1jax.train.sandbox import SandboxLimits
from m1jax.train.tasks import reverse3
from m1jax.train.update import LossSpec, compute_model, forward_logprobs, update_step

from m1jax.config import DTYPES, LIGHTNING_IMPLS, MOE_IMPLS
from m1jax.sharding import MESH_AXES, make_mesh

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "train" / "cispo_reverse3.yaml"

# A small, fast variant of the example (same model): 4 prompts × G=4, μ=2, checkpoint every step, keep 2.
# eps=1e-6 keeps Adam's first steps (≈ lr·sign(g) with eps=1e-15) well conditioned for float comparisons.
SMALL = {"steps": 4, "rollout.num_prompts": 4, "rollout.group_size": 4, "cispo.num_minibatches": 2,
         "checkpoint.every": 1, "checkpoint.keep": 2, "log.progress": False, "optimizer.eps": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def persistent_compile_cache(tmp_path_factory):
    """Persist this module's compiles (and hand the directory to the SIGKILL subprocess), so the subprocess loads
    the trainer's executables instead of compiling them again (~30 s on 2 cores). Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = tmp_path_factory.mktemp("jax_compile_cache")
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def example_dict() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def write_config(path: Path, output_dir: Path, **overrides) -> Path:
    data = example_dict()
    items = {**SMALL, "output_dir": str(output_dir), **overrides}
    for key, value in items.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def small_config(tmp_path: Path, name: str, **overrides):
    path = write_config(tmp_path / f"{name}.yaml", tmp_path / name, **overrides)
    return load_run_config(path, "cispo")


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("key, value, field", [
    ("cispo.eps_high", 0.0, "cispo.eps_high"),
    ("cispo.eps_high", -0.5, "cispo.eps_high"),
    ("cispo.eps_low", 1.5, "cispo.eps_low"),
    ("cispo.num_minibatches", 3, "cispo.num_minibatches"),
    ("cispo.micro_batches", 5, "cispo.micro_batches"),
    ("cispo.normalization", "sequence", "cispo.normalization"),
    ("cispo.typo_field", 1, "cispo.typo_field"),
    ("optimizer.b2", 1.5, "optimizer.b2"),
    ("optimizer.lr", "fast", "optimizer.lr"),
    ("optimizer.lr", -1e-3, "optimizer.lr"),
    ("rollout.group_size", 1, "rollout.group_size"),
    ("rollout.top_p", 0.0, "rollout.top_p"),
    ("rollout.overlong", {"cache_tokens": 99}, "rollout.overlong.cache_tokens"),
    ("task.name", "jsonl", "task.path"),
    ("control", "shuffle", "control"),
    ("steps", 0, "steps"),
    ("mesh", {"model": 2}, "mesh.model"),
    ("rewards", [], "rewards"),
    ("rewards", [{"name": "reverse3", "weight": "heavy"}], "rewards[0].weight"),
    ("rewards", {"reverse3": "heavy"}, "rewards.reverse3.weight"),
    ("rewards", ["reverse3", {"name": "reverse3", "wieght": 1.0}], "rewards[1].wieght"),
    ("model.dtype", "float64", "model.dtype"),
    ("model.preset", "tiny", "model"),  # both preset and config
])
def test_run_config_errors_name_the_field(key, value, field):
    data = example_dict()
    node = data
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    with pytest.raises(RunConfigError, match=re.escape(f"'{field}'")):
        parse_run_config(data, "cispo")


def test_run_config_schema_basics(tmp_path):
    cfg = load_run_config(EXAMPLE, "cispo", ["optimizer.lr=3e-4", "seed=7"])  # YAML's "3e-4" string accepted
    assert cfg.optimizer.lr == 3e-4 and cfg.seed == 7 and cfg.cispo.eps_high == 4.0 and cfg.cispo.eps_low is None
    assert cfg.optimizer.b2 == 0.95 and cfg.optimizer.eps == 1e-15 and cfg.rollout.group_size == 8
    assert cfg.optimizer_steps == cfg.steps * cfg.cispo.num_minibatches
    common = {k: v for k, v in example_dict().items() if k in ("seed", "steps", "output_dir", "model")}
    with pytest.raises(RunConfigError, match="'sft'"):
        parse_run_config(common, "sft")
    with pytest.raises(RunConfigError, match="'rewards': unknown key"):
        parse_run_config({**common, "rewards": ["reverse3"], "rollout": {}, "sft": {}}, "sft")
    with pytest.raises(RunConfigError, match="'algorithm'"):
        parse_run_config({**example_dict(), "algorithm": "cispo"}, "sft")
    with pytest.raises(RunConfigError, match="unknown reward 'nope'"):
        build_reward_set(RewardsSpec.parse([{"name": "nope"}]))
    with pytest.raises(RunConfigError, match="cannot import"):
        build_reward_set(RewardsSpec.parse({"no_such_module_xyz:fn": 1.0}))
    rs = build_reward_set(RewardsSpec.parse({"reverse3": 0.5, "m1jax.train.reward_stage:reverse3_exact_reward": 2.0}))
    assert rs.weights == {"reverse3": 0.5, "reverse3_exact_reward": 2.0}


MINIMAL_SFT = {"steps": 1, "output_dir": "out", "model": {"preset": "tiny"}}
MINIMAL = {**MINIMAL_SFT, "rewards": ["reverse3"]}


def test_run_config_minimal_file_takes_the_defaults():
    """A minimal file resolves to the models' defaults (the documented ones, spelled out here once more on purpose:
    a changed default must be a deliberate edit of this test)."""
    cfg = parse_run_config(MINIMAL, "cispo")
    assert cfg.rollout == RolloutSpec() and cfg.cispo == CispoSpec() and cfg.optimizer == OptimizerSpec()
    assert (cfg.seed, cfg.init_seed, cfg.tokenizer, cfg.mesh, cfg.control, cfg.sft) == (0, 0, None, None, None, None)
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.moe_impl, cfg.model.lightning_impl) == (
        "float32", None, "auto", "auto")
    assert cfg.task.name == "reverse3" and cfg.rewards.functions[0].weight == 1.0 and cfg.rewards.on_error == "raise"
    r, c, o = cfg.rollout, cfg.cispo, cfg.optimizer
    assert (r.num_prompts, r.group_size, r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.repetition_stop,
            r.prefill_chunk, r.overlong, r.dynamic_sampling_rounds) == (16, 8, 64, 1.0, 1.0, 0, 3000, 4096, None, 0)
    assert (c.loss, c.eps_low, c.eps_high, c.normalization, c.advantage_std, c.num_minibatches, c.epochs) == (
        "cispo", None, 4.0, "group", "group", 4, 1)
    assert (o.lr, o.b1, o.b2, o.eps, o.max_grad_norm, o.schedule, o.min_lr_ratio) == (
        3e-4, 0.9, 0.95, 1e-15, 1.0, "cosine", 0.1)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.log.progress, cfg.log.tensorboard) == (50, 3, True, False)
    assert cfg.checkpoint_dir == (Path("out") / "checkpoints").absolute() and cfg.optimizer_steps == 4
    assert cfg.source == MINIMAL
    sft = parse_run_config({**MINIMAL_SFT, "sft": {"data": "d.jsonl"}}, "sft")
    assert (sft.sft.seq_len, sft.sft.batch_size, sft.sft.micro_batches, sft.rollout) == (128, 8, 1, None)
    grpo = parse_run_config({**MINIMAL, "cispo": {"loss": "grpo_clip"}}, "cispo").cispo
    assert (grpo.eps_low, grpo.eps_high) == (0.2, 0.2)


@pytest.mark.parametrize("key, value, expected", [
    ("steps", "1", "'steps': must be a valid integer, got '1'"),
    ("seed", 1.0, "'seed': must be a valid integer, got 1.0"),
    ("optimizer", {"lr": True}, "'optimizer.lr': must be a valid number, got True"),
    ("log", {"progress": "yes"}, "'log.progress': must be a valid boolean, got 'yes'"),
    ("optimizer", {"b2": 1.0}, "'optimizer.b2': must be less than 1, got 1.0"),
    ("optimizer", {"lr": float("nan")}, "'optimizer.lr': must be a finite number, got nan"),
    ("rollout", {"top_k": -1}, "'rollout.top_k': must be greater than or equal to 0, got -1"),
    ("rollout", {"overlong": {"cache_tokens": 2, "penalti": 1}},
     "'rollout.overlong.penalti': unknown key (allowed here: cache_tokens, penalty)"),
    ("rollout", {"dynamic_sampling": {"max_rounds": 0}}, "'rollout.dynamic_sampling.max_rounds': must be greater"),
    ("mesh", {"data": 0}, "'mesh.data': must be greater than or equal to 1, got 0"),
    ("rewards", {"functions": ["reverse3"], "workers": 0}, "'rewards.workers': must be greater than or equal to 1"),
    ("rewards", {"functions": {}}, "'rewards.functions': needs at least one reward function"),
])
def test_run_config_wrong_type_or_range_names_the_field(key, value, expected):
    with pytest.raises(RunConfigError, match="^" + re.escape(f"run config field {expected}")):
        parse_run_config({**MINIMAL, key: value}, "cispo")


def test_run_config_cross_field_rules_and_spellings():
    with pytest.raises(RunConfigError, match=r"'sft.micro_batches': must divide sft.batch_size = 8, got 3"):
        parse_run_config({**MINIMAL_SFT, "sft": {"data": "d.jsonl", "micro_batches": 3}}, "sft")
    with pytest.raises(RunConfigError, match=r"'cispo.micro_batches': must divide the 16 rows"):
        parse_run_config({**MINIMAL, "rollout": {"num_prompts": 8, "group_size": 8}, "cispo": {"micro_batches": 3}},
                         "cispo")
    for impl in MOE_IMPLS:  # the option lists are m1jax.config's, not copies
        model = parse_run_config({**MINIMAL, "model": {"preset": "tiny", "moe_impl": impl}}, "cispo").model
        assert model.moe_impl == impl
    for impl, dtype in zip(LIGHTNING_IMPLS, DTYPES * 2, strict=False):
        model = parse_run_config({**MINIMAL, "model": {"preset": "tiny", "lightning_impl": impl, "dtype": dtype}},
                                 "cispo").model
        assert (model.lightning_impl, model.dtype) == (impl, dtype)
    assert dict(parse_run_config({**MINIMAL, "mesh": dict.fromkeys(MESH_AXES, 2)}, "cispo").mesh) == dict.fromkeys(
        MESH_AXES, 2)
    spellings = [[{"name": "reverse3", "weight": 1.0}], ["reverse3"], {"reverse3": 1}, {"functions": ["reverse3"]}]
    assert len({parse_run_config({**MINIMAL, "rewards": s}, "cispo").rewards for s in spellings}) == 1
    rounds = {ds: parse_run_config({**MINIMAL, "rollout": {"dynamic_sampling": ds}}, "cispo").rollout
              .dynamic_sampling_rounds for ds in (True, False, None)}
    assert rounds == {True: 3, False: 0, None: 0}
    assert parse_run_config({**MINIMAL, "rollout": {"dynamic_sampling": {"max_rounds": 5}}},
                            "cispo").rollout.dynamic_sampling_rounds == 5
    assert parse_run_config({**MINIMAL, "cispo": {"advantage_std": "none"}}, "cispo").cispo.advantage_std is None
    assert hash(OptimizerSpec.parse({"lr": 1e-3})) == hash(OptimizerSpec.parse({"lr": "1e-3"}))  # a jit static


def test_cli_reports_the_bad_field(tmp_path, capsys):
    from m1jax.cli import main

    path = write_config(tmp_path / "bad.yaml", tmp_path / "out", **{"cispo.eps_high": 0.0})
    assert main(["train", "cispo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cispo.eps_high" in err and "OFFSET" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- host pieces


def test_learning_rate_schedule_warmup_and_cosine():
    """Warmup η·(t+1)/W (the first update is not a no-op), then cosine from η to η·r at the horizon."""
    from m1jax.train.optim import learning_rate_schedule

    spec = OptimizerSpec.parse({"lr": 1e-3, "warmup_steps": 4, "schedule": "cosine", "min_lr_ratio": 0.1})
    lr = [float(learning_rate_schedule(spec, 104)(t)) for t in (0, 1, 3, 4, 54, 104, 200)]
    np.testing.assert_allclose(lr, [2.5e-4, 5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-5)
    const = OptimizerSpec.parse({"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"})
    assert float(learning_rate_schedule(const, 0)(0)) == pytest.approx(1e-3)


def test_rollout_seeds_overlong_packing_and_agreement():
    seeds = {rollout_seed(0, t, p, s) for t in range(3) for p in range(4) for s in range(4)}
    assert len(seeds) == 48 and rollout_seed(0, 1, 2, 3) == rollout_seed(0, 1, 2, 3)
    assert all(0 <= s < 2**32 for s in seeds) and rollout_seed(1, 1, 2, 3) != rollout_seed(0, 1, 2, 3)
    # DAPO: L_max = 10, L_cache = 4 → free up to 6, then linear to −1 at 10
    np.testing.assert_allclose(overlong_penalty([3, 6, 7, 8, 10], 10, 4), [0, 0, -0.25, -0.5, -1.0])

    class R:  # a GenerationResult stand-in
        def __init__(self, tokens):
            self.tokens, self.logprobs = tokens, [-0.5] * len(tokens)

    packed = pack_rollouts([[1, 2], [1, 2, 3]], [R([7, 8, 9]), R([7])], 4, 3)
    np.testing.assert_array_equal(packed.tokens_NxL, [[0, 0, 1, 2, 7, 8, 9], [0, 1, 2, 3, 7, 0, 0]])
    np.testing.assert_array_equal(packed.mask_NxL, [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(packed.valid_NxL[1], [0, 1, 1, 1, 1, 0, 0])
    agree = probability_agreement([[-0.1, -1.0, -2.0]], [[-0.1, -1.0, -2.0]], [[1, 1, 1]])
    assert agree["sampler_trainer_corr"] == pytest.approx(1.0) and agree["sampler_trainer_abs_dp"] == 0.0


FAST_SANDBOX = SandboxLimits(timeout_s=1.0)


def test_reward_stage_runs_code_reward_in_the_sandbox():
    """A RewardSet with the sandboxed code reward inside the trainer's reward stage: an infinite loop and a crash
    in candidate code score 0 (bounded time, trainer process unaffected), correct code scores 1."""
    assert build_reward_set(RewardsSpec.parse({"code": 1.0})).functions[0].__name__ == "code_reward"
    reward_set = RewardSet([(make_code_reward(FAST_SANDBOX), 1.0), (lambda p, c, **ex: len(ex["completion_ids"]),
                                                                     0.0)], names=["code", "length"])
    completions = ["```python\ndef add(a, b):\n    while True:\n        pass\n```",
                   "```python\nimport os\ndef add(a, b):\n    os.kill(os.getpid(), 11)\n```",
                   "```python\ndef add(a, b):\n    raise RuntimeError('boom')\n```",
                   "```python\ndef add(a, b):\n    return a + b\n```"]
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    start = time.monotonic()
    scores = score_rollouts(reward_set, ["write add"] * 4, completions, [[1, 2]] * 4, [[5] * i for i in range(4)],
                            ["stop"] * 4, [{"tests": tests}] * 4, workers=4)
    np.testing.assert_array_equal(scores.per_function["code"], [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(scores.per_function["length"], [0, 1, 2, 3])
    np.testing.assert_array_equal(scores.total, [0.0, 0.0, 0.0, 1.0])
    assert time.monotonic() - start < 4 * (2 * FAST_SANDBOX.timeout_s + 3)


def test_sft_examples_masks(tmp_path):
    from m1jax.demo import demo_tokenizer

    tok = demo_tokenizer(512)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"tokens": [1, 2, 3, 4]}, {"text": "the model"}, {"prompt": [5, 6], "completion": [7, 8, 9]}]) + "\n")
    data = SftExamples(path, 6, tokenizer=tok, seed=0)
    assert data.examples[1][0] == tok.encode("the model")
    batch = data.next_batch(3)
    rows = {tuple(t[v]): (m, v) for t, v, m in zip(batch.tokens_BxL, batch.valid_BxL, batch.mask_BxL)}
    m, _ = rows[(5, 6, 7, 8, 9)]
    np.testing.assert_array_equal(m, [0, 0, 1, 1, 1, 0])  # only completion tokens count
    m, _ = rows[(1, 2, 3, 4)]
    np.testing.assert_array_equal(m, [0, 1, 1, 1, 0, 0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        SftExamples(bad, 6)


# ----------------------------------------------------------------------------------------------- update step


def _synthetic_batch(bundle, rows=8, seed=0):
    """Reverse-3-shaped rows with responses of varying length, old_logp slightly off the current policy."""
    rng = np.random.default_rng(seed)
    prompts, _ = reverse3.sample_prompts(rng, rows)
    tokens = np.zeros((rows, 11), np.int32)
    tokens[:, :5] = prompts
    tokens[:, 5:] = rng.integers(3, 14, (rows, 6))
    lens = rng.integers(1, 7, rows)
    valid = np.arange(11)[None] < (5 + lens)[:, None]
    mask = (valid & (np.arange(11)[None] >= 5)).astype(np.float32)
    lp, _ = forward_logprobs(bundle.params, jnp.asarray(tokens), jnp.asarray(valid), graphdef=bundle.graphdef,
                             param_dtypes=bundle.param_dtypes)
    old = np.asarray(lp) + rng.normal(0, 0.3, lp.shape).astype(np.float32)
    groups = np.repeat(np.arange(rows // 4), 4).astype(np.int32)
    denom = np.asarray(token_normalizer(mask, groups, normalization="group", num_groups=rows // 4))
    return {"tokens_BxL": tokens, "valid_BxL": valid, "mask_BxL": mask, "old_logp_BxL": old,
            "adv_B": rng.normal(0, 1, rows).astype(np.float32), "denom_B": denom}


def _small_optimizer() -> OptimizerSpec:
    """The optimizer of the SMALL trainer runs (constant schedule: horizon 0), so these steps share its compiles."""
    spec = OptimizerSpec.parse({**example_dict()["optimizer"], "eps": SMALL["optimizer.eps"]})
    assert schedule_horizon(spec, 100) == 0
    return spec


def _step(bundle, params, batch, micro=1, mesh=None):
    from m1jax.train.update import init_optimizer_state

    opt_spec = _small_optimizer()
    params = jax.tree.map(jnp.copy, params)  # update_step donates its inputs
    opt = init_optimizer_state(params, opt_spec, 0)
    return update_step(params, opt, as_batch(batch, mesh), graphdef=bundle.graphdef,
                       param_dtypes=bundle.param_dtypes, spec=LossSpec("cispo"), optimizer=opt_spec, total_steps=0,
                       micro_batches=micro)


@pytest.fixture(scope="module")
def bundle():
    return build_model(load_run_config(EXAMPLE, "cispo").model, seed=0)


def test_sequence_logprobs_is_the_fp32_log_softmax_of_the_model(bundle):
    model = compute_model(bundle.graphdef, bundle.params, bundle.param_dtypes)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 14, (3, 7)))
    out = sequence_logprobs(model, tokens, with_entropy=True)
    ref = jax.nn.log_softmax(model(tokens).logits, axis=-1)
    expected = jnp.take_along_axis(ref[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert out.logp_BxL.dtype == jnp.float32 and out.logp_BxL.shape == (3, 7)
    np.testing.assert_allclose(out.logp_BxL[:, 1:], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.logp_BxL[:, 0], 0.0)
    np.testing.assert_allclose(out.entropy_BxL[:, 1:], -jnp.sum(jnp.exp(ref) * ref, -1)[:, :-1], rtol=1e-5)


def test_micro_batches_sum_to_the_one_batch_update(bundle):
    batch = _synthetic_batch(bundle)
    p1, _, s1 = _step(bundle, bundle.params, batch, micro=1)
    p4, _, s4 = _step(bundle, bundle.params, batch, micro=2)
    assert float(s1["loss"]) == pytest.approx(float(s4["loss"]), rel=1e-5, abs=1e-7)
    assert float(s1["grad_norm"]) == pytest.approx(float(s4["grad_norm"]), rel=1e-5)
    assert float(s1["num_tokens"]) == float(s4["num_tokens"]) == batch["mask_BxL"].sum()
    assert float(s1["clip_frac"]) == pytest.approx(float(s4["clip_frac"]))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(bundle.params)))


def test_bf16_compute_keeps_fp32_masters_and_moments(bundle):
    """model.dtype=bfloat16: the forward runs in bf16 (router and LM head stay fp32), while the master parameters
    and the AdamW moments stay fp32; the bf16 token log-probs stay close to the fp32 ones."""
    import optax

    bf16 = build_model(load_run_config(EXAMPLE, "cispo", ["model.dtype=bfloat16", "output_dir=/tmp/unused"]).model,
                       seed=0)
    assert "bfloat16" in bf16.param_dtypes and "float32" in bf16.param_dtypes  # router gates stay fp32
    batch = _synthetic_batch(bundle)
    params, opt, stats = _step(bf16, bf16.params, batch)
    assert np.isfinite(float(stats["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    adam = [s for s in jax.tree.leaves(opt, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert adam and all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam[0].mu, adam[0].nu)))
    lp32, _ = forward_logprobs(bundle.params, jnp.asarray(batch["tokens_BxL"]), jnp.asarray(batch["valid_BxL"]),
                               graphdef=bundle.graphdef, param_dtypes=bundle.param_dtypes)
    lp16, _ = forward_logprobs(bf16.params, jnp.asarray(batch["tokens_BxL"]), jnp.asarray(batch["valid_BxL"]),
                               graphdef=bf16.graphdef, param_dtypes=bf16.param_dtypes)
    assert lp16.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(lp16 - lp32)) / jnp.max(jnp.abs(lp32)))
    print(f"bf16 vs fp32 token log-prob max rel err {rel:.2e}")
    assert rel < 2e-2


def test_mesh_training_step_equals_single_device(bundle):
    """One update on the 8-device CPU mesh (data 2 × tensor 4, parameters sharded by the m1jax rules) gives the
    single-device loss, gradient norm and parameters."""
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 host devices"
    batch = _synthetic_batch(bundle)
    p_ref, _, s_ref = _step(bundle, bundle.params, batch)
    mesh = make_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        sharded = build_model(load_run_config(EXAMPLE, "cispo").model, seed=0, mesh=mesh)
        before = [x.sharding for x in jax.tree.leaves(sharded.params)]
        assert any(any(s is not None for s in sh.spec) for sh in before), "nothing was sharded"
        p_mesh, _, s_mesh = _step(sharded, sharded.params, batch, mesh=mesh)
        after = jax.tree.leaves(p_mesh)
        # updated params keep their layout
        assert all(x.sharding.is_equivalent_to(sh, x.ndim) for x, sh in zip(after, before, strict=True))
    assert float(s_mesh["loss"]) == pytest.approx(float(s_ref["loss"]), rel=1e-5, abs=1e-7)
    assert float(s_mesh["grad_norm"]) == pytest.approx(float(s_ref["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_mesh)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- trainer


@pytest.mark.slow
def test_trainer_micro_batches_and_options(tmp_path):
    """Inside the trainer, micro_batches=2 gives the same step as 1; dynamic sampling, the overlong penalty and
    the shuffled-reward control run and report their metrics."""
    runs = {}
    for name, micro in (("m1", 1), ("m2", 2)):
        cfg = small_config(tmp_path, name, steps=1, **{"cispo.micro_batches": micro})
        trainer = CISPOTrainer(cfg)
        [runs[name]] = trainer.run()
        runs[name + "_params"] = trainer.params
        trainer.close()
    a, b = runs["m1"], runs["m2"]
    for key in ("reward_mean", "reward_std", "frac_zero_std", "response_len_mean", "exact_match"):
        assert a[key] == b[key], key
    for key in ("loss", "grad_norm", "entropy", "is_weight_mean", "sampler_trainer_corr"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for x, y in zip(jax.tree.leaves(runs["m1_params"]), jax.tree.leaves(runs["m2_params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert a["sampler_trainer_corr"] > 0.999 and a["sampler_trainer_abs_dp"] < 1e-4

    cfg = small_config(tmp_path, "opts", steps=2, control="shuffle_rewards",
                       **{"rollout.dynamic_sampling": {"max_rounds": 2},
                          "rollout.overlong": {"cache_tokens": 2, "penalty": 0.5}})
    trainer = CISPOTrainer(cfg)
    history = trainer.run()
    trainer.close()
    for m in history:
        assert 1 <= m["ds_rounds"] <= 2 and 0 <= m["ds_kept_groups"] <= 4
        assert -0.5 <= m["reward/overlong_penalty"] <= 0.0
        assert all(np.isfinite(v) for v in m.values() if isinstance(v, float))


def _compile_counts() -> dict:
    from m1jax import generation

    fns = {"decode": generation._decode_loop, "prefill": generation._forward_chunk, "update": update_step,
           "forward": forward_logprobs}
    return {k: f._cache_size() for k, f in fns.items()}


@pytest.mark.slow  # three trainer subprocesses (~18 s)
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, persistent_compile_cache):
    """Kill (SIGKILL, hidden env var) a subprocess run after step 3's metrics line, before its checkpoint; the
    resumed run restores step 2 (params, optimizer, RNG, data position), cuts metrics.jsonl back and continues
    with exactly the lines of an uninterrupted run (timing fields aside)."""
    full = small_config(tmp_path, "full")
    trainer = CISPOTrainer(full)
    trainer.run()
    trainer.close()
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [m["step"] for m in reference] == [1, 2, 3, 4]
    assert TrainCheckpointer(full.checkpoint_dir).all_steps() == [3, 4]  # keep-last-2

    path = write_config(tmp_path / "killed.yaml", tmp_path / "killed")
    env = {**os.environ, KILL_ENV: "3", "PYTHONPATH": str(REPO), "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "JAX_COMPILATION_CACHE_DIR": str(persistent_compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run([sys.executable, "-m", "m1jax", "train", "cispo", "--config", str(path)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    killed = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in killed] == [1, 2, 3]
    cfg = load_run_config(path, "cispo")
    assert TrainCheckpointer(cfg.checkpoint_dir).latest_step() == 2  # step 3 never checkpointed

    compiled = _compile_counts()
    resumed = CISPOTrainer(cfg)
    history = resumed.run()
    resumed.close()
    assert [m["step"] for m in history] == [3, 4]
    assert _compile_counts() == compiled, "a resumed run (constant shapes) must not compile anything new"
    final = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [strip_timing(m) for m in final] == [strip_timing(m) for m in reference]


def test_sft_step_reduces_loss(tmp_path):
    """`m1jax train sft` on a tiny repeated dataset (same optimizer/update/checkpoint machinery, next-token loss
    on token masks): the loss falls."""
    from m1jax.cli import main

    rows = [{"tokens": [1, 4, 5, 6, 2, 6, 5, 4, 3]}, {"prompt": [1, 7, 8, 9, 2], "completion": [9, 8, 7, 3]},
            {"tokens": [1, 10, 11, 12, 2, 12, 11, 10, 3]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n")
    cfg = {"algorithm": "sft", "seed": 0, "steps": 12, "output_dir": str(tmp_path / "sft"),
           "model": example_dict()["model"], "sft": {"data": str(data), "seq_len": 10, "batch_size": 6,
                                                     "micro_batches": 2},
           "optimizer": {"lr": 3e-3, "schedule": "constant"}, "checkpoint": {"every": 6, "keep": 1},
           "log": {"progress": False}}
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "sft", "--config", str(path)]) == 0
    metrics = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert first > 2.0 and last < 0.5 * first, (first, last)
    assert TrainCheckpointer(tmp_path / "sft" / "checkpoints").all_steps() == [12]


# ----------------------------------------------------------------------------------------------- end to end


def _e2e(tmp_path, name, **overrides):
    cfg = load_run_config(EXAMPLE, "cispo", [f"output_dir={tmp_path / name}", "log.progress=false",
                                            *[f"{k}={json.dumps(v)}" for k, v in overrides.items()]])
    start = time.perf_counter()
    trainer = CISPOTrainer(cfg)
    history = trainer.run()
    trainer.close()
    rewards = [m["reward_mean"] for m in history]
    summary = {"name": name, "steps": len(history), "wall_s": round(time.perf_counter() - start, 1),
               "start": round(float(np.mean(rewards[:5])), 3), "end": round(float(np.mean(rewards[-10:])), 3),
               "first_step_ge_0.9": next((m["step"] for m in history if m["reward_mean"] >= 0.9), None),
               "exact_end": round(float(np.mean([m["exact_match"] for m in history[-10:]])), 3)}
    print(json.dumps(summary), file=sys.stderr)
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_reverse3_learns(tmp_path, seed):
    s = _e2e(tmp_path, f"seed{seed}", seed=seed)
    assert s["start"] < 0.15, s
    assert s["end"] >= 0.9, s


@pytest.mark.slow
def test_reverse3_shuffled_reward_control_does_not_learn(tmp_path):
    s = _e2e(tmp_path, "control", control="shuffle_rewards")
    assert s["end"] < 0.3, s
