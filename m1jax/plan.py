"""`m1jax plan`: what one step of a model needs on a named topology, compiled deviceless for TPU slices.

For a TPU slice the real model is compiled ahead of time with no TPU attached (`m1jax.topology`): parameters
and cache are `jax.ShapeDtypeStruct`s carrying their `NamedSharding`, the step is `jax.jit(...).lower(...)
.compile()`d by libtpu, and the plan reports

* per-chip memory: weights and cache (from the shardings), temporaries and program code (the compiler's
  `memory_analysis()`), peak vs the chip's HBM: fits or not (the compiler also refuses what does not fit);
* collective bytes per step by kind, from the compiled HLO (`m1jax.hlo_collectives`), and the bytes of any
  all-gather of an expert weight;
* a roofline *estimate* of the step time: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) + collective bytes /
  interconnect bandwidth, with FLOPs and HBM bytes counted on the compiled program (`step_cost`: per
  instruction as XLA's cost analysis counts them, loop bodies times their trip counts; `cost_analysis()`
  itself counts a loop body once and is reported beside it), and the HBM floor: the weights and cache a chip
  must read per step over its HBM bandwidth.

Steps: `decode` = one iteration of the engine's decode loop (`generation._decode_loop`) with a cache of
`context` slots; `prefill` = the engine's prefill step (`generation.forward_chunk`) over `context` tokens into
an empty cache of `context` slots; `train` = one full fine-tuning step, the trainer's own
`m1jax.train.update.update_step`: the CISPO loss over `batch` sequences of `context` tokens (bf16 compute, fp32 head,
log-probs in chunks of `logprob_chunk` positions), its gradient (accumulated over `micro_batches`) and the AdamW
update of the fp32 master weights (weights = the master copy, plus the optimizer's two fp32 moments per weight;
the compute dtype is cast where each layer reads its weights, so no bf16 copy is held). With `lora_rank` > 0 the
step is the trainer's LoRA step (`m1jax.lora`): the base weights are a frozen argument in their compute dtypes
(bf16, int8 experts with `quantize`), with no master copy and no optimizer state; only the adapters have fp32
masters, gradients and AdamW moments (`train_state`).

GPU hosts (and `--no-compile`) get the same report from arithmetic on the shapes alone (marked as estimates).
Without `--mesh`, candidate meshes are ranked by that arithmetic (fits, then smallest estimated step time)
and the best one is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

from m1jax.topology import LIBTPU_HINT, Topology, deviceless_env, libtpu_available, parse_topology

MODES = ("decode", "prefill", "train")
FIT_FRACTION = 0.95  # a plan fits when its peak is at most this share of HBM (room for the runtime)
GB = 1e9


class PlanError(ValueError):
    """A bad plan request (unknown mesh axis, mesh that does not match the topology, ...)."""


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model: str  # preset name or path to a config.json
    topology: str
    mode: str
    batch: int
    context: int
    mesh: dict[str, int] | None = None
    quantize: str | None = None
    layers: int | None = None  # keep only the first N layers (development)
    chunk: int | None = None  # prefill: tokens per step (default: the whole context)
    lightning_impl: str = "auto"
    moe_impl: str = "auto"
    scan: str | None = None  # "auto" | "on" | "off": layers as one scan over groups (config.scan_layers)
    remat: str | None = None  # per scanned group (config.remat), e.g. "full" for long training contexts
    micro_batches: int = 1  # train: gradient accumulation steps per update (rows per micro-batch = batch / this)
    logprob_chunk: int | None = None  # train: positions per chunk of the fp32 head's log-probs (None: all)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank (ModelConfig.lora_rank; train: only they are trained)
    lora_alpha: float | None = None  # ModelConfig.lora_alpha (None: 2 · rank, as the trainer's model.lora)
    lora_targets: tuple[str, ...] | None = None  # ModelConfig.lora_targets (None: attention and experts)
    compile: bool = True
    top: int = 0  # > 0: the step's costliest operations by HBM bytes and by FLOPs (compiled plans)


# ------------------------------------------------------------------------------------------- parsing
def parse_mesh(text: str | None) -> dict[str, int] | None:
    """`"data=8,expert=8"` → `{"data": 8, "expert": 8}` (axes of `m1jax.sharding.MESH_AXES`)."""
    from m1jax.sharding import MESH_AXES

    if text is None or not text.strip():
        return None
    mesh = {}
    for item in text.split(","):
        name, eq, size = item.strip().partition("=")
        if not eq or not size.strip().isdigit() or int(size) < 1:
            raise PlanError(f"--mesh entry {item.strip()!r} is not AXIS=SIZE with a positive integer size")
        name = name.strip()
        if name not in MESH_AXES:
            raise PlanError(f"--mesh axis {name!r} is unknown; m1jax meshes have axes {', '.join(MESH_AXES)}")
        if name in mesh:
            raise PlanError(f"--mesh names axis {name!r} twice")
        mesh[name] = int(size)
    return mesh


def model_config(req: PlanRequest):
    """The request's `ModelConfig` in bf16 (weights and compute; full fine-tuning: fp32 master weights, LoRA: the
    bf16 base the trainer freezes), with `--layers`, `--quantize`, the LoRA fields (validated by `ModelConfig`)
    and the impls."""
    import dataclasses as dc

    from m1jax.config import ModelConfig

    if req.lora_rank == 0 and (req.lora_alpha is not None or req.lora_targets is not None):
        raise PlanError("--lora-alpha and --lora-targets need --lora-rank (the adapters' rank, ≥ 1)")
    if req.mode == "train" and req.quantize is not None and req.lora_rank == 0:
        raise PlanError(f"--quantize {req.quantize} in --mode train needs --lora-rank: int8 experts cannot be "
                        f"trained, only frozen under LoRA adapters")
    full_train = req.mode == "train" and req.lora_rank == 0
    runtime = {"dtype": "bfloat16", "param_dtype": "float32" if full_train else "bfloat16",
               "lightning_impl": req.lightning_impl, "moe_impl": req.moe_impl}
    path = Path(req.model)
    config = ModelConfig.from_json_file(path, **runtime) if path.suffix == ".json" or path.is_file() else \
        ModelConfig.from_preset(req.model, **runtime)
    if req.layers is not None:
        if not 1 <= req.layers <= config.num_hidden_layers:
            raise PlanError(f"--layers must be in 1..{config.num_hidden_layers}, got {req.layers}")
        config = config.replace(num_hidden_layers=req.layers, layer_types=config.layer_types[:req.layers])
    fields = {f.name for f in dc.fields(ModelConfig)}
    extra = {"quantize": ("quantize", req.quantize, req.quantize), "remat": ("remat", req.remat, req.remat),
             "scan": ("scan_layers", req.scan, {"on": True, "off": False, "auto": "auto"}.get(req.scan))}
    if req.lora_rank:
        alpha = float(2 * req.lora_rank if req.lora_alpha is None else req.lora_alpha)
        extra.update({"lora-rank": ("lora_rank", req.lora_rank, req.lora_rank),
                      "lora-alpha": ("lora_alpha", alpha, alpha),
                      "lora-targets": ("lora_targets", req.lora_targets, req.lora_targets)})
    for flag, (name, given, value) in extra.items():
        if given is None:
            continue
        if name not in fields:
            raise PlanError(f"--{flag} {given}: this version of m1jax has no ModelConfig.{name}")
        config = config.replace(**{name: value})
    return config


# ------------------------------------------------------------------------------------ shape arithmetic
def abstract_mesh(mesh_shape: dict[str, int]):
    """A device-free mesh of these sizes (axes of `sharding.MESH_AXES`, Auto like `sharding.make_mesh`)."""
    import jax

    from m1jax.sharding import MESH_AXES

    return jax.sharding.AbstractMesh(tuple(mesh_shape.get(a, 1) for a in MESH_AXES), MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _shard_bytes(x) -> int:
    import numpy as np

    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class TrainState:
    """The parameter arguments of the trainer's `update_step`, abstract and sharded (`jax.ShapeDtypeStruct`s):
    `masters` the fp32 trained parameters (every weight, or the LoRA adapters), `frozen` the base weights in
    their compute dtypes (LoRA; None for full fine-tuning), `param_dtypes` the masters' compute dtypes (static),
    `graphdef` the model structure these merge into (3-way split with LoRA, as `ModelBundle`)."""

    graphdef: object
    masters: object
    frozen: object
    param_dtypes: tuple[str, ...]


def train_state(config, mesh) -> TrainState:
    """The update step's parameters for `config` (`model_config` of a train request) on `mesh` (a device mesh or
    an `abstract_mesh`), laid out as `m1jax.train.model_setup.build_model` holds them: full fine-tuning: every
    parameter an fp32 master; LoRA: the adapters fp32 masters, the rest frozen in `config`'s dtypes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.lora import LoRAParam
    from m1jax.train.model_setup import compute_dtypes

    graphdef, state = _abstract_state(config)
    if config.lora_rank == 0:
        return TrainState(graphdef, sharded(state, mesh), None,  # (config: fp32 params)
                          compute_dtypes(config.replace(param_dtype="bfloat16")))
    graphdef, adapters, frozen = nnx.split(nnx.merge(graphdef, state), LoRAParam, ...)
    dtypes = tuple(jnp.dtype(x.dtype).name for x in jax.tree.leaves(adapters))
    return TrainState(graphdef, sharded(adapters, mesh, jnp.float32), sharded(frozen, mesh), dtypes)


def sharded(tree, mesh, dtype=None):
    """`tree` (abstract parameters) as `jax.ShapeDtypeStruct`s of `dtype` (default: their own) carrying the
    rules' `NamedSharding` on `mesh`."""
    import jax

    from m1jax.loading import param_shardings

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), tree,
                        param_shardings(tree, mesh))


@functools.lru_cache(maxsize=8)
def _abstract_state(config):
    from m1jax.loading import abstract_model

    return abstract_model(config)


def _is_expert(path) -> bool:
    from m1jax.modules.moe import EXPERT_WEIGHTS

    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return "block_sparse_moe" in names and any(n in EXPERT_WEIGHTS for n in names[-2:])


def per_chip_bytes(config, mode: str, batch: int, context: int, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Bytes per chip under the sharding rules: `weights` (every parameter as held in `mode`; train: the fp32
    masters plus the frozen base), of which `experts` (the routed experts' stacks), `masters` (train: the fp32
    trained parameters) and `frozen` (train with LoRA: the base in its compute dtypes); `cache`; and
    `adapter_params`, the number of LoRA adapter parameters in the model (not per chip)."""
    import jax
    from flax import nnx

    from m1jax.cache import abstract_cache
    from m1jax.lora import LoRAParam

    mesh = abstract_mesh(mesh_shape)
    totals = dict.fromkeys(("weights", "experts", "masters", "frozen", "cache", "adapter_params"), 0)
    totals["adapter_params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(
        nnx.state(nnx.merge(*_abstract_state(config)), LoRAParam)))
    if mode == "train":
        st = train_state(config, mesh)
        parts = {"masters": st.masters, "frozen": st.frozen}
    else:
        parts = {"weights": sharded(_abstract_state(config)[1], mesh)}
    for part, tree in parts.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            b = _shard_bytes(x)
            totals[part] += b
            totals["experts"] += b if _is_expert(path) else 0
    if mode == "train":
        totals["weights"] = totals["masters"] + totals["frozen"]
    else:
        totals["cache"] = sum(_shard_bytes(x) for x in jax.tree.leaves(abstract_cache(config, batch, context,
                                                                                       mesh=mesh)))
    return totals


def _token_shards(batch: int, length: int, mesh_shape: dict[str, int]) -> int:
    """Into how many pieces the rules split the tokens of a `[batch, length]` activation (batch and sequence)."""
    from m1jax.sharding import logical_to_spec

    spec = logical_to_spec(("batch", "seq"), (batch, length), abstract_mesh(mesh_shape))
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh_shape.get(a, 1) for a in axes)


@dataclasses.dataclass
class Estimate:
    """Arithmetic on the shapes for one mesh (per chip): memory, FLOPs, HBM bytes, collective bytes."""

    mesh: dict[str, int]
    weights: int  # every parameter held (train: masters + frozen)
    experts: int
    cache: int
    grads: int
    optimizer: int
    activations: int
    flops: float
    hbm_bytes: float
    floor_bytes: float
    collective_bytes: float
    masters: int = 0  # train: fp32 trained parameters (all, or the LoRA adapters)
    frozen: int = 0  # train with LoRA: the base in its compute dtypes
    adapter_params: int = 0  # LoRA adapter parameters in the model

    def peak(self) -> int:
        return self.weights + self.grads + self.optimizer + self.cache + self.activations


def estimate(config, topo: Topology, mode: str, batch: int, context: int, mesh_shape: dict[str, int],
             chunk: int | None = None, micro_batches: int = 1) -> Estimate:
    """Per-chip arithmetic for one step (see module doc); the activation figure is a rough bound."""
    chips = topo.num_chips
    mem = per_chip_bytes(config, mode, batch, context, mesh_shape)
    d, v, k = config.hidden_size, config.vocab_size, config.num_experts_per_tok
    h, hd, layers = config.num_attention_heads, config.head_dim, config.num_hidden_layers
    counts = config.param_counts()
    tokens = batch * (1 if mode == "decode" else (chunk or context) if mode == "prefill" else context)
    shards = _token_shards(batch, tokens // batch, mesh_shape)
    tensor, expert, fsdp = (mesh_shape.get(a, 1) for a in ("tensor", "expert", "fsdp"))
    local_tokens = tokens / shards
    # FLOPs: 2 per active parameter per token, the LM head, softmax attention over the visible keys
    attn_keys = context if mode == "decode" else (chunk or context) / 2
    flops = 2 * tokens * (counts["active"] + d * v) + 4 * tokens * attn_keys * h * hd * len(config.softmax_layers)
    if mode == "train":
        flops *= 3
    flops /= chips
    # HBM: every local weight and the cache are read once per step (decode reads all experts once batch·k
    # assignments cover them); training reads weights twice and writes gradients
    floor = mem["weights"] + mem["cache"]
    hbm = floor * (3 if mode == "train" else 1)
    # collectives: tensor-parallel all-reduces (attention out, MoE out), the MoE token all-to-all (there and
    # back), the vocab-sharded logits; fsdp re-gathers weights (forward and backward) and reduce-scatters grads
    act = local_tokens * d * 2
    coll = layers * ((2 * act * (tensor - 1) / tensor) if tensor > 1 else 0)
    coll += layers * (2 * act * k * (expert - 1) / expert if expert > 1 else 0)
    if tensor > 1 and mode != "prefill":
        coll += local_tokens * v * 4
    if fsdp > 1:
        coll += mem["weights"] * fsdp * (3 if mode == "train" else 1)
    # activations: the residual stream and the widest intermediate of one layer (train: plus a few saved
    # tensors of every layer's width D for the backward pass)
    width = max(3 * h * hd / tensor, 2 * k * config.intermediate_size / tensor, d)
    activations = int(local_tokens * (d * 2 + width * 4))
    grads = optimizer = 0
    if mode == "train":  # fp32 masters, their gradients and two AdamW moments; one micro-batch's activations
        micro_tokens = local_tokens / micro_batches
        activations = int(micro_tokens * (d * 2 + width * 4))
        saved = config.scan_groups or layers if config.remat != "none" else layers * 4  # D-wide tensors kept
        activations += int(micro_tokens * d * 2 * saved)
        grads, optimizer = mem["masters"], 2 * mem["masters"]
    return Estimate(dict(mesh_shape), mem["weights"], mem["experts"], mem["cache"], grads, optimizer, activations,
                    flops, hbm, floor, coll, mem["masters"], mem["frozen"], mem["adapter_params"])


def step_time(topo: Topology, flops: float, hbm_bytes: float, collective_bytes: float) -> float:
    """Roofline estimate (s): max(compute, HBM) + collectives over the interconnect."""
    chip = topo.chip
    return max(flops / chip.bf16_flops, hbm_bytes / chip.hbm_bw) + collective_bytes / chip.ici_bw


def candidate_meshes(config, mode: str, chips: int) -> list[dict[str, int]]:
    """Meshes of `chips` chips worth ranking: tensor a power of two dividing the KV heads, expert a divisor of
    the expert count, the rest over data (inference) or fsdp (train)."""
    rest = "fsdp" if mode == "train" else "data"
    out = []
    for t in (1, 2, 4, 8, 16):
        if config.num_key_value_heads % t or config.num_attention_heads % t or chips % t:
            continue
        for e in range(1, config.num_local_experts + 1):
            if config.num_local_experts % e or chips % (t * e):
                continue
            out.append({rest: chips // (t * e), "tensor": t, "expert": e})
    return out


def suggest_mesh(config, topo: Topology, mode: str, batch: int, context: int, chunk: int | None = None
                 ) -> tuple[dict[str, int], list[tuple[Estimate, float, bool]]]:
    """The candidate mesh that fits with the smallest estimated step time (the smallest peak if none fits),
    and every candidate's (estimate, seconds, fits), best first."""
    ranked = []
    for m in candidate_meshes(config, mode, topo.num_chips):
        e = estimate(config, topo, mode, batch, context, m, chunk)
        fits = e.peak() <= FIT_FRACTION * topo.chip.hbm_bytes
        ranked.append((e, step_time(topo, e.flops, e.hbm_bytes, e.collective_bytes), fits))
    if not ranked:
        raise PlanError(f"no mesh of {topo.num_chips} chips divides this model's heads and experts")
    ranked.sort(key=lambda r: (not r[2], r[1] if r[2] else r[0].peak(), r[0].mesh.get("tensor", 1)))
    return {a: s for a, s in ranked[0][0].mesh.items() if s > 1} or {"data": 1}, ranked


# --------------------------------------------------------------------------------------- compilation
@contextlib.contextmanager
def reporting_backend(platform: str):
    """`jax.default_backend()` reports `platform` (as on a real host of it), so every backend-chosen path
    (kernels, MoE implementation) is the one that host would run."""
    import jax

    with mock.patch.object(jax, "default_backend", lambda: platform):
        yield


def _abstract(shape, dtype, axes, mesh):
    import jax

    from m1jax.sharding import named_sharding

    return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(axes, shape, mesh))


def _take_abstract(x, index):
    """`x[index]` of an abstract sharded array (integer and whole-axis `slice(None)` indices), its sharding
    keeping the remaining axes' mesh axes."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    index = index if isinstance(index, tuple) else (index,)
    keep = [i for i in range(len(x.shape)) if i >= len(index) or not isinstance(index[i], int)]
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    return jax.ShapeDtypeStruct(tuple(x.shape[i] for i in keep), x.dtype,
                                sharding=NamedSharding(x.sharding.mesh, P(*(spec[i] for i in keep))))


def lower_step(config, mode: str, batch: int, context: int, mesh, chunk: int | None = None, micro_batches: int = 1,
               logprob_chunk: int | None = None):
    """The jitted step of `mode` lowered for `mesh` with abstract, sharded arguments (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from m1jax import generation
    from m1jax.cache import abstract_cache
    from m1jax.loading import abstract_sharded_model
    from m1jax.modules.moe import unstack_experts
    from m1jax.sampling import SamplingParams

    if mode == "train":
        return lower_update_step(config, batch, context, mesh, micro_batches, logprob_chunk)
    graphdef, params = abstract_sharded_model(config, mesh)
    i32 = jnp.int32
    if mode == "decode":  # the expert weights as the engine's decode loop holds them (`Engine._decode_params`)
        layout = generation.decode_expert_layout(config, batch, jax.default_backend())
        if layout is not None:
            params = unstack_experts(params, over=layout, take=_take_abstract)
        state = generation.EngineState(
            cache=abstract_cache(config, batch, context, mesh=mesh),
            positions_B=_abstract((batch,), i32, ("batch",), mesh),
            next_logits_BxV=_abstract((batch, config.vocab_size), jnp.float32, ("batch", "vocab"), mesh))
        sp = generation.sampling_arrays([SamplingParams(max_new_tokens=1)] * batch, config.eos_token_ids)
        sp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sp)
        prog = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), generation.RowProgress.start(batch))
        return generation._decode_loop.lower(graphdef, 0, params, state, prog, sp, jax.ShapeDtypeStruct((), i32))
    if mode == "prefill":
        c = chunk or context
        toks = _abstract((batch, c), i32, ("batch", None), mesh)
        return generation._forward_chunk.lower(graphdef, params, abstract_cache(config, batch, context, mesh=mesh),
                                               toks, toks, _abstract((batch, c), jnp.bool_, ("batch", None), mesh))


def lower_update_step(config, batch: int, context: int, mesh, micro_batches: int = 1,
                      logprob_chunk: int | None = None):
    """The trainer's `update_step` (CISPO loss, AdamW on the fp32 masters of `train_state`, LoRA's frozen base
    passed as `frozen`; see the module doc) lowered for abstract sharded masters, optimizer state (of the masters
    only) and a `[batch, context]` rollout batch with rows split over the batch axes."""
    import jax.numpy as jnp

    from m1jax.train.run_config import OptimizerSpec
    from m1jax.train.update import LossSpec, abstract_optimizer_state, update_step

    if batch % micro_batches:
        raise PlanError(f"--micro-batches {micro_batches} must divide --batch {batch}")
    optimizer = OptimizerSpec()
    st = train_state(config, mesh)
    opt_state = abstract_optimizer_state(st.masters, optimizer, 0)
    rows = ("batch", None)
    data = {"tokens_BxL": _abstract((batch, context), jnp.int32, rows, mesh),
            "valid_BxL": _abstract((batch, context), jnp.bool_, rows, mesh),
            "mask_BxL": _abstract((batch, context), jnp.float32, rows, mesh),
            "old_logp_BxL": _abstract((batch, context), jnp.float32, rows, mesh),
            "adv_B": _abstract((batch,), jnp.float32, ("batch",), mesh),
            "denom_B": _abstract((batch,), jnp.float32, ("batch",), mesh)}
    return update_step.lower(st.masters, opt_state, data, 0.0, st.frozen, graphdef=st.graphdef,
                             param_dtypes=st.param_dtypes, spec=LossSpec("cispo", seq_chunk=logprob_chunk),
                             optimizer=optimizer, total_steps=0, micro_batches=micro_batches)


def _expert_shapes(config) -> list[tuple[int, ...]]:
    e, d, f = config.num_local_experts, config.hidden_size, config.intermediate_size
    return [(e, d, f), (e, f, d)]


def is_expert_weight(parameter_name: str) -> bool:
    """Whether a jit parameter's name (as XLA records it, e.g. `params['layers'][3]['block_sparse_moe']['w1']
    .value`, quotes possibly escaped) is a routed expert's weight stack."""
    from m1jax.modules.moe import EXPERT_WEIGHTS

    keys = re.findall(r"\[\\?'([^'\\]+)\\?'\]", parameter_name)
    return "block_sparse_moe" in keys and any(k in EXPERT_WEIGHTS for k in keys)


def step_cost(hlo: str, config, mode: str, batch: int, context: int, mesh_shape: dict[str, int], top: int = 0
              ) -> dict:
    """FLOPs and memory bytes per chip of one step of the compiled program (`hlo_collectives.instruction_costs`:
    every instruction counted as XLA's cost analysis counts it, but loop bodies times their trip counts, which
    `cost_analysis()` counts once). Softmax attention's loop over key blocks runs over the whole cache
    (`context` slots: the step at the end of the context). Decode: the instructions inside the decode loop are
    the step; those outside it run once per call of the loop (a decode burst: `burst_setup_hbm_bytes`).
    `hbm_bytes` counts only arrays in device memory (not on-chip memory such as VMEM); `loops_counted_once`
    names the loops inside the step whose trip count is unknown (counted once); with `top` > 0, `by_hbm_bytes`
    and `by_flops` rank the step's operations (`hlo_collectives.costliest`)."""
    from m1jax.cache import KV_AXES
    from m1jax.hlo_collectives import costliest, instruction_costs
    from m1jax.modules.softmax_attention import KEY_BLOCK, KEY_BLOCK_LOOP
    from m1jax.sharding import logical_to_spec

    spec = logical_to_spec(KV_AXES, (batch, context, config.num_key_value_heads, config.head_dim),
                           abstract_mesh(mesh_shape))
    seq = spec[1] if len(spec) > 1 and spec[1] is not None else ()
    slots = context // math.prod(mesh_shape.get(a, 1) for a in ((seq,) if isinstance(seq, str) else seq))
    costs = instruction_costs(hlo, trips={KEY_BLOCK_LOOP: max(-(-slots // KEY_BLOCK) - 1, 1)})
    step = [c for c in costs if c.loops] if mode == "decode" else costs
    setup = [c for c in costs if not c.loops] if mode == "decode" else []
    return {"flops": sum(c.total_flops for c in step), "bytes_accessed": sum(c.total_bytes for c in step),
            "hbm_bytes": sum(c.total_hbm_bytes for c in step),
            "burst_setup_hbm_bytes": sum(c.total_hbm_bytes for c in setup),
            "loops_counted_once": sorted({c.source for c in step if c.op == "while" and c.trips is None}),
            "by_hbm_bytes": costliest(step, top) if top else [],
            "by_flops": costliest(step, top, "flops") if top else []}


def compile_step(config, topo: Topology, mode: str, batch: int, context: int, mesh_shape: dict[str, int],
                 chunk: int | None = None, micro_batches: int = 1, logprob_chunk: int | None = None,
                 top: int = 0) -> dict:
    """Compile the step deviceless for `topo`; memory, cost and collectives of the compiled program."""
    import jax

    from m1jax import hlo_collectives
    from m1jax.sharding import make_mesh
    from m1jax.topology import topology_devices

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other compiles may hold libtpu's lockfile
    mesh = make_mesh(mesh_shape, topology_devices(topo))
    t0 = time.perf_counter()
    with reporting_backend(topo.chip.platform), jax.set_mesh(mesh):
        try:
            compiled = lower_step(config, mode, batch, context, mesh, chunk, micro_batches, logprob_chunk).compile()
        except Exception as e:  # the TPU compiler refuses what does not fit HBM (RESOURCE_EXHAUSTED)
            if "RESOURCE_EXHAUSTED" not in str(e) and "hbm" not in str(e).lower():
                raise
            return {"compiled": False, "compile_s": time.perf_counter() - t0, "error": str(e).splitlines()[0][:400]}
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost or {}
    hlo = compiled.as_text()
    if os.environ.get("M1JAX_PLAN_DUMP_HLO"):
        Path(os.environ["M1JAX_PLAN_DUMP_HLO"]).write_text(hlo)
    # an all-gather of an expert weight yields at least one chip's shard of it: smaller results of a matching
    # shape (routing tables, a few tokens) are not weights
    shard = config.num_local_experts * config.hidden_size * config.intermediate_size / topo.num_chips
    gathers = [g for g in hlo_collectives.all_gathers_of(hlo, _expert_shapes(config), parameter=is_expert_weight)
               if g.bytes >= shard]
    return {
        "compiled": True, "compile_s": compile_s,
        "argument_bytes": ma.argument_size_in_bytes, "output_bytes": ma.output_size_in_bytes,
        "alias_bytes": ma.alias_size_in_bytes, "temp_bytes": ma.temp_size_in_bytes,
        "code_bytes": ma.generated_code_size_in_bytes,
        "peak_bytes": (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                       + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes),
        "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "step_cost": step_cost(hlo, config, mode, batch, context, mesh_shape, top),
        "collectives": hlo_collectives.bytes_by_kind(hlo),
        "expert_weight_gather_bytes": sum(g.total_bytes for g in gathers),
    }


# ------------------------------------------------------------------------------------------- the plan
def plan(req: PlanRequest) -> dict:
    """The plan of `req` as a dict (the `--json` output)."""
    from m1jax.hlo_collectives import KINDS

    if req.mode not in MODES:
        raise PlanError(f"--mode must be one of {', '.join(MODES)}, got {req.mode!r}")
    if req.batch < 1 or req.context < 1:
        raise PlanError(f"--batch and --context must be positive, got {req.batch} and {req.context}")
    if req.micro_batches < 1 or req.batch % req.micro_batches:
        raise PlanError(f"--micro-batches must be a positive divisor of --batch {req.batch}, got {req.micro_batches}")
    if req.logprob_chunk is not None and req.logprob_chunk < 1:
        raise PlanError(f"--logprob-chunk must be positive, got {req.logprob_chunk}")
    topo = parse_topology(req.topology)
    config = model_config(req)
    suggested, ranked = None, []
    if req.mesh is None:
        mesh_shape, ranked = suggest_mesh(config, topo, req.mode, req.batch, req.context, req.chunk)
        suggested = mesh_shape
    else:
        mesh_shape = dict(req.mesh)
        if math.prod(mesh_shape.values()) != topo.num_chips:
            raise PlanError(f"--mesh {mesh_shape} has {math.prod(mesh_shape.values())} chips; {topo.name} has "
                            f"{topo.num_chips}")
    est = estimate(config, topo, req.mode, req.batch, req.context, mesh_shape, req.chunk, req.micro_batches)
    hbm = topo.chip.hbm_bytes
    out = {
        "model": req.model, "topology": topo.name, "chip": topo.chip.name, "chips": topo.num_chips,
        "mode": req.mode, "batch": req.batch, "context": req.context, "layers": config.num_hidden_layers,
        "quantize": req.quantize, "mesh": mesh_shape, "suggested_mesh": suggested,
        "hbm_gb": hbm / GB,
        "weights_gb_per_chip": est.weights / GB, "expert_weights_gb_per_chip": est.experts / GB,
        "cache_gb_per_chip": est.cache / GB,
        "optimizer_state_gb_per_chip": est.optimizer / GB if req.mode == "train" else None,
        "master_weights_gb_per_chip": est.masters / GB if req.mode == "train" else None,
        "frozen_weights_gb_per_chip": est.frozen / GB if req.mode == "train" else None,
        "lora": None if not config.lora_rank else {
            "rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(config.lora_targets),
            "adapter_params": est.adapter_params},
        "remat": config.remat, "micro_batches": req.micro_batches if req.mode == "train" else None,
        "hbm_floor_ms": est.floor_bytes / topo.chip.hbm_bw * 1e3,
        "compiled": False, "compile_s": None, "estimate": True,
    }
    result = None
    if req.compile and topo.tpu_topology is not None:
        result = compile_step(config, topo, req.mode, req.batch, req.context, mesh_shape, req.chunk,
                              req.micro_batches, req.logprob_chunk, req.top)
    if result is not None and result["compiled"]:
        coll = result["collectives"]
        cost = result["step_cost"]
        # the engine decodes a scanned model with its expert weights per layer group (`Engine._decode_params`),
        # a copy it holds besides the stacked weights its prefill reads
        from m1jax.generation import decode_expert_layout

        layout = None if req.mode != "decode" else decode_expert_layout(config, req.batch, topo.chip.platform)
        copy = est.experts if layout == "groups" else 0
        flops, hbm_bytes = cost["flops"], cost["hbm_bytes"]
        out.update({
            "compiled": True, "compile_s": result["compile_s"],
            "temp_gb_per_chip": result["temp_bytes"] / GB, "code_gb": result["code_bytes"] / GB,
            "argument_gb_per_chip": result["argument_bytes"] / GB,
            "peak_gb_per_chip": (result["peak_bytes"] + copy) / GB, "fits": result["peak_bytes"] + copy <= hbm,
            "decode_expert_copy_gb_per_chip": copy / GB if copy else None,
            "flops_per_chip": flops, "bytes_accessed_per_chip": hbm_bytes,
            "bytes_accessed_all_memories_per_chip": cost["bytes_accessed"],
            "burst_setup_hbm_bytes_per_chip": cost["burst_setup_hbm_bytes"] if req.mode == "decode" else None,
            "loops_counted_once": cost["loops_counted_once"],
            "costliest_by_hbm_bytes": cost["by_hbm_bytes"], "costliest_by_flops": cost["by_flops"],
            "compiler_flops_per_chip": result["flops"], "compiler_bytes_per_chip": result["bytes_accessed"],
            "collective_bytes_by_kind": coll, "collective_bytes_per_step": sum(coll.values()),
            "expert_weight_gather_bytes": result["expert_weight_gather_bytes"],
            "step_ms_estimate": step_time(topo, flops, hbm_bytes, sum(coll.values())) * 1e3,
        })
    else:
        if result is not None:
            out.update({"compile_s": result["compile_s"], "error": result["error"]})
        out.update({
            "peak_gb_per_chip": est.peak() / GB,
            "fits": est.peak() <= FIT_FRACTION * hbm and not (result is not None and not result["compiled"]),
            "flops_per_chip": est.flops, "bytes_accessed_per_chip": est.hbm_bytes,
            "collective_bytes_by_kind": dict.fromkeys(KINDS),
            "collective_bytes_per_step": est.collective_bytes,
            "expert_weight_gather_bytes": None,
            "step_ms_estimate": step_time(topo, est.flops, est.hbm_bytes, est.collective_bytes) * 1e3,
        })
    if ranked:
        out["candidates"] = [{"mesh": e.mesh, "peak_gb_per_chip": e.peak() / GB, "fits": fits,
                              "step_ms_estimate": s * 1e3} for e, s, fits in ranked[:8]]
    return out


def format_plan(p: dict) -> str:
    """The plan as a human-readable table."""
    def gb(x):
        return "—" if x is None else f"{x:.2f} GB"

    mesh = " × ".join(f"{a} {s}" for a, s in p["mesh"].items())
    how = "compiled deviceless" if p["compiled"] else "shape arithmetic only (not compiled)"
    lines = [f"{p['model']} · {p['mode']} · batch {p['batch']} × context {p['context']} · {p['layers']} layers"
             f"{' · ' + p['quantize'] if p['quantize'] else ''}",
             f"{p['topology']}: {p['chips']} × {p['chip']} ({p['hbm_gb']:.0f} GB HBM each) · mesh {mesh}"
             f"{' (suggested)' if p['suggested_mesh'] else ''} · {how}"]
    if p.get("error"):
        lines.append(f"compiler: {p['error']}")
    if p["compile_s"] is not None:
        lines.append(f"compile time            {p['compile_s']:.1f} s")
    lines += [f"weights per chip        {gb(p['weights_gb_per_chip'])} (experts {gb(p['expert_weights_gb_per_chip'])})",
              f"cache per chip          {gb(p['cache_gb_per_chip'])}"]
    if p["mode"] == "train":
        lora = p.get("lora")
        if lora is None:
            lines[-2:] = [f"master weights per chip {gb(p['master_weights_gb_per_chip'])} fp32 (experts "
                          f"{gb(p['expert_weights_gb_per_chip'])})"]
            moments = "AdamW moments, fp32"
        else:
            experts = "int8" if p["quantize"] else "bf16"
            lines[-2:] = [f"frozen base per chip    {gb(p['frozen_weights_gb_per_chip'])} (bf16; experts "
                          f"{gb(p['expert_weights_gb_per_chip'])} {experts}): no master copy, no optimizer state",
                          f"LoRA adapters           rank {lora['rank']}, α {lora['alpha']:g} on "
                          f"{', '.join(lora['targets'])}: {lora['adapter_params'] / 1e6:.1f} M parameters",
                          f"adapter masters         {gb(p['master_weights_gb_per_chip'])} fp32 per chip"]
            moments = "AdamW moments of the adapters only, fp32"
        lines += [f"optimizer state         {gb(p['optimizer_state_gb_per_chip'])} ({moments})",
                  f"remat                   {p['remat']} · {p['micro_batches']} micro-batch(es) · gradients and "
                  f"activations in the temporaries" if p["compiled"] else
                  f"remat                   {p['remat']} · {p['micro_batches']} micro-batch(es)"]
    if p["compiled"]:
        lines += [f"temporaries per chip    {gb(p['temp_gb_per_chip'])}", f"program code            {gb(p['code_gb'])}"]
    copy = p.get("decode_expert_copy_gb_per_chip")
    lines.append(f"peak per chip           {gb(p['peak_gb_per_chip'])} of {p['hbm_gb']:.0f} GB: "
                 f"{'fits' if p['fits'] else 'DOES NOT FIT'}" + (f" (with the engine's per-group copy of the expert "
                                                                  f"weights for decode, {gb(copy)})" if copy else ""))
    if p["compiled"]:
        kinds = ", ".join(f"{k} {v / GB:.3f}" for k, v in p["collective_bytes_by_kind"].items() if v)
        lines.append(f"collectives per step    {p['collective_bytes_per_step'] / GB:.3f} GB ({kinds or 'none'})")
        lines.append(f"expert-weight gathers   {p['expert_weight_gather_bytes'] / GB:.3f} GB")
    else:
        lines.append(f"collectives per step    ≈ {p['collective_bytes_per_step'] / GB:.3f} GB (arithmetic)")
    if p["compiled"]:
        lines.append(f"FLOPs per chip          {p['flops_per_chip'] / 1e12:.3f} T; HBM bytes "
                     f"{p['bytes_accessed_per_chip'] / GB:.2f} GB (compiled HLO, loops × trip counts; the "
                     f"compiler's cost_analysis, loop bodies once: {p['compiler_flops_per_chip'] / 1e12:.3f} T, "
                     f"{p['compiler_bytes_per_chip'] / GB:.2f} GB)")
        if p.get("burst_setup_hbm_bytes_per_chip"):
            lines.append(f"per decode call         {p['burst_setup_hbm_bytes_per_chip'] / GB:.2f} GB of HBM bytes "
                         f"outside the decode loop (once per burst of tokens)")
        for key, rows in (("HBM bytes", p.get("costliest_by_hbm_bytes")), ("FLOPs", p.get("costliest_by_flops"))):
            if rows:
                lines.append(f"costliest operations of the step by {key} (GB of HBM, TFLOP, executions, op, source):")
                lines += [f"  {r['hbm_bytes'] / GB:8.3f} {r['flops'] / 1e12:7.3f} {r['executions']:5d}  {r['op']:<14s} "
                          f"{r['source'][-100:]}" for r in rows]
        if p["loops_counted_once"]:
            lines.append(f"loops counted once      {len(p['loops_counted_once'])} (trip count unknown): "
                         f"{'; '.join(p['loops_counted_once'])[:300]}")
    else:
        lines.append(f"FLOPs per chip          {p['flops_per_chip'] / 1e12:.3f} T; HBM bytes "
                     f"{p['bytes_accessed_per_chip'] / GB:.2f} GB (arithmetic)")
    lines += [
              f"step time (estimate)    {p['step_ms_estimate']:.2f} ms; HBM floor {p['hbm_floor_ms']:.2f} ms "
              f"(weights + cache per chip / HBM bandwidth)"]
    for c in p.get("candidates", []):
        lines.append(f"  candidate {' × '.join(f'{a} {s}' for a, s in c['mesh'].items())}: peak "
                     f"{c['peak_gb_per_chip']:.1f} GB {'fits' if c['fits'] else 'no fit'}, "
                     f"≈ {c['step_ms_estimate']:.2f} ms")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ compiler environment
REEXEC_MARK = "M1JAX_PLAN_REEXEC"


def tpu_python() -> str | None:
    """A Python with libtpu for deviceless compilation: `$M1JAX_TPU_PYTHON`, else `.venv-tpu` of this checkout."""
    candidates = [os.environ.get("M1JAX_TPU_PYTHON"), Path(__file__).resolve().parents[1] / ".venv-tpu/bin/python"]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    return None


def compiler_env_ready() -> bool:
    return libtpu_available() and os.environ.get("JAX_PLATFORMS") == "cpu" and "TPU_ACCELERATOR_TYPE" in os.environ


def ensure_tpu_compiler(argv: list[str]) -> None:
    """Make this process able to compile for TPU deviceless: re-exec under the deviceless environment (this
    Python if it has libtpu, else `tpu_python()`), or raise `PlanError` saying how to get libtpu."""
    if compiler_env_ready():
        return
    python = sys.executable if libtpu_available() else tpu_python()
    if python is None or os.environ.get(REEXEC_MARK):
        raise PlanError(LIBTPU_HINT + "\n(or pass --no-compile for the shape arithmetic alone)")
    env = dict(os.environ, **deviceless_env(), **{REEXEC_MARK: "1"})
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    os.execve(python, [python, "-m", "m1jax", *argv], env)
