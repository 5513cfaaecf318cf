"""The name mapping between Hugging Face checkpoints and m1jax parameters, in both directions.

Each m1jax parameter is described once by a `ParamSpec`: its path in the NNX state, its JAX shape and
logical axes, the HF tensors it comes from, and two pure transforms:

* `view(sources)` — a lazy view of the JAX parameter over the (memory-mapped) HF tensors: transposes and
  axis splits of an `[out, in]` PyTorch weight are numpy views, and expert stacks are `LazyStack`s, so
  slicing reads only the requested region (no full host copy of a parameter).
* `to_hf(array)` — the HF tensors (original layout) of a JAX parameter, for export; `hf_tensors(read)` yields
  them reading only what each needs (an original-layout expert stack, `stacked=True`, one expert at a time).

Two HF layouts are read: the original remote-code one (`block_sparse_moe.experts.E.w1/w2/w3`,
`block_sparse_moe.gate`) and the transformers-native one (`mlp.experts.gate_up_proj` [E, 2F, D] with gate
rows first, `mlp.experts.down_proj` [E, D, F], `mlp.gate`). Export writes the original layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from m1jax.convert.array_copy import contiguous_copy, copy_into

from m1jax.config import LIGHTNING, ModelConfig

ORIGINAL = "original"
TRANSFORMERS = "transformers"
# Buffers transformers writes that m1jax recomputes (never parameters).
IGNORED_SUFFIXES = (".slope_rate", ".query_decay", ".key_decay", ".diagonal_decay", ".rotary_emb.inv_freq")


class LazyStack:
    """Lazy `[N, ...]` stack of views (the experts of a layer, the layers of a scanned model's group axis);
    indexing materialises only the selected region."""

    def __init__(self, views: Sequence):
        self.views = list(views)
        self.shape = (len(self.views), *self.views[0].shape)
        self.dtype = self.views[0].dtype

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if index and index[0] is Ellipsis:
            index = (slice(None),) * (len(self.shape) - len(index) + 1) + index[1:]
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            return contiguous_copy(self.views[first][rest])
        selected = self.views[first]
        if not selected:
            rest_shape = np.broadcast_to(np.zeros((), np.uint8), self.shape[1:])[rest].shape
            return np.empty((0, *rest_shape), self.dtype)
        parts = [v[rest] for v in selected]
        out = np.empty((len(parts), *parts[0].shape), self.dtype)
        for k, part in enumerate(parts):
            copy_into(out[k], np.asarray(part))
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass(frozen=True)
class ParamSpec:
    path: tuple  # keys into the NNX state, e.g. ("layers", 3, "self_attn", "qkv_proj")
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # HF tensor names this parameter is read from
    source_shapes: tuple[tuple[int, ...], ...]
    view: Callable  # list of HF arrays (same order as sources) -> lazy JAX-layout view
    to_hf: Callable  # JAX array -> {hf name: array in the ORIGINAL layout}
    fp32: bool = False  # always stored/computed in fp32 (router gate)
    stacked: bool = False  # sources[x] is the JAX slice [x], transposed (original-layout expert stacks)

    def hf_tensors(self, read):
        """Yield `(hf name, array)` in the original layout, `read(index)` giving a JAX-layout region.

        A stacked parameter is read one expert at a time (`read((x,))`), never as a whole stack.
        """
        if self.stacked:
            for x, name in enumerate(self.sources):
                yield name, np.asarray(read((x,))).T
        else:
            yield from self.to_hf(read(())).items()


def _t(a):
    return a.T


def detect_layout(names: Sequence[str]) -> str:
    """"transformers" if any fused-expert tensor is present, else "original"."""
    return TRANSFORMERS if any(".mlp.experts." in n or n.endswith(".mlp.gate.weight") for n in names) else ORIGINAL


def param_specs(config: ModelConfig, layout: str = ORIGINAL) -> list[ParamSpec]:
    """Every m1jax parameter of `config` with its HF sources in `layout` ("original" or "transformers")."""
    if layout not in (ORIGINAL, TRANSFORMERS):
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    c = config
    d, v, h, kv, hd = c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    e, f = c.num_local_experts, c.intermediate_size
    specs: list[ParamSpec] = []

    def plain(path, shape, name, src_shape, view, to_hf, fp32=False):
        specs.append(ParamSpec(tuple(path), tuple(shape), (name,), (tuple(src_shape),),
                               lambda s, view=view: view(s[0]), lambda a, name=name, to_hf=to_hf: {name: to_hf(a)},
                               fp32))

    def linear(path, name, n_in, out_dims):
        """HF [prod(out_dims), n_in] weight ↔ JAX [n_in, *out_dims]."""
        n_out = int(np.prod(out_dims))
        plain(path, (n_in, *out_dims), name, (n_out, n_in), lambda a: a.T.reshape(n_in, *out_dims),
              lambda a: np.asarray(a).reshape(n_in, n_out).T)

    def linear_in_heads(path, name, in_dims, n_out):
        """HF [n_out, prod(in_dims)] weight ↔ JAX [*in_dims, n_out]."""
        n_in = int(np.prod(in_dims))
        plain(path, (*in_dims, n_out), name, (n_out, n_in), lambda a: a.T.reshape(*in_dims, n_out),
              lambda a: np.asarray(a).reshape(n_in, n_out).T)

    def vector(path, name, shape):
        n = int(np.prod(shape))
        plain(path, shape, name, (n,), lambda a: a.reshape(shape), lambda a: np.asarray(a).reshape(n))

    plain(("embed_tokens",), (v, d), "model.embed_tokens.weight", (v, d), lambda a: a, np.asarray)
    vector(("norm",), "model.norm.weight", (d,))
    plain(("lm_head",), (d, v), "lm_head.weight", (v, d), _t, lambda a: np.asarray(a).T)

    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}"
        lp = ("layers", i)
        vector((*lp, "input_layernorm"), f"{p}.input_layernorm.weight", (d,))
        vector((*lp, "post_attention_layernorm"), f"{p}.post_attention_layernorm.weight", (d,))
        a = (*lp, "self_attn")
        if kind == LIGHTNING:
            linear((*a, "qkv_proj"), f"{p}.self_attn.qkv_proj.weight", d, (h, 3 * hd))
            linear((*a, "output_gate"), f"{p}.self_attn.output_gate.weight", d, (h, hd))
            linear_in_heads((*a, "out_proj"), f"{p}.self_attn.out_proj.weight", (h, hd), d)
            vector((*a, "norm"), f"{p}.self_attn.norm.weight", (h, hd))
        else:
            linear((*a, "q_proj"), f"{p}.self_attn.q_proj.weight", d, (h, hd))
            linear((*a, "k_proj"), f"{p}.self_attn.k_proj.weight", d, (kv, hd))
            linear((*a, "v_proj"), f"{p}.self_attn.v_proj.weight", d, (kv, hd))
            linear_in_heads((*a, "o_proj"), f"{p}.self_attn.o_proj.weight", (h, hd), d)
        m = (*lp, "block_sparse_moe")
        orig = f"{p}.block_sparse_moe"
        gate_name = f"{orig}.gate.weight" if layout == ORIGINAL else f"{p}.mlp.gate.weight"
        specs.append(ParamSpec((*m, "gate"), (d, e), (gate_name,), ((e, d),), lambda s: s[0].T,
                               lambda a, n=f"{orig}.gate.weight": {n: np.asarray(a).T}, fp32=True))
        w_names = {w: tuple(f"{orig}.experts.{x}.{w}.weight" for x in range(e)) for w in ("w1", "w2", "w3")}

        def experts_to_hf(a, names):
            a = np.asarray(a)
            return {n: a[x].T for x, n in enumerate(names)}

        if layout == ORIGINAL:
            for w, shape, src in (("w1", (e, d, f), (f, d)), ("w3", (e, d, f), (f, d)), ("w2", (e, f, d), (d, f))):
                specs.append(ParamSpec((*m, w), shape, w_names[w], (src,) * e,
                                       lambda s: LazyStack([x.T for x in s]),
                                       lambda a, names=w_names[w]: experts_to_hf(a, names), stacked=True))
        else:
            gu, dn = f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"
            specs.append(ParamSpec((*m, "w1"), (e, d, f), (gu,), ((e, 2 * f, d),),
                                   lambda s: s[0][:, :f, :].transpose(0, 2, 1),
                                   lambda a, names=w_names["w1"]: experts_to_hf(a, names)))
            specs.append(ParamSpec((*m, "w3"), (e, d, f), (gu,), ((e, 2 * f, d),),
                                   lambda s: s[0][:, f:, :].transpose(0, 2, 1),
                                   lambda a, names=w_names["w3"]: experts_to_hf(a, names)))
            specs.append(ParamSpec((*m, "w2"), (e, f, d), (dn,), ((e, d, f),), lambda s: s[0].transpose(0, 2, 1),
                                   lambda a, names=w_names["w2"]: experts_to_hf(a, names)))
    return specs


def expected_tensors(config: ModelConfig, layout: str = ORIGINAL) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape for a checkpoint of `config` in `layout`."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in param_specs(config, layout):
        for name, shape in zip(spec.sources, spec.source_shapes, strict=True):
            out[name] = shape
    return out


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)
