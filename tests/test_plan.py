"""`m1jax plan`: mesh parsing, the per-chip arithmetic on the shapes, mesh suggestion, the CLI (no libtpu needed),
and (marker `tpu`) a deviceless TPU compile of a 2-layer model."""

import json
import os
import re
import subprocess
import sys

import pytest

from m1jax import plan as planmod
from m1jax.cache import cache_memory
from m1jax.cli import build_parser, main
from m1jax.config import ModelConfig
from m1jax.plan import PlanError, candidate_meshes, parse_mesh, per_chip_bytes, suggest_mesh
from m1jax.topology import libtpu_available, parse_topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def m1():
    return ModelConfig.from_preset("minimax-m1-80k", dtype="bfloat16", param_dtype="bfloat16")


def test_parse_mesh():
    assert parse_mesh("data=8, expert=8") == {"data": 8, "expert": 8}
    assert parse_mesh(None) is None and parse_mesh("") is None
    for bad, msg in [("data=8,model=2", "axis 'model' is unknown"), ("data", "not AXIS=SIZE"),
                     ("data=0", "positive"), ("data=2,data=4", "twice")]:
        with pytest.raises(PlanError, match=msg):
            parse_mesh(bad)


def test_cli_parses_plan_arguments():
    args = build_parser().parse_args(["plan", "--topology", "v5p-128", "--mode", "prefill", "--batch", "4",
                                      "--context", "4096", "--mesh", "data=8,tensor=8", "--json"])
    assert (args.topology, args.mode, args.batch, args.context, args.mesh, args.json, args.model) == \
        ("v5p-128", "prefill", 4, 4096, "data=8,tensor=8", True, "minimax-m1-80k")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--topology", "v5p-128", "--mode", "generate"])


def test_per_chip_bytes_follow_the_rules(m1):
    """M1-80k on tensor 8 × expert 8: expert stacks split 64 ways, the rest by tensor only; the cache split by
    batch (over the batch axes) and heads (tensor); one chip holds everything without a mesh."""
    layers, e, d, f = 80, 32, 6144, 9216
    got = per_chip_bytes(m1, "decode", 16, 1024, {"tensor": 8, "expert": 8})
    assert got["experts"] == layers * 3 * e * d * f * 2 // 64
    one = per_chip_bytes(m1, "decode", 16, 1024, {})
    assert one["weights"] == pytest.approx(2 * m1.param_counts()["total"] + 4 * layers * d * e / 2, rel=1e-6)
    mem = cache_memory(m1)
    assert one["cache"] == 16 * 1024 * mem["per_token"] + 16 * mem["per_sequence"] + 16 * 1024 + 4
    assert got["weights"] < one["weights"] / 40  # non-expert weights are replicated over expert
    assert per_chip_bytes(m1, "train", 16, 1024, {"fsdp": 8})["cache"] == 0


def test_suggested_mesh_fits_and_keeps_weights_put(m1):
    topo = parse_topology("v5p-128")
    mesh, ranked = suggest_mesh(m1, topo, "decode", 128, 32768)
    assert "fsdp" not in mesh and mesh.get("tensor", 1) * mesh.get("expert", 1) * mesh.get("data", 1) == 64
    best, _, fits = ranked[0]
    assert fits and best.peak() <= topo.chip.hbm_bytes
    assert all("data" not in c and "fsdp" in c for c in candidate_meshes(m1, "train", 64))
    # 8 chips cannot hold bf16 M1 (≈ 114 GB of weights per chip): nothing fits, the smallest peak comes first
    _, ranked8 = suggest_mesh(m1, parse_topology("v5p-16"), "decode", 16, 1024)
    assert not any(fits for _, _, fits in ranked8)
    assert ranked8[0][0].peak() == min(e.peak() for e, _, _ in ranked8)


def test_gpu_host_plan_is_an_estimate(capsys):
    assert main(["plan", "--topology", "8xh200", "--model", "tiny", "--mode", "decode", "--batch", "8",
                 "--context", "512", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for field in ("compiled", "fits", "hbm_gb", "peak_gb_per_chip", "collective_bytes_per_step",
                  "expert_weight_gather_bytes", "compile_s"):
        assert field in p
    assert p["compiled"] is False and p["estimate"] is True and p["fits"] is True and p["hbm_gb"] == 141
    assert p["step_ms_estimate"] >= p["hbm_floor_ms"] > 0
    assert p["chips"] == 8 and p["suggested_mesh"] is not None


def test_plan_errors_are_one_line(capsys, monkeypatch):
    assert main(["plan", "--topology", "v5p-128", "--model", "tiny", "--mesh", "data=3", "--no-compile"]) == 2
    assert "has 3 chips; v5p-128 has 64" in capsys.readouterr().err
    assert main(["plan", "--topology", "v7x-9", "--no-compile"]) == 2
    assert "unknown topology" in capsys.readouterr().err
    if "remat" not in ModelConfig.__dataclass_fields__:
        assert main(["plan", "--topology", "8xh200", "--model", "tiny", "--remat", "full"]) == 2
        assert "no ModelConfig.remat" in capsys.readouterr().err
    # no libtpu anywhere: the message says how to get it
    monkeypatch.setattr(planmod, "compiler_env_ready", lambda: False)
    monkeypatch.setattr(planmod, "libtpu_available", lambda: False)
    monkeypatch.setattr(planmod, "tpu_python", lambda: None)
    assert main(["plan", "--topology", "v5p-8", "--model", "tiny"]) == 2
    assert "libtpu==0.0.42.1" in capsys.readouterr().err


@pytest.mark.tpu
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not importable in this environment "
                    "(pip install -e '.[tpu]' into its own venv and run the tests with it)")
def test_plan_compiles_deviceless_for_tpu():
    """The real M1 dimensions, 2 layers, one decode step compiled for v5p-8 (4 chips) by the TPU compiler."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-m", "m1jax", "plan", "--topology", "v5p-8", "--layers", "2",
                          "--mode", "decode", "--batch", "8", "--context", "2048", "--mesh", "tensor=2,expert=2",
                          "--lightning-impl", "xla", "--json"],
                         capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    p = json.loads(out.stdout)
    assert p["compiled"] is True and p["fits"] is True and p["compile_s"] > 0
    assert 0 < p["peak_gb_per_chip"] < p["hbm_gb"]
    assert p["code_gb"] > 0 and p["flops_per_chip"] > 0
    assert p["collective_bytes_per_step"] > 0  # tensor-parallel all-reduces at least
    assert p["step_ms_estimate"] > 0 and p["hbm_floor_ms"] > 0
    # FLOPs and bytes counted on the compiled step (loops × trip counts), every loop's trip count known
    assert p["loops_counted_once"] == [] and p["bytes_accessed_per_chip"] > 0
    assert p["bytes_accessed_all_memories_per_chip"] >= p["bytes_accessed_per_chip"]


def test_collectives_in_a_static_loop_count_per_iteration():
    """A tensor-parallel matmul inside a 10-step scan: its all-reduce runs 10 times per call; inside a loop with
    a data-dependent bound it counts once (per iteration of that loop)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m1jax import hlo_collectives
    from m1jax.sharding import make_mesh

    mesh = make_mesh({"tensor": 8})

    def scanned(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    def dynamic(w, x, n):
        return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w[0]), x)

    w = jax.ShapeDtypeStruct((10, 256, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "tensor", None)))
    x = jax.ShapeDtypeStruct((16, 256), jnp.float32, sharding=NamedSharding(mesh, P()))
    for f, args, count in [(scanned, (w, x), 10), (dynamic, (w, x, jax.ShapeDtypeStruct((), jnp.int32)), 1)]:
        hlo = jax.jit(f).lower(*args).compile().as_text()
        reduces = [c for c in hlo_collectives.collectives(hlo) if c.kind == "all-reduce"]
        assert reduces and all(c.count == count for c in reduces), [(c.name, c.count) for c in reduces]
        assert hlo_collectives.bytes_by_kind(hlo)["all-reduce"] == sum(c.count * c.bytes for c in reduces)
        # the TPU compiler's text has no known_trip_count: the bound is read from the loop condition
        bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", hlo)
        assert [c.count for c in hlo_collectives.collectives(bare) if c.kind == "all-reduce"] == \
            [c.count for c in reduces]


def test_expert_weight_gathers_are_told_apart_by_their_parameter():
    """An attention weight whose gathered shard has the shape of a piece of an expert stack (here [4, 8, 8] of
    [4, 8, 16]) is an expert-weight gather by shape alone, but not once its operand is traced to its parameter."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax import hlo_collectives
    from m1jax.plan import is_expert_weight
    from m1jax.sharding import make_mesh

    mesh = make_mesh({"fsdp": 8})
    params = {"block_sparse_moe": {"w1": jnp.ones((4, 8, 16))}, "self_attn": {"qkv_proj": jnp.ones((4, 8, 8))}}
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec(None, "fsdp")))

    def f(params, x):
        whole = NamedSharding(mesh, PartitionSpec())
        return sum(jnp.sum(x @ jax.lax.with_sharding_constraint(w, whole)[0]) for w in jax.tree.leaves(params))

    text = jax.jit(f).lower(params, jnp.ones((3, 8))).compile().as_text()
    shapes = [(4, 8, 16)]
    assert sorted(c.results[0][1] for c in hlo_collectives.all_gathers_of(text, shapes)) == [(4, 8, 8), (4, 8, 16)]
    assert [c.results[0][1] for c in hlo_collectives.all_gathers_of(text, shapes, parameter=is_expert_weight)] == [
        (4, 8, 16)]
    assert is_expert_weight("params[\\'stacked_layers\\'][0][\\'block_sparse_moe\\'][\\'w2\\'].value")
    assert not is_expert_weight("params['layers'][0]['block_sparse_moe']['gate'].value")


def test_train_plan_counts_fp32_masters_and_adamw_moments(capsys):
    """`--mode train` plans full fine-tuning: fp32 master weights (twice the bf16 inference weights, the router
    gates fp32 in both), two fp32 AdamW moments per weight; remat and micro-batches shrink the activation figure;
    bad values are one line."""
    common = ["plan", "--topology", "v5p-8", "--model", "tiny", "--mesh", "fsdp=2,expert=2", "--batch", "8",
              "--context", "256", "--no-compile", "--json"]
    assert main(common + ["--mode", "decode"]) == 0
    decode = json.loads(capsys.readouterr().out)
    plans = {}
    for name, extra in (("plain", []), ("remat", ["--remat", "full", "--scan", "on"]),
                        ("micro", ["--micro-batches", "4"])):
        assert main(common + ["--mode", "train", *extra]) == 0
        plans[name] = json.loads(capsys.readouterr().out)
    p = plans["plain"]
    assert 1.9 * decode["weights_gb_per_chip"] < p["weights_gb_per_chip"] < 2 * decode["weights_gb_per_chip"]
    assert p["optimizer_state_gb_per_chip"] == pytest.approx(2 * p["weights_gb_per_chip"])
    assert plans["remat"]["remat"] == "full"
    assert plans["remat"]["peak_gb_per_chip"] < p["peak_gb_per_chip"]
    assert plans["micro"]["peak_gb_per_chip"] < p["peak_gb_per_chip"] and plans["micro"]["micro_batches"] == 4
    assert main(common + ["--mode", "train", "--micro-batches", "3"]) == 2
    assert "--micro-batches" in capsys.readouterr().err


def _train_plan(capsys, *extra) -> dict:
    assert main(["plan", "--topology", "v5p-8", "--model", "tiny", "--mesh", "fsdp=2,expert=2", "--batch", "8",
                 "--context", "256", "--no-compile", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_lora_train_plan_has_no_master_copy_or_optimizer_state_of_the_base(capsys):
    """`--mode train --lora-rank`: the update step's arguments (`plan.train_state`, what the compile lowers) hold
    the base in its inference dtypes (bf16, router gates fp32) as `frozen` and only the adapters as fp32 masters;
    the AdamW moments cover the adapters alone; the plan's figures are those arguments' per-chip bytes."""
    import jax
    import numpy as np
    from m1jax.train.run_config import OptimizerSpec
    from m1jax.train.update import abstract_optimizer_state

    from m1jax.loading import abstract_model
    from m1jax.plan import PlanRequest, abstract_mesh, model_config, train_state

    mesh_shape = {"fsdp": 2, "expert": 2}
    req = PlanRequest(model="tiny", topology="v5p-8", mode="train", batch=8, context=256, mesh=mesh_shape,
                      lora_rank=4, compile=False)
    config = model_config(req)
    assert (config.lora_rank, config.lora_alpha, config.lora_targets) == (4, 8.0, ("attention", "experts"))
    st = train_state(config, abstract_mesh(mesh_shape))
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(st.masters)}
    assert names and all("_lora_" in n for n in names)
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(st.masters)} == {np.dtype("float32")}
    # the frozen base: exactly the inference model's parameters and dtypes (no fp32 copy of a bf16 weight)
    plain = abstract_model(model_config(PlanRequest(model="tiny", topology="v5p-8", mode="decode", batch=8,
                                                    context=256)))[1]
    frozen = jax.tree_util.tree_leaves_with_path(st.frozen)
    assert [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in frozen] == \
        [(jax.tree_util.keystr(p), x.shape, x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(plain)]
    assert sum(x.dtype == np.float32 for _, x in frozen) == config.num_hidden_layers  # the router gates only
    opt = abstract_optimizer_state(st.masters, OptimizerSpec(), 0)
    moments = [x for x in jax.tree.leaves(opt) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(st.masters))

    full = _train_plan(capsys, "--mode", "train")
    decode = _train_plan(capsys, "--mode", "decode")
    p = _train_plan(capsys, "--mode", "train", "--lora-rank", "4")
    assert p["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["attention", "experts"],
                         "adapter_params": sum(x.size for x in jax.tree.leaves(st.masters))}
    assert p["frozen_weights_gb_per_chip"] == decode["weights_gb_per_chip"]
    assert p["expert_weights_gb_per_chip"] == decode["expert_weights_gb_per_chip"]
    assert p["optimizer_state_gb_per_chip"] == pytest.approx(2 * p["master_weights_gb_per_chip"])
    assert p["weights_gb_per_chip"] == pytest.approx(p["frozen_weights_gb_per_chip"] + p["master_weights_gb_per_chip"])
    assert 0 < p["master_weights_gb_per_chip"] < 0.5 * full["master_weights_gb_per_chip"]
    assert full["frozen_weights_gb_per_chip"] == 0 and full["lora"] is None
    assert p["peak_gb_per_chip"] < full["peak_gb_per_chip"]
    # int8 experts under the adapters: the frozen expert stacks take half the bytes (the scales are not stacks)
    q = _train_plan(capsys, "--mode", "train", "--lora-rank", "4", "--quantize", "int8-experts")
    assert q["expert_weights_gb_per_chip"] == pytest.approx(0.5 * p["expert_weights_gb_per_chip"])
    assert q["frozen_weights_gb_per_chip"] < p["frozen_weights_gb_per_chip"]
    assert q["master_weights_gb_per_chip"] == p["master_weights_gb_per_chip"]
    assert "no master copy, no optimizer state" in format_plan_of(p)


def format_plan_of(p: dict) -> str:
    from m1jax.plan import format_plan

    return format_plan({**p, "compiled": False})


def test_lora_plan_errors_name_the_option(capsys):
    common = ["plan", "--topology", "v5p-8", "--model", "tiny", "--mode", "train", "--no-compile"]
    for extra, msg in [(["--quantize", "int8-experts"], "needs --lora-rank: int8 experts cannot be trained"),
                       (["--lora-alpha", "8"], "--lora-alpha and --lora-targets need --lora-rank"),
                       (["--lora-rank", "4", "--lora-targets", "attention,mlp"], "'lora_targets'"),
                       (["--lora-rank", "-2"], "'lora_rank': must be an integer ≥ 0"),
                       (["--lora-rank", "4", "--lora-alpha", "0"], "'lora_alpha': must be > 0")]:
        assert main(common + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra


def _compile_tiny_train_step(*extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-m", "m1jax", "plan", "--topology", "v5p-8", "--model", "tiny",
                          "--mode", "train", "--batch", "8", "--context", "256", "--mesh", "fsdp=2,expert=2",
                          *extra, "--json"], capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    p = json.loads(out.stdout)
    assert p["compiled"] is True and p["fits"] is True and p["temp_gb_per_chip"] > 0 and p["code_gb"] > 0
    return p


@pytest.mark.tpu
@pytest.mark.skipif(not libtpu_available(), reason="libtpu is not importable in this environment "
                    "(pip install -e '.[tpu]' into its own venv and run the tests with it)")
def test_lora_train_step_compiles_deviceless_for_tpu():
    """The trainer's LoRA update step (frozen bf16 base, or int8 experts, plus fp32 adapter masters and their
    AdamW moments) compiles for v5p-8 with the TPU compiler; its program arguments are a third of full
    fine-tuning's (fp32 masters + two moments of every weight: 12 bytes per parameter vs the base's 2, TPU tile
    padding of the small tiny-model shapes included)."""
    full = _compile_tiny_train_step()
    lora = _compile_tiny_train_step("--lora-rank", "4")
    int8 = _compile_tiny_train_step("--lora-rank", "4", "--quantize", "int8-experts")
    assert lora["lora"]["rank"] == int8["lora"]["rank"] == 4 and full["lora"] is None
    assert lora["argument_gb_per_chip"] < 0.4 * full["argument_gb_per_chip"]
    assert int8["argument_gb_per_chip"] < lora["argument_gb_per_chip"]
