"""Costs per instruction of compiled HLO (`m1jax.hlo_collectives.instruction_costs`): the counting rules on a
hand-written module, and on a compiled scanned model that loop bodies count times their trip counts (XLA's
`cost_analysis()` counts them once)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from tpu_helpers import run_deviceless

from m1jax import hlo_collectives
from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.topology import libtpu_available

STATE = "(s32[], f32[10,256], f32[1,256])"
KERNEL = '{"cost_estimate":{"flops":"5000","transcendentals":"0","bytes_accessed":"777"}}'
MODULE = f"""HloModule m

%fused_row (param_0: f32[10,256], param_1: s32[]) -> f32[1,256] {{
  %param_0 = f32[10,256]{{1,0}} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = f32[1,256]{{1,0}} dynamic-slice(%param_0, %param_1, %c0), dynamic_slice_sizes={{1,256}}
}}

%fused_put (param_0: f32[10,256], param_1: f32[1,256], param_2: s32[]) -> f32[10,256] {{
  %param_0 = f32[10,256]{{1,0}} parameter(0)
  %param_1 = f32[1,256]{{1,0}} parameter(1)
  %param_2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = f32[10,256]{{1,0}} dynamic-update-slice(%param_0, %param_1, %param_2, %c0)
}}

%body (p: {STATE}) -> {STATE} {{
  %p = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %buf = f32[10,256]{{1,0}} get-tuple-element(%p), index=1
  %x = f32[1,256]{{1,0:S(1)}} get-tuple-element(%p), index=2
  %row = f32[1,256]{{1,0}} fusion(%buf, %i), kind=kLoop, calls=%fused_row
  %y = f32[1,256]{{1,0}} add(%row, %x), metadata={{op_name="jit(f)/add"}}
  %new = f32[10,256]{{1,0}} fusion(%buf, %y, %i), kind=kLoop, calls=%fused_put
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = {STATE} tuple(%next, %new, %x)
}}

%cond (p: {STATE}) -> pred[] {{
  %p = {STATE} parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}}

%small (q: f32[10,256]) -> f32[10,256] {{
  %q = f32[10,256]{{1,0}} parameter(0)
  ROOT %neg = f32[10,256]{{1,0}} negate(%q)
}}

%large (q: f32[10,256]) -> f32[10,256] {{
  %q = f32[10,256]{{1,0}} parameter(0)
  %e = f32[10,256]{{1,0}} exponential(%q)
  ROOT %m = f32[10,256]{{1,0}} multiply(%e, %q)
}}

ENTRY %main (a: f32[10,256], x: f32[1,256], b: pred[]) -> f32[10,256] {{
  %a = f32[10,256]{{1,0}} parameter(0)
  %x = f32[1,256]{{1,0:S(1)}} parameter(1)
  %b = pred[] parameter(2)
  %z = s32[] constant(0)
  %t = {STATE} tuple(%z, %a, %x)
  %w = {STATE} while(%t), condition=%cond, body=%body
  %out = f32[10,256]{{1,0}} get-tuple-element(%w), index=1
  %k = f32[10,256]{{1,0}} custom-call(%out), custom_call_target="tpu_custom_call", backend_config={KERNEL}
  ROOT %c = f32[10,256]{{1,0}} conditional(%b, %k, %k), branch_computations={{%small, %large}}
}}
"""
ROW, BUF = 256 * 4, 10 * 256 * 4


def test_counting_rules_on_a_hand_written_module():
    """Sliced fusion operands count their slice, an in-place dynamic-update-slice only its update, arrays in
    on-chip memory (S(1)) are not HBM bytes, a Mosaic kernel its own estimate, a loop body × its trip count, a
    conditional its costliest branch."""
    costs = {c.name: c for c in hlo_collectives.instruction_costs(MODULE)}
    row, y, new, nxt = (costs[n] for n in ("row", "y", "new", "next"))
    assert (row.bytes, row.hbm_bytes, row.count) == (2 * ROW + 4, 2 * ROW + 4, 10)
    assert (y.bytes, y.hbm_bytes, y.flops, y.source) == (3 * ROW, 2 * ROW, 256, "jit(f)/add")
    assert (new.bytes, new.count) == (ROW + 4 + ROW, 10)  # the buffer is neither read nor rewritten
    assert costs["w"].trips == 10 and costs["w"].loops == () and row.loops == ("w",)
    assert (costs["k"].bytes, costs["k"].flops) == (777, 5000)
    assert "neg" not in costs and costs["m"].flops == 10 * 256 and costs["e"].bytes == 2 * BUF
    assert costs["t"].bytes == costs["out"].bytes == 0  # tuples and views move nothing
    total = hlo_collectives.program_cost(MODULE)
    body = 2 * ROW + 4 + 3 * ROW + 2 * ROW + 4 + 12 + 9  # row, y, new, next; the condition's compare
    assert total["bytes accessed"] == 10 * body + 777 + 5 * BUF  # the loop, the kernel, the costlier branch
    assert total["hbm bytes"] == total["bytes accessed"] - 10 * ROW
    assert total["flops"] == 10 * (256 + 1 + 1) + 5000 + 2 * 10 * 256
    once = hlo_collectives.program_cost(MODULE, loops=False)
    assert once["bytes accessed"] == body + 777 + 5 * BUF


def test_loop_with_a_data_dependent_bound_counts_once_unless_named():
    text = MODULE.replace("%n = s32[] constant(10)", "%n = s32[] get-tuple-element(%p), index=0")
    text = text.replace("body=%body", 'body=%body, metadata={op_name="jit(f)/blocks/while"}')
    assert {c.name: c for c in hlo_collectives.instruction_costs(text)}["w"].trips is None
    assert {c.name: c.count for c in hlo_collectives.instruction_costs(text)}["row"] == 1
    named = {c.name: c for c in hlo_collectives.instruction_costs(text, trips={"blocks": 7})}
    assert named["row"].count == 7 and named["w"].trips == 7


def _scanned_forward_hlo(groups: int) -> tuple[str, dict]:
    types = ("linear_attention", "linear_attention", "full_attention") * groups
    config = ModelConfig.from_preset("tiny-hf").replace(num_hidden_layers=len(types), layer_types=types,
                                                        block_size=8, hf_source_json="{}", scan_layers=True)
    assert config.scan_groups == groups
    graphdef, state = nnx.split(MiniMaxM1(config, rngs=nnx.Rngs(0)))
    compiled = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).logits).lower(
        state, jnp.zeros((2, 16), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    return compiled.as_text(), cost[0] if isinstance(cost, list) else cost


@pytest.mark.slow  # compiles a scanned and an unrolled model (~18 s)
def test_scanned_groups_count_times_their_number():
    """A tiny model scanned over G groups of (2 lightning + 1 softmax) layers, forward compiled on CPU: each
    added group adds the same FLOPs and bytes (one group's), while XLA's cost analysis stays at one group's;
    counting loop bodies once reproduces that cost analysis."""
    runs = {g: _scanned_forward_hlo(g) for g in (1, 2, 3)}
    costs = {g: hlo_collectives.program_cost(hlo) for g, (hlo, _) in runs.items()}
    for key, tol in (("flops", 1e-3), ("bytes accessed", 0.2)):
        step, next_step = costs[2][key] - costs[1][key], costs[3][key] - costs[2][key]
        assert step > 0 and abs(next_step - step) <= tol * step, (key, step, next_step)
    assert runs[3][1]["flops"] == pytest.approx(runs[2][1]["flops"], rel=1e-6)  # the compiler: one group
    assert costs[3]["flops"] > 2.5 * runs[3][1]["flops"]
    for g, (hlo, compiler) in runs.items():
        once = hlo_collectives.program_cost(hlo, loops=False)
        assert once["flops"] == pytest.approx(compiler["flops"], rel=0.02)
        assert once["bytes accessed"] == pytest.approx(compiler["bytes accessed"], rel=0.1)


def test_costliest_groups_by_operation_and_ranks():
    costs = hlo_collectives.instruction_costs(MODULE)
    top = hlo_collectives.costliest(costs, 2)
    assert [(r["op"], r["source"]) for r in top] == [("fusion", ""), ("multiply", "")]  # the 2 fusions as one
    assert (top[0]["instructions"], top[0]["executions"], top[0]["hbm_bytes"]) == (2, 20, 20 * (2 * ROW + 4))
    assert top[1]["hbm_bytes"] == 3 * BUF and top[1]["executions"] == 1
    by_flops = hlo_collectives.costliest(costs, 1, "flops")[0]
    assert (by_flops["op"], by_flops["flops"]) == ("custom-call", 5000)
    add = next(r for r in hlo_collectives.costliest(costs, 50) if r["source"] == "jit(f)/add")
    assert (add["instructions"], add["executions"], add["bytes"]) == (1, 10, 10 * 3 * ROW)
    with pytest.raises(ValueError, match="key must be"):
        hlo_collectives.costliest(costs, 1, "time")


MATVEC_SCRIPT = """
import json
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from m1jax import hlo_collectives
from m1jax.topology import parse_topology, topology_devices
s = NamedSharding(Mesh(topology_devices(parse_topology("v5p-8"))[:1], ("x",)), P())
w, x = (jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=s) for shape in ((4096, 4096), (8, 4096)))
compiled = jax.jit(lambda w, x: x @ w).lower(w, x).compile()
hlo = compiled.as_text()
print(json.dumps({"compiler": compiled.cost_analysis()["bytes accessed"], "counted": hlo_collectives.program_cost(hlo),
                  "prefetched": " copy-start(" in hlo and "S(1)" in hlo}))
"""


@pytest.mark.tpu
@pytest.mark.skipif(not libtpu_available(), reason="deviceless TPU compilation needs libtpu (m1jax.topology)")
def test_tpu_cost_analysis_counts_a_prefetched_weight_several_times():
    """A matrix-vector product compiled for one v5p chip: the compiler prefetches the 32 MiB weight into on-chip
    memory (copy-start/copy-done into memory space S(1)) and its `cost_analysis()` counts ≈ 5× the weight's
    bytes; read from HBM is the weight once, which is what `program_cost`'s "hbm bytes" counts."""
    r = run_deviceless(MATVEC_SCRIPT)
    weight = 4096 * 4096 * 2
    assert r["prefetched"] and r["compiler"] > 4 * weight
    assert weight <= r["counted"]["hbm bytes"] < 1.02 * weight
    assert r["counted"]["bytes accessed"] > 2 * weight  # every memory space: the on-chip copy too


def test_collectives_of_alternative_branches_count_once():
    """An all-reduce in each branch of a `lax.switch` (one runs per call) counts once, not once per branch."""
    from jax.sharding import PartitionSpec as P

    from m1jax.sharding import make_mesh

    mesh = make_mesh({"tensor": 8})

    def f(i, x):
        branches = [lambda x, s=s: jax.lax.psum(x * s, "tensor") for s in (1.0, 2.0, 3.0)]
        return jax.shard_map(lambda i, x: jax.lax.switch(i, branches, x), mesh=mesh, in_specs=(P(), P("tensor")),
                             out_specs=P())(i, x)

    hlo = jax.jit(f).lower(jnp.int32(0), jnp.ones((8, 64))).compile().as_text()
    reduces = [c for c in hlo_collectives.collectives(hlo) if c.kind == "all-reduce"]
    assert len(reduces) == 1 and hlo_collectives.bytes_by_kind(hlo)["all-reduce"] == 64 * 4
