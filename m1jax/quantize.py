"""Weight-only int8 for the routed experts (`ModelConfig.quantize = "int8-experts"`).

A weight W `[..., K, N]` (K = input, N = output channels, the layout of `x @ W`) is stored as

    s[..., n] = max_k |W[..., k, n]| · fl(1/127)    (fp32, one scale per output channel; 1 where W[.., n] = 0)
    q[..., k, n] = round(W[..., k, n] / s[..., n])   (int8 in [−127, 127])

so |W − q·s| ≤ s/2 elementwise. Because s is constant along the contracted axis,

    x @ (q·s) = (x @ q) · s                         (exactly, in real arithmetic)

and the expert implementations multiply the scale after the product (`scaled`), never forming q·s.
Functions here take numpy or jax arrays (the converter quantizes on the host, block by block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import INT8_EXPERTS, QUANTIZE_MODES  # noqa: F401  (re-exported)

QMAX = 127
SCALE_SUFFIX = "_scale"


def _xp(a):
    return jnp if isinstance(a, jax.Array) else np


def quantize_int8(w_xKxN):
    """(q `[..., K, N]` int8, s `[..., N]` float32): symmetric per-output-channel quantization of `w`."""
    xp = _xp(w_xKxN)
    w = xp.asarray(w_xKxN).astype(xp.float32)
    amax = xp.max(xp.abs(w), axis=-2)
    s = xp.where(amax > 0, amax * np.float32(1 / QMAX), xp.ones_like(amax)).astype(xp.float32)  # XLA's a/127
    q = xp.clip(xp.round(w / s[..., None, :]), -QMAX, QMAX).astype(xp.int8)
    return q, s


def dequantize_int8(q_xKxN, s_xN, dtype=np.float32):
    """q·s in `dtype` (materialises the full weight: for export and tests, not for the forward pass)."""
    xp = _xp(q_xKxN)
    return (xp.asarray(q_xKxN).astype(xp.float32) * xp.asarray(s_xN).astype(xp.float32)[..., None, :]).astype(dtype)


def scaled(y_xN: jax.Array, s_xN: jax.Array | None) -> jax.Array:
    """y·s over the trailing output-channel axis (identity when `s` is None): the int8 product's rescale."""
    if s_xN is None:
        return y_xN
    return (y_xN.astype(jnp.float32) * s_xN.astype(jnp.float32)).astype(y_xN.dtype)


def scale_name(weight: str) -> str:
    """The parameter name of a weight's scales: `w1` → `w1_scale`."""
    return weight + SCALE_SUFFIX


class QuantizedView:
    """Lazy int8 view (`part="q"`, shape `[..., E, K, N]`) or scale view (`part="scale"`, `[..., E, N]`) over a
    lazy float view of an expert stack `[..., E, K, N]` (leading axes: a scanned model's layer groups). A region
    is quantized from the full K extent of its columns, one expert at a time, so a device reading its shard
    never holds more than one expert's columns in fp32."""

    def __init__(self, dense, part: str):
        if part not in ("q", "scale"):
            raise ValueError(f"part must be 'q' or 'scale', got {part!r}")
        self.dense, self.part = dense, part
        shape = tuple(dense.shape)
        self.shape = shape if part == "q" else (*shape[:-2], shape[-1])
        self.dtype = np.dtype(np.int8) if part == "q" else np.dtype(np.float32)

    def __getitem__(self, index):
        full, squeeze = _as_slices(_normalize(index, len(self.shape)))
        lead = len(self.dense.shape) - 2
        cols, rows = full[-1], (full[lead] if self.part == "q" else slice(None))
        out = np.empty(np.empty(self.shape, np.uint8)[full].shape, self.dtype)
        ranges = [range(n)[i] for n, i in zip(self.dense.shape[:lead], full[:lead], strict=True)]
        for at in np.ndindex(*(len(r) for r in ranges)):
            q, scale = quantize_int8(np.asarray(self.dense[(*(r[i] for r, i in zip(ranges, at, strict=True)),
                                                            slice(None), cols)]))
            out[at] = q[rows] if self.part == "q" else scale
        return out[squeeze]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class DequantizedView:
    """Lazy view q·s (in `dtype`) of an int8 expert stack `[..., E, K, N]` and its scales `[..., E, N]`."""

    def __init__(self, q, scale, dtype=np.float32):
        self.q, self.scale = q, scale
        self.shape = tuple(q.shape)
        self.dtype = np.dtype(dtype)

    def __getitem__(self, index):
        full, squeeze = _as_slices(_normalize(index, len(self.shape)))
        return dequantize_int8(np.asarray(self.q[full]), np.asarray(self.scale[(*full[:-2], full[-1])]),
                               self.dtype)[squeeze]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _normalize(index, ndim: int) -> tuple:
    """A numpy basic index (ints, slices, Ellipsis) as a tuple of exactly `ndim` ints/slices."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
    if len(index) > ndim or any(not isinstance(i, (slice, int, np.integer)) for i in index):
        raise IndexError(f"unsupported index {index!r} for a {ndim}-d quantized view")
    return tuple(index) + (slice(None),) * (ndim - len(index))


def _as_slices(index: tuple) -> tuple[tuple, tuple]:
    """(the index with each int i as slice(i, i+1), the index that drops those axes again)."""
    full = tuple(slice(int(i), int(i) + 1 if int(i) != -1 else None) if not isinstance(i, slice) else i
                 for i in index)
    return full, tuple(0 if not isinstance(i, slice) else slice(None) for i in index)


def is_expert_weight_path(path: tuple) -> bool:
    """Whether a parameter path (NNX flat-state keys) names a routed-expert weight `…block_sparse_moe.w1|w3|w2`."""
    from m1jax.modules.moe import EXPERT_WEIGHTS

    return len(path) >= 2 and path[-2] == "block_sparse_moe" and path[-1] in EXPERT_WEIGHTS


def scale_path(path: tuple) -> tuple:
    return (*path[:-1], scale_name(path[-1]))


def quantize_views(views: dict) -> dict:
    """`{param path: lazy float view}` → the views of the int8-experts model: each expert weight as its int8
    `QuantizedView` plus its scales at `scale_path(path)`; every other view unchanged."""
    out = {}
    for path, view in views.items():
        if is_expert_weight_path(path):
            out[path], out[scale_path(path)] = QuantizedView(view, "q"), QuantizedView(view, "scale")
        else:
            out[path] = view
    return out


def dequantize_views(views: dict, dtype=np.float32) -> dict:
    """The inverse of `quantize_views` for export: each int8 expert weight and its scales as one `DequantizedView`
    (q·s in `dtype`) at the weight's path (scale paths dropped); views without scales unchanged."""
    scales = {scale_path(p) for p in views if is_expert_weight_path(p) and scale_path(p) in views}
    return {path: DequantizedView(view, views[scale_path(path)], dtype) if scale_path(path) in scales else view
            for path, view in views.items() if path not in scales}
