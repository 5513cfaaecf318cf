"""The lightning-attention token mixer of MiniMax-M1 (spec §3), reaching the kernels through one interface.

    q, k, v = silu(x W_qkv) split per head (per-head interleaved [q | k | v] layout of `qkv_proj`)
    o       = LightningAttention(q, k, v; λ_h = exp(−s_h)),   s_h = alibi_h · (1 − l/(L−1) + 1e-5)
    y       = (RMSNorm_{H·D}(o) ⊙ sigmoid(x W_gate)) W_out

Under a mesh that splits the sequence (`sharding.RULES["seq"]`), a prefill runs per sequence shard and the
shards exchange only their D×D states (`sequence_sharded_lightning`); decode is per sequence and unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax import lora
from m1jax.cache import STATE_AXES
from m1jax.config import ModelConfig
from m1jax.modules.norm import rms_norm
from m1jax.modules.unfused import linear
from m1jax.pallas_kernels import lightning_attention, lightning_decode
from m1jax.pallas_kernels.lightning import resolve_impl
from m1jax.sharding import axes_size, current_mesh, logical_to_spec, spec_axes
from m1jax.weights import DTYPE, param


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi base slopes: 2^(−8(i+1)/n) for a power-of-two n, else the interleave rule (RC `_build_slope_tensor`)."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return pow2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def layer_slopes(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    """Per-head decay rates s of global layer l: fp32(alibi) · (1 − l/(L−1) + 1e-5), computed in fp32 like RC."""
    factor = 1 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1 + 1e-5
    return np.asarray(alibi_slopes(num_heads), dtype=np.float32) * np.float32(factor)


def per_shard(fn, impl: str, *args_and_axes):
    """`fn(*arrays)` — under an active mesh with the Pallas implementation, run per shard with `jax.shard_map`
    (sharded over batch and heads by the rules table), since XLA cannot partition a Pallas call. Each argument
    is `(array or None, logical axes)`; outputs are (out, state) with the axes of the first argument and of
    the state."""
    mesh = jax.sharding.get_abstract_mesh()
    arrays = [a for a, _ in args_and_axes]
    if mesh is None or mesh.empty or resolve_impl(impl) != "pallas":
        return fn(*arrays)
    present = [(a, ax) for a, ax in args_and_axes if a is not None]
    specs = tuple(logical_to_spec(ax, a.shape, mesh) for a, ax in present)
    b, h, d = arrays[0].shape[0], arrays[3].shape[0], arrays[0].shape[-1]
    state_spec = logical_to_spec(("batch", "heads", None, None), (b, h, d, arrays[2].shape[-1]), mesh)
    mask = [a is not None for a in arrays]

    def local(*xs):
        it = iter(xs)
        return fn(*[next(it) if m else None for m in mask])

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(specs[0], state_spec), check_vma=False)(
        *[a for a, _ in present])


QKV_AXES = ("batch", None, "heads", None)
SEQ_QKV_AXES = ("batch", "seq", "heads", None)
TOKEN_AXES = ("batch", "heads", None)


def sequence_spec(q_BxLxHxD: jax.Array):
    """(mesh, PartitionSpec of q by `SEQ_QKV_AXES`, the mesh axes splitting the sequence) when the active mesh
    splits this sequence; None otherwise."""
    mesh = current_mesh()
    if mesh is None:
        return None
    spec = logical_to_spec(SEQ_QKV_AXES, q_BxLxHxD.shape, mesh)
    seq = spec_axes(spec[1])
    return (mesh, spec, seq) if seq else None


def sequence_sharded_lightning(q, k, v, slope_H, *, mesh, spec, seq_axes, block_size: int, impl: str):
    """Lightning attention from a zero state with the sequence split into n equal shards over `seq_axes` (LASP).

    Shard i (tokens [i·c, (i+1)·c)) computes its blocked attention O⁰_i and state S_i from a zero state; the
    state entering it is the decayed prefix of the earlier shards' states (gathered: n·[B, H, D, D] fp32),

        P_i = Σ_{j<i} λ^{c·(i−1−j)} S_j,      o_t += λ^{t+1} q_t P_i   (t local),      S = Σ_j λ^{c·(n−1−j)} S_j,

    which is the unsharded recurrence regrouped (exact up to fp32 rounding; all exponents ≥ 0). Returns
    (out `[B, L, H, D]` sharded like q, final state `[B, H, D, D]` fp32).
    """
    n = axes_size(mesh, seq_axes)
    c = q.shape[1] // n
    state_spec = P(spec[0], spec[2], None, None)
    varying = tuple(a for entry in spec for a in spec_axes(entry))  # the axes a shard's zero state varies over

    def local(q, k, v, slope_H):
        b, _, h, d = q.shape
        zero = jax.lax.pcast(jnp.zeros((b, h, d, v.shape[-1]), jnp.float32), varying, to="varying")
        out, s_BxHxDxE = lightning_attention(q, k, v, slope_H, zero, block_size=block_size, impl=impl)
        i = jax.lax.axis_index(seq_axes)
        states_NxBxHxDxE = jax.lax.all_gather(s_BxHxDxE, seq_axes)
        j = jnp.arange(n)
        exp_N = ((i - 1 - j) * c).astype(jnp.float32)
        w_NxH = jnp.where((j < i)[:, None], jnp.exp(-jnp.maximum(exp_N, 0.0)[:, None] * slope_H), 0.0)
        incoming = jnp.einsum("nh,nbhde->bhde", w_NxH, states_NxBxHxDxE, precision=jax.lax.Precision.HIGHEST)
        q_decay_LxH = jnp.exp(-(jnp.arange(c, dtype=jnp.float32)[:, None] + 1.0) * slope_H)
        carried = jnp.einsum("blhd,bhde->blhe", q.astype(jnp.float32) * q_decay_LxH[..., None], incoming,
                             precision=jax.lax.Precision.HIGHEST)
        out = (out.astype(jnp.float32) + carried).astype(q.dtype)
        to_end_H = jnp.exp(-((n - 1 - i) * c).astype(jnp.float32) * slope_H)
        final = jax.lax.psum(to_end_H[None, :, None, None] * s_BxHxDxE, seq_axes)
        return out, final

    # pallas_call outputs do not declare how they vary over the mesh axes, so the check is off for the kernels.
    check = resolve_impl(impl) != "pallas"
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[2])), out_specs=(spec, state_spec),
                         check_vma=check)(q, k, v, slope_H.astype(jnp.float32))


class LightningAttention(nnx.Module):
    """Lightning attention layer: weights `qkv_proj`, `output_gate`, `out_proj`, `norm` (RC names)."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        d, h, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        pdt, std = config.param_dtype, config.initializer_range
        self.config = config
        self.layer_idx = layer_idx
        for name, shape, axes in (("qkv_proj", (d, h, 3 * hd), ("embed", "heads", "qkv")),
                                  ("output_gate", (d, h, hd), ("embed", "heads", "head_dim")),
                                  ("out_proj", (h, hd, d), ("heads", "head_dim", "embed"))):
            setattr(self, name, param(rngs, shape, axes, pdt, std=std))
        self.norm = param(rngs, (h, hd), ("heads", "head_dim"), pdt, init="ones")
        for name, shape, axes in (("qkv_proj", (d, h, 3 * hd), ("embed", "heads", "qkv")),
                                  ("output_gate", (d, h, hd), ("embed", "heads", "head_dim")),
                                  ("out_proj", (h, hd, d), ("heads", "head_dim", "embed"))):
            lora.declare(self, name, shape, axes, config, rngs)

    @property
    def slopes(self) -> np.ndarray:
        c = self.config
        return layer_slopes(c.num_attention_heads, self.layer_idx, c.num_hidden_layers)

    def __call__(self, x_BxLxD: jax.Array, *, valid_BxL: jax.Array | None = None,
                 state_BxHxDxD: jax.Array | None = None, slope_H: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """Returns (y `[B, L, D_model]`, final state `[B, H, D, D]` fp32); `state_BxHxDxD` is the state before
        the first token (None: zeros); `slope_H` the decay rates (None: those of `layer_idx`). Padding
        (`valid_BxL` False) must precede each row's real tokens within the call; it never changes the state (its
        k, v are zeroed and the carried state skips it)."""
        c = self.config
        dt = DTYPE[c.dtype]
        hd = c.head_dim
        x_BxLxD = x_BxLxD.astype(dt)
        qkv_BxLxHx3D = jax.nn.silu(linear(x_BxLxD, lora.weight(self, "qkv_proj").astype(dt)))
        q, k, v = qkv_BxLxHx3D[..., :hd], qkv_BxLxHx3D[..., hd:2 * hd], qkv_BxLxHx3D[..., 2 * hd:]
        if valid_BxL is not None:
            keep = valid_BxL[:, :, None, None]
            k = jnp.where(keep, k, 0).astype(dt)
            v = jnp.where(keep, v, 0).astype(dt)
        slope_H = jnp.asarray(self.slopes if slope_H is None else slope_H)
        if x_BxLxD.shape[1] == 1 and state_BxHxDxD is not None:
            o, state = per_shard(lambda *a: lightning_decode(*a, impl=c.lightning_impl), c.lightning_impl,
                                 (q[:, 0], TOKEN_AXES), (k[:, 0], TOKEN_AXES), (v[:, 0], TOKEN_AXES),
                                 (slope_H, ("heads",)), (state_BxHxDxD, STATE_AXES))
            if valid_BxL is not None:  # a padding step leaves the state untouched
                state = jnp.where(valid_BxL[:, 0, None, None, None], state, state_BxHxDxD)
            o_BxLxHxD = o[:, None]
        elif state_BxHxDxD is not None and (valid_BxL is not None or sequence_spec(q) is not None):
            o_BxLxHxD, state = self._continue_left_padded(q, k, v, slope_H, state_BxHxDxD, valid_BxL)
        else:
            o_BxLxHxD, state = self._prefill(q, k, v, slope_H, state_BxHxDxD)
        b, l, h, _ = o_BxLxHxD.shape
        o_BxLxHD = rms_norm(o_BxLxHxD.astype(dt).reshape(b, l, h * hd), self.norm[...].reshape(h * hd),
                            c.lightning_norm_eps)
        gate_BxLxHxD = jax.nn.sigmoid(linear(x_BxLxD, lora.weight(self, "output_gate").astype(dt)))
        y = linear(gate_BxLxHxD * o_BxLxHD.reshape(b, l, h, hd), lora.weight(self, "out_proj").astype(dt), contract=2)
        return y, state

    def _prefill(self, q, k, v, slope_H, state):
        c = self.config
        sharded = sequence_spec(q) if state is None else None
        if sharded is not None:
            mesh, spec, seq_axes = sharded
            return sequence_sharded_lightning(q, k, v, slope_H, mesh=mesh, spec=spec, seq_axes=seq_axes,
                                              block_size=c.block_size, impl=c.lightning_impl)
        return per_shard(lambda *a: lightning_attention(*a, block_size=c.block_size, impl=c.lightning_impl),
                         c.lightning_impl, (q, QKV_AXES), (k, QKV_AXES), (v, QKV_AXES), (slope_H, ("heads",)),
                         (state, STATE_AXES))

    def _continue_left_padded(self, q, k, v, slope_H, s0_BxHxDxD, valid_BxL):
        """Carry a state S₀ across a chunk whose row b starts with p_b padding tokens (none if `valid_BxL` is
        None): the state skips them.

        By linearity the carried state enters at the first real token: with zero initial state for the chunk,
            o_t += λ^{t−p_b+1} q_t S₀  (t ≥ p_b),        S_L += λ^{L−p_b} S₀.
        Exponents are ≥ 0, so this is exact and stable for any amount of padding.
        """
        l = q.shape[1]
        out, fin = self._prefill(q, k, v, slope_H, None)
        pad_B = jnp.zeros(q.shape[0], jnp.int32) if valid_BxL is None else \
            l - jnp.sum(valid_BxL.astype(jnp.int32), axis=1)
        exp_BxL = (jnp.arange(l)[None, :] - pad_B[:, None] + 1).astype(jnp.float32)
        decay_BxLxH = jnp.where(exp_BxL[..., None] > 0, jnp.exp(-jnp.maximum(exp_BxL, 0.0)[..., None] * slope_H), 0.0)
        carried = jnp.einsum("blhd,bhde->blhe", q.astype(jnp.float32) * decay_BxLxH[..., None], s0_BxHxDxD,
                             precision=jax.lax.Precision.HIGHEST)
        out = (out.astype(jnp.float32) + carried).astype(q.dtype)
        fin = fin + jnp.exp(-(l - pad_B)[:, None].astype(jnp.float32) * slope_H)[..., None, None] * s0_BxHxDxD
        return out, fin
