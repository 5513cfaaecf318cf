"""The MoE feed-forward of MiniMax-M1 (spec §5): fp32 top-k router, SwiGLU experts, dropless dispatch.

    p      = softmax(x W_gate)                (fp32; W_gate stored fp32)
    w, e   = top_k(p);  w ← w / Σ w           (renormalised over the chosen k)
    y      = Σ_k w_k · (silu(x W1[e_k]) ⊙ x W3[e_k]) W2[e_k]

Expert computation (all exact and dropless; `moe_impl` picks one, "auto" by backend and size):
* "dense"  — every expert on every token, combined by the routing weights (the reference);
* "gather" — each (token, choice) pair multiplies its expert's gathered weights (tiny token counts on GPU/TPU);
* "switch" — each (token, choice) pair branches (`lax.switch`) on its expert id into that expert's SwiGLU
             (tiny token counts on CPU); with `unstack_experts` the weights are read where they lie, never
             copied;
* "ragged" — assignments sorted by expert + `jax.lax.ragged_dot` (GPU/TPU grouped GEMM kernels);
* "tiled"  — assignments sorted by expert, processed in row tiles, each tile one expert's GEMM (CPU, where
             `ragged_dot` lowers densely): FLOPs ≈ the true FLOPs plus at most one partial tile per expert.

With `config.quantize == "int8-experts"` the expert weights are int8 with per-output-channel scales
(`m1jax.quantize`); every implementation takes `scales=(s1, s3, s2)`, multiplies activations by the int8
weights as they are (mixed-dtype dots with `preferred_element_type`: the TPU compiler reads int8 in the
ragged-dot kernel, no bf16 copy of an expert stack) and rescales each product's output channels:
(x·q)·s = x·(q·s). Only the CPU switch casts the one expert it reads.

Under a mesh whose expert or tensor axis is > 1, `expert_parallel` runs the chosen implementation per shard
on that shard's experts (`moe_parallel="off"` leaves the whole computation to GSPMD instead).

A scanned model's expert weights may be held per layer group (`PerGroup`, `unstack_experts(over="groups")`):
group g's MoE then runs in branch g of a `lax.switch`, reading that group's arrays where they lie.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax import lora
from m1jax.config import ModelConfig
from m1jax.modules.unfused import dot_boundary, linear
from m1jax.quantize import dequantize_int8, scale_name, scaled
from m1jax.sharding import axes_size, current_mesh, logical_to_spec, spec_axes
from m1jax.weights import DTYPE, param, quantized_param

TILE_ROWS = 128
EXPERT_WEIGHTS = ("w1", "w3", "w2")  # in the argument order of the expert implementations
EXPERT_SCALES = tuple(scale_name(w) for w in EXPERT_WEIGHTS)  # their scales when int8 (`scales=`)


NO_EXPERT = -1  # a dropped choice in routed-experts arrays (logs, replay input)


def route(x_TxD: jax.Array, gate_DxE: jax.Array, k: int, *, threshold_T: jax.Array | None = None,
          experts_TxK: jax.Array | None = None):
    """Router: (probs `[T, E]` fp32, weights `[T, k]` fp32, expert ids `[T, k]` int32).

    Exact M1: the top-k of p = softmax(x·W_gate), weights w = p_top / Σ p_top.
    `threshold_T` (expert threshold τ per token): keep the smallest prefix of the top-k (in descending weight)
    whose weights w sum to ≥ τ — choice j is kept iff Σ_{i<j} w_i < τ, so the first always is, and τ ≥ 1 keeps
    all k (today's top-k, bit for bit) — and renormalise over the kept ones: w_j = p_j / Σ_kept p.
    `experts_TxK` (routing replay): use these expert ids instead of the top-k (`NO_EXPERT` = dropped), with
    weights p_e / Σ_given p recomputed from this router; a token with none given gets weight 0 everywhere.
    A dropped choice carries the id E (no expert: the sorted implementations leave it out of every group) and
    weight 0.
    """
    logits = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32), gate_DxE.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    e = probs.shape[1]
    keep_TxK = None
    if experts_TxK is None:
        top_w, top_e = jax.lax.top_k(probs, k)
        top_e = top_e.astype(jnp.int32)
        if threshold_T is not None:
            w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
            before_TxK = jnp.pad(jnp.cumsum(w[:, :-1], axis=-1), ((0, 0), (1, 0)))  # Σ_{i<j} w_i
            tau_Tx1 = threshold_T.astype(jnp.float32)[:, None]
            keep_TxK = (before_TxK < tau_Tx1) | (tau_Tx1 >= 1.0)
    else:
        keep_TxK = experts_TxK >= 0
        top_e = jnp.where(keep_TxK, experts_TxK, 0).astype(jnp.int32)
        top_w = jnp.take_along_axis(probs, top_e, axis=-1)
    if keep_TxK is None:
        return probs, top_w / jnp.sum(top_w, axis=-1, keepdims=True), top_e
    kept_w = jnp.where(keep_TxK, top_w, 0.0)
    total = jnp.sum(kept_w, axis=-1, keepdims=True)
    return probs, kept_w / jnp.where(total > 0, total, 1.0), jnp.where(keep_TxK, top_e, e)


def _scales(scales):
    return (None, None, None) if scales is None else scales


def _swiglu(x, w1, w3, w2, s1=None, s3=None, s2=None):
    dt = x.dtype
    h = (jax.nn.silu(scaled(jnp.matmul(x, w1, preferred_element_type=dt), s1))
         * scaled(jnp.matmul(x, w3, preferred_element_type=dt), s3))
    return scaled(jnp.matmul(h, w2, preferred_element_type=dt), s2)


def experts_dense(x_TxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_TxK, experts_TxK, *, scales=None):
    """Σ_e c[t, e]·FFN_e(x_t) over all experts, c = routing weights scattered to [T, E] (zeros elsewhere)."""
    s1, s3, s2 = _scales(scales)
    dt = x_TxD.dtype
    h = (jax.nn.silu(scaled(jnp.einsum("td,edf->tef", x_TxD, w1_ExDxF, preferred_element_type=dt), s1))
         * scaled(jnp.einsum("td,edf->tef", x_TxD, w3_ExDxF, preferred_element_type=dt), s3))
    out_TxExD = scaled(jnp.einsum("tef,efd->ted", h, w2_ExFxD, preferred_element_type=dt), s2)
    combine_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, w1_ExDxF.shape[0], dtype=weights_TxK.dtype)
                          * weights_TxK[..., None], axis=1)
    return jnp.einsum("te,ted->td", combine_TxE.astype(jnp.float32), out_TxExD.astype(jnp.float32))


def _combine(out_TxKxD, weights_TxK):
    return jnp.sum(out_TxKxD.astype(jnp.float32) * weights_TxK[..., None].astype(jnp.float32), axis=1)


def experts_gather(x_TxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_TxK, experts_TxK, *, scales=None):
    """Per (token, choice): FFN with the gathered weights W[e_tk] (reads only the chosen experts)."""
    dt = x_TxD.dtype
    s1, s3, s2 = (None if s is None else s[experts_TxK] for s in _scales(scales))
    w1, w3, w2 = (w[experts_TxK] for w in (w1_ExDxF, w3_ExDxF, w2_ExFxD))
    x_TxD, w1, w3, w2 = dot_boundary((x_TxD, w1, w3, w2))
    a, b = dot_boundary((jnp.einsum("td,tkdf->tkf", x_TxD, w1, preferred_element_type=dt),
                         jnp.einsum("td,tkdf->tkf", x_TxD, w3, preferred_element_type=dt)))
    h = dot_boundary(jax.nn.silu(scaled(a, s1)) * scaled(b, s3))
    return _combine(scaled(dot_boundary(jnp.einsum("tkf,tkfd->tkd", h, w2, preferred_element_type=dt)), s2),
                    weights_TxK)


def experts_switch(x_TxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_TxK, experts_TxK, *, scales=None):
    """Per (token, choice): y_tk = FFN_{e_tk}(x_t) by `lax.switch(e_tk, [FFN_0, …, FFN_{E−1}])`.

    The weights are stacked arrays `[E, …]` or tuples of E arrays (`unstack_experts`); branch e reads W[e].
    On CPU, gathering W[e_tk] writes a transposed copy of every chosen expert before the products; a branch
    reads a tuple element in place (a slice of a stacked array is still copied). Tokens are a loop
    (`lax.map`), so the program holds k switches whatever T is.
    """
    k = experts_TxK.shape[1]
    dt = x_TxD.dtype
    s1, s3, s2 = _scales(scales)

    def branch(e):
        def ffn(x_D):
            x_1xD = x_D[None]
            a = scaled(linear(x_1xD, w1_ExDxF[e].astype(dt)), None if s1 is None else s1[e])
            b = scaled(linear(x_1xD, w3_ExDxF[e].astype(dt)), None if s3 is None else s3[e])
            return scaled(linear(jax.nn.silu(a) * b, w2_ExFxD[e].astype(dt)), None if s2 is None else s2[e])[0]
        return ffn

    branches = [branch(e) for e in range(len(w1_ExDxF))]
    branches.append(lambda x_D: jnp.zeros_like(x_D, shape=(w2_ExFxD[0].shape[-1],)))  # id E: a dropped choice

    def token(args):
        x_D, e_K = args
        return jnp.stack([jax.lax.switch(e_K[j], branches, x_D) for j in range(k)])

    return _combine(jax.lax.map(token, (x_TxD, experts_TxK)), weights_TxK)


def _sort_assignments(experts_TxK, num_experts):
    """(order `[A]` sorting the assignments by expert id, group sizes `[E]`): an id ≥ E (a dropped choice) sorts
    last and counts in no group, so no GEMM row is spent on it."""
    flat_A = experts_TxK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    group_sizes_E = jnp.bincount(flat_A, length=num_experts).astype(jnp.int32)
    return order_A, group_sizes_E


def _unsort(out_sorted_AxD, order_A, sizes_E):
    """Sorted rows back in assignment order; rows past Σ sizes (dropped choices, never computed) are 0."""
    computed_A = jnp.arange(out_sorted_AxD.shape[0]) < jnp.sum(sizes_E)
    out_sorted_AxD = jnp.where(computed_A[:, None], out_sorted_AxD, 0)
    return jnp.zeros_like(out_sorted_AxD).at[order_A].set(out_sorted_AxD)


def _ragged_dot(x_AxK, w_ExKxN, sizes_E, preferred_element_type=None):
    """Grouped GEMM `jax.lax.ragged_dot` at HIGHEST precision for fp32 operands and an explicit DEFAULT otherwise:
    TPU's grouped-GEMM kernel rejects HIGHEST on bf16 operands (as Mosaic does), and an explicit precision keeps
    a global `jax_default_matmul_precision` from reaching it. int8 weights (exact in any float) with fp32
    activations take HIGHEST too (it compiles for TPU), so fp32 compute keeps fp32 activations."""
    fp32 = x_AxK.dtype == jnp.float32 and w_ExKxN.dtype in (jnp.float32, jnp.int8)
    precision = jax.lax.Precision.HIGHEST if fp32 else jax.lax.Precision.DEFAULT
    return jax.lax.ragged_dot(x_AxK, w_ExKxN, sizes_E, precision=precision,
                              preferred_element_type=preferred_element_type)


def experts_ragged(x_TxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_TxK, experts_TxK, *, scales=None):
    """Sort the T·k assignments by expert and run grouped GEMMs with `jax.lax.ragged_dot`."""
    t, k = experts_TxK.shape
    dt = x_TxD.dtype
    order_A, sizes_E = _sort_assignments(experts_TxK, w1_ExDxF.shape[0])
    s1, s3, s2 = (None if s is None else s[experts_TxK.reshape(-1)[order_A]] for s in _scales(scales))
    xs_AxD = x_TxD[order_A // k]

    def gemm(lhs, w, s):
        return scaled(_ragged_dot(lhs, w, sizes_E, preferred_element_type=dt), s)

    h = jax.nn.silu(gemm(xs_AxD, w1_ExDxF, s1)) * gemm(xs_AxD, w3_ExDxF, s3)
    out_AxD = _unsort(gemm(h, w2_ExFxD, s2), order_A, sizes_E)
    return _combine(out_AxD.reshape(t, k, -1), weights_TxK)


def tile_size(num_assignments: int, num_experts: int, tile_rows: int = TILE_ROWS) -> int:
    """Rows G per tile of `experts_tiled`: the least power of two ≥ A/E, clamped to [8, `tile_rows`]; the tiles it
    computes are Σ_e ⌈g_e / G⌉ over the group sizes g_e of the kept assignments."""
    return max(8, min(tile_rows, 1 << (max(num_assignments // num_experts, 1) - 1).bit_length()))


def experts_tiled(x_TxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_TxK, experts_TxK, *, scales=None,
                  tile_rows: int = TILE_ROWS, skip_idle: bool = True):
    """Sorted assignments in tiles of G rows; tile τ multiplies rows [r_τ, r_τ+G) by its expert's weights.

    Tiles are visited in expert order, so rows a tile computes past its expert's group are recomputed
    (overwritten) by the later tiles that own them. The tile count is static: ⌈A/G⌉ + E bounds Σ_e ⌈g_e/G⌉.
    The idle tiles beyond Σ_e ⌈g_e/G⌉ are skipped by a branch, or with `skip_idle=False` computed on zero
    padding (the branch's gradient inside `shard_map` crashes XLA:CPU in jax 0.10.2: `expert_parallel`).
    """
    t, k = experts_TxK.shape
    e = w1_ExDxF.shape[0]
    a = t * k
    g = tile_size(a, e, tile_rows)
    order_A, sizes_E = _sort_assignments(experts_TxK, e)
    xs = jnp.concatenate([x_TxD[order_A // k], jnp.zeros_like(x_TxD, shape=(g, x_TxD.shape[1]))], axis=0)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    tiles_E = (sizes_E + g - 1) // g
    tiles_end_E = jnp.cumsum(tiles_E)
    n_tiles = -(-a // g) + e
    tau = jnp.arange(n_tiles)
    expert_T = jnp.minimum(jnp.searchsorted(tiles_end_E, tau, side="right"), e - 1).astype(jnp.int32)
    active_T = tau < tiles_end_E[-1]
    row_T = starts_E[expert_T] + g * (tau - (tiles_end_E[expert_T] - tiles_E[expert_T]))
    row_T = jnp.where(active_T, row_T, a)

    s1, s3, s2 = _scales(scales)

    @jax.checkpoint
    def tile(x_GxD, ex):
        return _swiglu(x_GxD, w1_ExDxF[ex], w3_ExDxF[ex], w2_ExFxD[ex],
                       *(None if s is None else s[ex] for s in (s1, s3, s2)))

    def body(out, xs_tile):
        ex, row, active = xs_tile
        x_GxD = jax.lax.dynamic_slice_in_dim(xs, row, g, axis=0)
        if not skip_idle:  # an idle tile reads and writes the zero rows [A, A + G)
            return jax.lax.dynamic_update_slice_in_dim(out, tile(x_GxD, ex), row, axis=0), None
        y = jax.lax.cond(active, lambda: tile(x_GxD, ex), lambda: jnp.zeros_like(out, shape=(g, out.shape[1])))
        out = jax.lax.cond(active, lambda: jax.lax.dynamic_update_slice_in_dim(out, y, row, axis=0), lambda: out)
        return out, None

    out0 = jnp.zeros_like(x_TxD, shape=(a + g, w2_ExFxD.shape[2]))  # zeros_like: shard_map's varying axes
    out, _ = jax.lax.scan(body, out0, (expert_T, row_T, active_T))
    out_AxD = _unsort(out[:a], order_A, sizes_E)
    return _combine(out_AxD.reshape(t, k, -1), weights_TxK)


EXPERT_IMPLS = {"dense": experts_dense, "gather": experts_gather, "switch": experts_switch, "ragged": experts_ragged,
                "tiled": experts_tiled}


def choose_impl(impl: str, num_assignments: int, num_experts: int, platform: str | None = None) -> str:
    """"auto": on CPU switch up to 2·E assignments (bench-small decode: batch 8 = 16 assignments of 8 experts
    67 vs 102 ms per step with tiles; batch 16 on par), else tiles; on GPU/TPU gather up to E assignments,
    else ragged_dot. `platform` defaults to the default backend's."""
    if impl != "auto":
        return impl
    if (platform or jax.default_backend()) == "cpu":
        return "switch" if num_assignments <= 2 * num_experts else "tiled"
    return "gather" if num_assignments <= num_experts else "ragged"


def _compute_weight(v, dt, *, keep_tuple: bool):
    """An expert weight in the compute dtype `dt` (None: as stored — int8 weights and their scales, which the
    implementations cast where they read them); one held unstacked (a tuple, `unstack_experts`) stays a tuple
    for `experts_switch` and is stacked again for the other implementations."""
    def cast(x):
        return x if dt is None else x.astype(dt)

    if isinstance(v, tuple):
        return tuple(cast(x) for x in v) if keep_tuple else cast(jnp.stack(v))
    return cast(v)


# --- Expert parallelism ---------------------------------------------------------------------------------------

TOKEN_AXES = ("batch", "seq", None)  # the MoE's tokens [B, L, D]: split like the hidden states


def parallel_axes(mesh, x_shape, w1_shape) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(token axes, expert axes, tensor axes): the mesh axes the rules table shards the tokens `[B, L, D]`
    over (batch, then sequence), the expert weights' expert dimension over, and their `mlp` dimension over."""
    x_spec = logical_to_spec(TOKEN_AXES, x_shape, mesh)
    w_spec = logical_to_spec(("experts", "embed", "mlp"), w1_shape, mesh)
    return spec_axes(x_spec[0]) + spec_axes(x_spec[1]), spec_axes(w_spec[0]), spec_axes(w_spec[2])


def _platform(mesh) -> str:
    """The platform the mesh's devices belong to ("cpu", "tpu", "gpu"; deviceless TPU meshes say "tpu")."""
    device = getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis, platform):
    """`jax.lax.ragged_all_to_all` with one slice per device, on TPU/GPU; elsewhere (XLA:CPU has no ragged
    all-to-all) the same result by a dense `all_to_all` of every slice padded to the whole operand."""
    if platform in ("tpu", "gpu"):
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis)
    n, cap = send_sizes.shape[0], operand.shape[0]
    rows_C = jnp.arange(cap)
    sent_NxC = rows_C[None] < send_sizes[:, None]
    chunks = jnp.where(sent_NxC[..., None], operand[jnp.minimum(input_offsets[:, None] + rows_C, cap - 1)], 0)
    got = jax.lax.all_to_all(chunks.reshape(n * cap, -1), axis, 0, 0, tiled=True)
    at_N = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)  # where each source's slice goes here
    dest_NxC = jnp.where(rows_C[None] < recv_sizes[:, None], at_N[:, None] + rows_C, output.shape[0])
    return output.at[dest_NxC.reshape(-1)].set(got, mode="drop")


def _local_experts(x_RxD, local_R, valid_R, w1_LxDxF, w3_LxDxF, w2_LxFxD, *, scales, impl, platform):
    """y_r = FFN_{local_r}(x_r) by this shard's experts (int8 ones with their `scales`) for valid rows r, 0 for
    the others (which carry the id E_local: the sorted implementations skip it)."""
    r = x_RxD.shape[0]
    name = choose_impl(impl, r, w1_LxDxF.shape[0], platform)
    fn = functools.partial(experts_tiled, skip_idle=False) if name == "tiled" else EXPERT_IMPLS[name]
    y = fn(x_RxD, w1_LxDxF, w3_LxDxF, w2_LxFxD, jnp.ones((r, 1), x_RxD.dtype), local_R[:, None], scales=scales)
    return jnp.where(valid_R[:, None], y, 0).astype(x_RxD.dtype)


def _exchange_tokens(x_TxD, w1, w3, w2, weights_TxK, experts_TxK, *, scales, ep, tp, n_ep, impl, platform):
    """Per shard (tokens split over the expert axes): sort the assignments by expert, send each to its expert's
    shard (ragged all-to-all), run this shard's experts on what arrives, send the results back, combine.

    counts[s, e] (all-gathered) = assignments of source shard s to expert e; sent[s, j] = Σ_{e on j} counts[s, e].
    Shard j receives, from each source in turn, its rows already sorted by expert: its buffer is grouped by
    (source, local expert), big enough for the worst case n_ep · T · min(k, E_local) rows.
    """
    t, k = experts_TxK.shape
    d, e_loc = x_TxD.shape[1], w1.shape[0]
    me = jax.lax.axis_index(ep)
    flat_A = experts_TxK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    counts_NxE = jax.lax.all_gather(jnp.bincount(flat_A, length=n_ep * e_loc).astype(jnp.int32), ep)
    sent_NxN = counts_NxE.reshape(n_ep, n_ep, e_loc).sum(-1)
    send_N, recv_N = sent_NxN[me], sent_NxN[:, me]
    lands_NxN = _exclusive_cumsum(sent_NxN, 0)  # [s, j]: where s's rows start in j's buffer
    leaves_NxN = _exclusive_cumsum(sent_NxN, 1)  # [s, j]: where s's rows for j start in s's sorted assignments
    r = n_ep * t * min(k, e_loc)
    buf_RxD = _ragged_all_to_all(x_TxD[order_A // k], jnp.zeros_like(x_TxD, shape=(r, d)), leaves_NxN[me], send_N,
                                 lands_NxN[me], recv_N, axis=ep, platform=platform)
    ends = jnp.cumsum(jax.lax.dynamic_slice_in_dim(counts_NxE, me * e_loc, e_loc, axis=1).reshape(-1))
    rows_R = jnp.arange(r)
    valid_R = rows_R < ends[-1]
    local_R = jnp.where(valid_R, jnp.searchsorted(ends, rows_R, side="right") % e_loc, e_loc).astype(jnp.int32)
    y_RxD = _local_experts(buf_RxD, local_R, valid_R, w1, w3, w2, scales=scales, impl=impl, platform=platform)
    y_sorted = _ragged_all_to_all(y_RxD, jnp.zeros_like(y_RxD, shape=(t * k, d)), lands_NxN[:, me], recv_N,
                                  leaves_NxN[:, me], send_N, axis=ep, platform=platform)
    y_AxD = jnp.zeros_like(y_sorted).at[order_A].set(y_sorted)
    y_TxD = _combine(y_AxD.reshape(t, k, d), weights_TxK)
    return jax.lax.psum(y_TxD, tp) if tp else y_TxD


def _replicated_tokens(x_TxD, w1, w3, w2, weights_TxK, experts_TxK, *, scales, ep, tp, gather, impl, platform):
    """Per shard (tokens the same on every expert shard, or made so by all-gathering them over `gather`): run
    this shard's experts on the assignments routed to them, sum the partial outputs over the shards (psum;
    psum_scatter back to the token shards over `gather`)."""
    if gather:
        x_TxD, weights_TxK, experts_TxK = (jax.lax.all_gather(a, gather, axis=0, tiled=True)
                                           for a in (x_TxD, weights_TxK, experts_TxK))
    t, k = experts_TxK.shape
    e_loc = w1.shape[0]
    local_A = experts_TxK.reshape(-1) - (jax.lax.axis_index(ep) * e_loc if ep else 0)
    mine_A = (local_A >= 0) & (local_A < e_loc)
    y_AxD = _local_experts(jnp.repeat(x_TxD, k, axis=0), jnp.where(mine_A, local_A, e_loc), mine_A, w1, w3, w2,
                           scales=scales, impl=impl, platform=platform)
    y_TxD = _combine(y_AxD.reshape(t, k, -1), weights_TxK)
    rest = tuple(a for a in ep + tp if a not in gather)
    y_TxD = jax.lax.psum(y_TxD, rest) if rest else y_TxD
    return jax.lax.psum_scatter(y_TxD, gather, scatter_dimension=0, tiled=True) if gather else y_TxD


def expert_parallel(x_BxLxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_BxLxK, experts_BxLxK, *, scales=None,
                    impl: str = "auto", mesh=None) -> jax.Array:
    """Σ_k w_k · FFN_{e_k}(x) (fp32) computed in `jax.shard_map` over `mesh` (default: the active one), with
    tokens, expert weights and `mlp` split as the rules table says (batch and seq, experts, mlp): no expert
    weight moves.

    Tokens split (by batch or sequence) over every expert axis are exchanged (`_exchange_tokens`: each
    assignment travels to its expert's shard and back); otherwise (decode, a batch the axes do not divide)
    every expert shard sees the tokens and adds its experts' share (`_replicated_tokens`). `mlp`-split experts
    give partial sums, summed over the tensor axes. Each shard runs `impl` ("auto" by the mesh's platform) on
    its own experts only (int8 ones with their per-channel `scales`, split like the weights' output channels).
    """
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("expert_parallel needs a mesh: pass mesh= or call it under jax.set_mesh")
    tok, ep, tp = parallel_axes(mesh, x_BxLxD.shape, w1_ExDxF.shape)
    if set(tok) & set(tp):
        raise ValueError(f"the rules table splits tokens over tensor axes {sorted(set(tok) & set(tp))}, which also "
                         "split the experts' mlp dimension: the MoE needs every token on every tensor shard")
    n_ep = axes_size(mesh, ep)
    platform = _platform(mesh)
    if ep and set(ep) <= set(tok):
        body = functools.partial(_exchange_tokens, ep=ep, tp=tp, n_ep=n_ep, impl=impl, platform=platform)
    else:
        body = functools.partial(_replicated_tokens, ep=ep, tp=tp, gather=tuple(a for a in ep if a in tok),
                                 impl=impl, platform=platform)

    def per_shard(x_BxLxD, w1, w3, w2, weights_BxLxK, experts_BxLxK, *scales):
        b, l, d = x_BxLxD.shape
        k = experts_BxLxK.shape[-1]
        # computed with weights that differ per expert/tensor shard, the activations differ too (shard_map's check)
        x_BxLxD = jax.lax.pcast(x_BxLxD, tuple(a for a in ep + tp if a not in tok), to="varying")
        y_TxD = body(x_BxLxD.reshape(b * l, d), w1, w3, w2, weights_BxLxK.reshape(b * l, k),
                     experts_BxLxK.reshape(b * l, k), scales=scales or None)
        return y_TxD.reshape(b, l, d)

    x_spec = logical_to_spec(TOKEN_AXES, x_BxLxD.shape, mesh)
    tokens = P(x_spec[0], x_spec[1], None)  # a shard's tokens are its batch rows × its sequence part
    w_in, w_out = P(ep or None, None, tp or None), P(ep or None, tp or None, None)
    scale_specs = () if scales is None else (P(ep or None, tp or None), P(ep or None, tp or None), P(ep or None, None))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens, w_in, w_in, w_out, tokens, tokens, *scale_specs),
                         out_specs=tokens)(x_BxLxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, weights_BxLxK, experts_BxLxK,
                                           *(scales or ()))


class MoE(nnx.Module):
    """Sparse MoE block: router `gate` [D, E] (fp32), experts `w1`/`w3` [E, D, F] (gate/up), `w2` [E, F, D];
    int8 experts (`config.quantize`) add their per-output-channel scales `w1_scale`/`w3_scale` [E, F] and
    `w2_scale` [E, D] (fp32)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, e, f = config.hidden_size, config.num_local_experts, config.intermediate_size
        pdt, std = config.param_dtype, config.initializer_range
        self.config = config
        self.gate = param(rngs, (d, e), ("embed", "router_experts"), "float32", std=std)
        for name, shape, axes in (("w1", (e, d, f), ("experts", "embed", "mlp")),
                                  ("w3", (e, d, f), ("experts", "embed", "mlp")),
                                  ("w2", (e, f, d), ("experts", "mlp", "embed"))):
            if config.quantize is None:
                setattr(self, name, param(rngs, shape, axes, pdt, std=std))
            else:
                q, scale = quantized_param(rngs, shape, axes, std=std)
                setattr(self, name, q)
                setattr(self, scale_name(name), scale)
        for name, shape, axes in (("w1", (e, d, f), ("experts", "embed", "mlp")),
                                  ("w3", (e, d, f), ("experts", "embed", "mlp")),
                                  ("w2", (e, f, d), ("experts", "mlp", "embed"))):
            lora.declare(self, name, shape, axes, config, rngs)

    def __call__(self, x_BxLxD: jax.Array, *, valid_BxL: jax.Array | None = None, impl: str | None = None,
                 threshold_BxL: jax.Array | None = None, experts_BxLxK: jax.Array | None = None,
                 group: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (y `[B, L, D]` in the compute dtype, routing statistics over valid tokens: `routing_stats`).

        `threshold_BxL`: the expert threshold of each token (see `route`; None = exact top-k);
        `experts_BxLxK`: routing replay, the expert ids to use instead of the router's top-k (`NO_EXPERT` for
        a dropped choice). Dropped choices cost no expert FLOPs in the sorted and expert-parallel paths.
        `group`: a scanned layer group's index, which selects the expert weights when they are held per group
        (`PerGroup`, `unstack_experts(..., over="groups")`).
        """
        c = self.config
        dt = DTYPE[c.dtype]
        b, l, d = x_BxLxD.shape
        k = c.num_experts_per_tok if experts_BxLxK is None else experts_BxLxK.shape[-1]
        x_TxD = x_BxLxD.reshape(b * l, d).astype(dt)
        probs_TxE, weights_TxK, experts_TxK = route(
            x_TxD, self.gate[...], k, threshold_T=None if threshold_BxL is None else threshold_BxL.reshape(-1),
            experts_TxK=None if experts_BxLxK is None else experts_BxLxK.reshape(b * l, k))
        stats = routing_stats(probs_TxE, experts_TxK, None if valid_BxL is None else valid_BxL.reshape(-1),
                              flops_per_assignment=expert_flops_per_assignment(c))
        stats["routed_experts"] = stats["routed_experts"].reshape(b, l, k)
        if valid_BxL is not None:  # padding (and finished decode rows) run no expert: its output is never read
            valid_Tx1 = valid_BxL.reshape(-1, 1)
            experts_TxK = jnp.where(valid_Tx1, experts_TxK, c.num_local_experts)
            weights_TxK = jnp.where(valid_Tx1, weights_TxK, 0.0)
        impl = impl or c.moe_impl
        mesh = current_mesh()
        w_shape = (c.num_local_experts, d, c.intermediate_size)
        parallel = c.moe_parallel == "auto" and mesh is not None and any(parallel_axes(mesh, (b, l, d), w_shape)[1:])
        name = None if parallel else choose_impl(impl, experts_TxK.size, c.num_local_experts)
        keep = name == "switch"
        quantized = c.quantize is not None
        names = EXPERT_WEIGHTS + (EXPERT_SCALES if quantized else ())
        held = [getattr(self, n).get_value() for n in names]

        def experts(held):  # y [B, L, D] from the expert weights (and scales) as `held`
            if lora.has_adapters(self, "w1"):  # W + (α/r)·A B per expert (int8 experts dequantized first)
                stored = [_compute_weight(x, None, keep_tuple=False) for x in held[:3]]
                if quantized:
                    stored = [dequantize_int8(x, _compute_weight(s, None, keep_tuple=False), dt)
                              for x, s in zip(stored, held[3:])]
                ws = [lora.weight(self, w, x).astype(dt) for w, x in zip(EXPERT_WEIGHTS, stored)]
                scales = None
            else:
                ws = [_compute_weight(x, None if quantized else dt, keep_tuple=keep) for x in held[:3]]
                scales = tuple(_compute_weight(x, None, keep_tuple=keep) for x in held[3:]) if quantized else None
            if parallel:
                return expert_parallel(x_TxD.reshape(b, l, d), *ws, weights_TxK.astype(dt).reshape(b, l, k),
                                       experts_TxK.reshape(b, l, k), scales=scales, impl=impl, mesh=mesh).astype(dt)
            y_TxD = EXPERT_IMPLS[name](x_TxD, *ws, weights_TxK.astype(dt), experts_TxK, scales=scales)
            return y_TxD.astype(dt).reshape(b, l, d)

        if not isinstance(held[0], PerGroup):
            return experts(held), stats
        if group is None:
            raise ValueError("MoE: expert weights held per layer group (PerGroup) need the scanned group index")
        # one branch per group, each reading its group's arrays where they lie (no slice of a stack is copied)
        branches = [functools.partial(experts, [x.arrays[i] for x in held]) for i in range(len(held[0].arrays))]
        return jax.lax.switch(group, branches), stats


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PerGroup:
    """A scanned model's expert weight (or scale) held as one array per layer group: `arrays[g]` is group g's
    `[E, …]` (`unstack_experts(params, over="groups")`). The scan does not slice it; the MoE of group g selects
    `arrays[g]` with `lax.switch`, so the grouped GEMM reads it where it lies."""

    arrays: tuple

    def tree_flatten(self):
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(tuple(children))


def unstack_experts(params: nnx.State, over: str = "experts", take=None) -> nnx.State:
    """`params` (from `nnx.split(model)`) with every MoE expert weight (and int8 scale) split into its pieces:
    `over="experts"`: `[E, …]` → a tuple of E arrays; `over="groups"` (a scanned model's stacked `[G, E, …]`;
    others unchanged) → `PerGroup` of G arrays `[E, …]`. `take(x, index)` makes a piece (default `x[index]`;
    e.g. abstract arrays with their sharding). Both are a second copy of the expert weights in memory.

    "experts" is for decoding on CPU: XLA:CPU copies a slice of a stacked array before multiplying it
    (`experts_switch` then writes and re-reads each chosen expert, ≈ 0.15 ms per 2 MB matrix here), but reads
    a tuple element where it lies. "groups" is for a scanned model's decode on TPU/GPU: the grouped-GEMM kernel
    takes its weights as a whole buffer, so the scan's slice of a stacked weight would be copied every step.
    """
    from m1jax.layer_stack import is_stacked

    if over not in ("experts", "groups"):
        raise ValueError(f"unstack_experts: over must be 'experts' or 'groups', got {over!r}")
    take = take or (lambda x, index: x[index])

    def split(path, v):
        if over == "groups":
            return PerGroup(tuple(take(v, g) for g in range(v.shape[0]))) if is_stacked(path) else v
        axis = int(is_stacked(path))  # the expert axis follows a scanned model's group axis
        return tuple(take(v, (slice(None),) * axis + (e,)) for e in range(v.shape[axis]))

    return jax.tree_util.tree_map_with_path(lambda path, v: split(path, v) if _is_expert_weight(path) else v, params)


def expert_weight_bytes(params: nnx.State) -> int:
    """Bytes of the MoE expert weights (`w1`, `w3`, `w2` of every layer, and their scales if int8) in `params`."""
    return sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params) if _is_expert_weight(path))


def _is_expert_weight(path) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return len(names) >= 3 and names[-3] == "block_sparse_moe" and names[-2] in EXPERT_WEIGHTS + EXPERT_SCALES


def expert_flops_per_assignment(config: ModelConfig) -> int:
    """FLOPs of one (token, expert) assignment: the three D×F SwiGLU products, 2·3·D·F."""
    return 6 * config.hidden_size * config.intermediate_size


def routing_stats(probs_TxE, experts_TxK, valid_T=None, *, flops_per_assignment: int = 0,
                  num_experts: int | None = None) -> dict[str, jax.Array]:
    """The routing log of one MoE layer, over valid tokens only (`experts_TxK` as `route` returns them: id E for
    a dropped choice, or `NO_EXPERT`):

    tokens_per_expert `[E]` (kept assignments; Σ = kept assignments), num_tokens, experts_used_frac `[k]`
    (fraction of tokens that used j + 1 experts; Σ = 1), expert_flops (kept assignments × `flops_per_assignment`),
    expert_flops_saved (dropped assignments × the same), routed_experts `[T, k]` int32 (the expert of each
    choice, `NO_EXPERT` where dropped; padding included), and with the router probabilities `probs_TxE` (None:
    routing recorded earlier, E = `num_experts`) mean_prob `[E]` and the Switch load-balancing loss
    aux = E · Σ_e (tokens_e / T) · mean_prob_e.
    """
    e = probs_TxE.shape[1] if probs_TxE is not None else num_experts
    t, k = experts_TxK.shape
    w_T = jnp.ones(t, jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w_T), 1.0)
    kept_TxK = (experts_TxK >= 0) & (experts_TxK < e)
    tokens_E = jnp.sum(jax.nn.one_hot(experts_TxK, e, dtype=jnp.float32) * w_T[:, None, None], axis=(0, 1))
    used_T = jnp.sum(kept_TxK, axis=1)
    used_K = jnp.sum(jax.nn.one_hot(used_T - 1, k, dtype=jnp.float32) * w_T[:, None], axis=0) / n
    kept = jnp.sum(kept_TxK * w_T[:, None])
    stats = {"tokens_per_expert": tokens_E, "num_tokens": jnp.sum(w_T), "experts_used_frac": used_K,
             "expert_flops": kept * float(flops_per_assignment),
             "expert_flops_saved": (jnp.sum(w_T) * k - kept) * float(flops_per_assignment),
             "routed_experts": jnp.where(kept_TxK, experts_TxK, NO_EXPERT).astype(jnp.int32)}
    if probs_TxE is not None:
        mean_prob_E = jnp.sum(probs_TxE * w_T[:, None], axis=0) / n
        stats.update(mean_prob=mean_prob_E, aux_loss=e * jnp.sum(tokens_E / n * mean_prob_E))
    return stats


def routing_log(routed_TxNxK, config: ModelConfig) -> dict:
    """The routing log of recorded routing (`[tokens, layers, k]`, `NO_EXPERT` = dropped; e.g. one request's
    tokens): per layer the `routing_stats` counts (tokens_per_expert, experts_used_frac, expert_flops,
    expert_flops_saved) as plain Python numbers and lists, plus the totals over layers — JSON-ready."""
    routed = np.asarray(routed_TxNxK, np.int32)
    t, _, k = routed.shape
    flops = expert_flops_per_assignment(config)
    layers = []
    for i in range(routed.shape[1]):
        s = routing_stats(None, jnp.asarray(routed[:, i]), num_experts=config.num_local_experts)
        tokens_E = [int(x) for x in np.asarray(s["tokens_per_expert"])]
        kept = sum(tokens_E)  # FLOPs from the integer counts (exact, unlike an fp32 product)
        layers.append({"tokens_per_expert": tokens_E,
                       "experts_used_frac": [float(x) for x in np.asarray(s["experts_used_frac"])],
                       "expert_flops": kept * flops, "expert_flops_saved": (t * k - kept) * flops})
    return {"tokens": int(routed.shape[0]), "layers": layers,
            "expert_flops": sum(x["expert_flops"] for x in layers),
            "expert_flops_saved": sum(x["expert_flops_saved"] for x in layers)}
