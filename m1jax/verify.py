"""`m1jax verify`: checks of a loaded checkpoint that catch silently wrong output.

Without a reference, the model is compared with itself along paths that must agree (on a probe batch of
`batch` random token sequences of `seq_len` tokens, fp32 matmuls at full precision):

* weights finite / weight scale: no NaN or inf in any parameter; per layer (and per expert) the RMS of every
  ≥ 2-D weight within `SCALE_RATIO`× of the median over its peers (the same tensor in the other layers / experts);
* activations finite: every layer's output and the logits of the fp32 forward;
* bf16 vs fp32: the model in bfloat16 (weights and compute; router gates fp32) against fp32;
* lightning blocked vs recurrent: the `lightning_impl` the model runs with against the token-by-token
  recurrence (`lightning_impl="recurrent"`), and Pallas against XLA where the backend compiles Pallas;
* chunked vs one-shot prefill: the prompt through the cache in chunks (not block-aligned) against one forward;
* cached decode vs full forward: the last tokens decoded one at a time against the full forward;
* sharded vs unsharded: the forward on a mesh over every local device (skipped on one device);
* routing: experts that receive no token (dead) or more than `OVERLOAD`× their fair share (reported as a
  warning: an imbalance is a property of training, not a port bug);
* with `reference="transformers"`: every layer's output and the logits against transformers'
  `MiniMaxForCausalLM` (CPU fp32, `m1jax.hf_reference`), and greedy continuations of a prompt.

Each comparison is the relative error ‖a − b‖₂ / ‖b‖₂ over all elements, for the logits (the check's number)
and for every layer's output; the first layer over the threshold is where the paths diverge.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SAME_MATH_TOL = 1e-4  # fp32 paths that compute the same function
BF16_TOL = 5e-2  # bf16 against fp32
SCALE_RATIO = 10.0  # weight RMS against the median of its peers
OVERLOAD = 4.0  # an expert's share of assignments against 1/E
GREEDY_TOKENS = 8
PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclasses.dataclass
class Check:
    """One check's outcome: `value` measured against `threshold` (fails when `value > threshold`), `layer`
    where it first goes wrong (None: nowhere or not per layer), `detail` one line for a person."""

    name: str
    status: str
    value: float | None = None
    threshold: float | None = None
    layer: int | None = None
    detail: str = ""


@dataclasses.dataclass
class VerifyReport:
    """All checks of one model; `ok` when none failed."""

    model: str
    summary: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def first_divergence(self) -> Check | None:
        """The failed check with the smallest layer (None when no failed check names a layer)."""
        located = [c for c in self.checks if c.status == FAIL and c.layer is not None]
        return min(located, key=lambda c: c.layer) if located else None

    def to_json(self) -> dict:
        first = self.first_divergence
        return {"model": self.model, "summary": self.summary, "ok": self.ok,
                "first_divergence_layer": None if first is None else first.layer,
                "checks": [dataclasses.asdict(c) for c in self.checks]}

    def format(self) -> str:
        """The one-screen report: a row per check (status, measured value, threshold, layer, detail)."""
        lines = [f"m1jax verify: {self.model}", f"  {self.summary}", "",
                 f"  {'check':<34}{'status':<8}{'measured':>11}{'threshold':>11}  detail"]
        for c in self.checks:
            lines.append(f"  {c.name:<34}{c.status.upper():<8}{_num(c.value):>11}{_num(c.threshold):>11}  "
                         f"{c.detail}")
        failed = [c for c in self.checks if c.status == FAIL]
        first = self.first_divergence
        lines.append("")
        if first is not None:
            lines.append(f"  first divergence: layer {first.layer} ({first.name})")
        lines.append(f"  RESULT: {'PASS' if not failed else 'FAIL'} ({len(failed)} of {len(self.checks)} checks "
                     f"failed)")
        return "\n".join(lines)


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)) or float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.2e}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.3g}"


# ------------------------------------------------------------------------------------------- comparisons
def rel_err(a, b) -> float:
    """‖a − b‖₂ / ‖b‖₂ in float64 (inf when either holds a NaN or inf)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(name: str, got, want, threshold: float, what: str = "") -> Check:
    """A check from two forwards `(logits, [layer outputs])`: the logits' relative error against `threshold`,
    the first layer whose output's relative error exceeds it."""
    (logits_a, hidden_a), (logits_b, hidden_b) = got, want
    err = rel_err(logits_a, logits_b)
    per_layer = [rel_err(a, b) for a, b in zip(hidden_a, hidden_b, strict=True)]
    first = next((i for i, e in enumerate(per_layer) if e > threshold), None)
    worst = int(np.argmax(per_layer)) if per_layer else None
    failed = err > threshold or first is not None
    detail = what
    if per_layer:
        detail += f"{'; ' if what else ''}worst layer {worst}: {per_layer[worst]:.1e}"
    return Check(name, FAIL if failed else PASS, err, threshold, first if failed else None, detail)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxL, cache):
    out = nnx.merge(graphdef, state)(tokens_BxL, cache=cache, return_routing=True, return_hidden=True)
    return out.logits, out.layer_hidden, out.routing, out.cache


_forward_on_mesh = jax.jit(_forward.__wrapped__, static_argnums=0)  # its own cache of mesh-traced programs


class _Runner:
    """Forwards of one model variant (jitted once per shape), returning host arrays."""

    def __init__(self, model, mesh=None):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        self.fn = _forward if mesh is None else _forward_on_mesh

    def __call__(self, tokens_BxL, cache=None):
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else _nullcontext()
        with ctx:
            logits, hidden, routing, cache = self.fn(self.graphdef, self.state, jnp.asarray(tokens_BxL), cache)
        return np.asarray(logits), [np.asarray(h) for h in hidden], routing, cache

    def full(self, tokens_BxL):
        logits, hidden, routing, _ = self(tokens_BxL)
        return (logits, hidden), routing

    def chunked(self, tokens_BxL, chunks: list[int]):
        """(logits, layer outputs) of the tokens fed through the cache `chunks` tokens at a time."""
        from m1jax.cache import init_cache

        b, t = tokens_BxL.shape
        cache = init_cache(self.config, b, t)
        logits, hidden, start = [], [], 0
        for n in chunks:
            lg, hs, _, cache = self(tokens_BxL[:, start:start + n], cache)
            logits.append(lg)
            hidden.append(hs)
            start += n
        return (np.concatenate(logits, 1), [np.concatenate(hs, 1) for hs in zip(*hidden, strict=True)])


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def variant(model, **changes):
    """`model` with runtime config `changes` (dtype, lightning_impl, ...), sharing its arrays (each cast to the
    dtype the changed config declares for it)."""
    from m1jax.loading import abstract_model

    config = model.config.replace(**changes)
    graphdef, abstract = abstract_model(config)
    values = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    for path, var in nnx.to_flat_state(abstract):
        want = var.get_value().dtype
        value = values[path]
        var.set_value(value if value.dtype == want else value.astype(want))
    return nnx.merge(graphdef, abstract)


# ---------------------------------------------------------------------------------------------- checks
def _layer_arrays(model) -> list[tuple[tuple, tuple, jax.Array]]:
    """(path, logical axes, array) of every parameter, one entry per layer for a scanned model."""
    from m1jax.layer_stack import per_layer_arrays

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    values = per_layer_arrays(model.config, {p: v.get_value() for p, v in flat})
    axes = per_layer_arrays(model.config, {p: v.get_metadata()["logical_axes"] for p, v in flat},
                            take=lambda ax, g: ax[1:])
    return [(path, tuple(axes[path]), values[path]) for path in values]


def _layer_of(path) -> int | None:
    return int(path[1]) if len(path) > 1 and path[0] == "layers" else None


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def check_weights_finite(entries) -> Check:
    bad = [path for path, _, x in entries
           if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x)))]
    if not bad:
        return Check("weights finite", PASS, 0, 0, detail=f"{len(entries)} tensors")
    layers = [_layer_of(p) for p in bad if _layer_of(p) is not None]
    return Check("weights finite", FAIL, len(bad), 0, min(layers) if layers else None,
                 f"NaN/inf in {_name(bad[0])}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


def check_weight_scale(entries) -> Check:
    """Per layer (and per expert of an expert stack), each ≥ 2-D float weight's RMS against the median RMS of
    its peers (the same parameter in every layer, every expert): fails beyond `SCALE_RATIO`× either way."""
    groups: dict[tuple, list] = {}
    for path, axes, x in entries:
        layer = _layer_of(path)
        if layer is None or x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        key = ("layers", "*", *path[2:])
        if axes and axes[0] == "experts":
            rms = np.asarray(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))))
            groups.setdefault(key, []).extend((layer, e, float(r)) for e, r in enumerate(rms))
        else:
            groups.setdefault(key, []).append((layer, None, float(jnp.sqrt(jnp.mean(jnp.square(
                x.astype(jnp.float32)))))))
    worst = (1.0, None)
    for key, rows in groups.items():
        rms = np.array([r for _, _, r in rows])
        finite = rms[np.isfinite(rms)]
        if len(finite) < 3:
            continue  # with fewer than three peers there is no majority to call one of them off
        median = float(np.median(finite))
        for (layer, expert, r) in rows:
            if not np.isfinite(r):
                continue
            ratio = math.inf if min(r, median) == 0 else max(r / median, median / r)
            if ratio > worst[0]:
                worst = (ratio, (key, layer, expert, len(finite)))
    ratio, where = worst
    if where is None:
        return Check("weight scale vs peers", PASS, ratio, SCALE_RATIO, detail=f"{len(groups)} weight groups")
    key, layer, expert, peers = where
    what = f"layer {layer}" + (f" expert {expert}" if expert is not None else "") + f" {_name(key[2:])}"
    failed = ratio > SCALE_RATIO
    return Check("weight scale vs peers", FAIL if failed else PASS, ratio, SCALE_RATIO,
                 layer if failed else None, f"worst: {what} (RMS / median of {peers} peers)")


def check_activations(logits, hidden) -> Check:
    bad = [i for i, h in enumerate(hidden) if not np.all(np.isfinite(h))]
    peak = [float(np.max(np.abs(h))) if np.all(np.isfinite(h)) else math.inf for h in hidden]
    if bad or not np.all(np.isfinite(logits)):
        where = f"layer {bad[0]} output" if bad else "logits"
        return Check("activations finite", FAIL, len(bad), 0, bad[0] if bad else None, f"NaN/inf first in {where}")
    i = int(np.argmax(peak))
    return Check("activations finite", PASS, 0, 0, detail=f"max |h| {peak[i]:.3g} at layer {i}")


def check_routing(routing, config) -> Check:
    """Dead experts (no assignment) and overloaded ones (share > OVERLOAD/E) per layer of the fp32 forward."""
    e = config.num_local_experts
    worst_load, dead, where = 0.0, [], None
    for i, stats in enumerate(routing):
        tokens_E = np.asarray(stats["tokens_per_expert"], np.float64)
        load_E = tokens_E / max(tokens_E.sum(), 1.0) * e
        if float(load_E.max()) > worst_load:
            worst_load, where = float(load_E.max()), (i, int(np.argmax(load_E)))
        dead += [(i, int(x)) for x in np.nonzero(tokens_E == 0)[0]]
    assignments = float(np.sum(np.asarray(routing[0]["tokens_per_expert"]))) if routing else 0.0
    detail = f"{len(dead)} dead" + (f" (first: layer {dead[0][0]} expert {dead[0][1]})" if dead else "")
    if where is not None:
        detail += f"; busiest: layer {where[0]} expert {where[1]}, {worst_load:.2f}× its share of " \
                  f"{assignments:.0f}"
    bad = dead or worst_load > OVERLOAD
    return Check("routing: dead / overloaded", WARN if bad else PASS, worst_load, OVERLOAD,
                 dead[0][0] if dead else (where[0] if bad else None), detail)


def _mesh_shape(n: int, config) -> dict[str, int]:
    expert = math.gcd(n, config.num_local_experts)
    return {"expert": expert, "tensor": n // expert}


def check_sharded(model, tokens, want) -> Check:
    from m1jax.loading import param_shardings
    from m1jax.sharding import make_mesh

    n = jax.device_count()
    if n == 1:
        return Check("sharded vs unsharded", SKIP, detail="one device: nothing to shard over")
    shape = _mesh_shape(n, model.config)
    mesh = make_mesh(shape)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(state, mesh)))
    got, _ = _Runner(sharded, mesh).full(tokens)
    mesh_text = ", ".join(f"{k}={v}" for k, v in shape.items() if v > 1)
    return compare("sharded vs unsharded", got, want, SAME_MATH_TOL, f"mesh {mesh_text}")


def check_transformers(model, tokens, want) -> list[Check]:
    """Every layer's output and the logits against transformers (CPU fp32), and greedy continuations."""
    try:
        import torch

        from m1jax.hf_reference import transformers_model
    except ImportError as e:
        return [Check("transformers reference", SKIP, detail=f"torch/transformers not importable ({e})")]
    try:
        hf = transformers_model(model)
    except ValueError as e:
        return [Check("transformers reference", SKIP, detail=str(e))]
    captured: list = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o)
                                                                          .detach().numpy()))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            ref_logits = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    checks = [compare("vs transformers: layers, logits", want, (ref_logits, captured), SAME_MATH_TOL,
                      "MiniMaxForCausalLM, CPU fp32")]
    checks.append(_greedy_agreement(model, hf, np.asarray(tokens)[0, :min(16, tokens.shape[1])]))
    return checks


def _greedy_agreement(model, hf, prompt) -> Check:
    """`GREEDY_TOKENS` greedy tokens from both models (m1jax through its cache, transformers by full forwards);
    a first disagreement at a near-tie of the reference (top-2 logit gap < 1e-4 of the logit scale) passes."""
    import torch

    from m1jax.cache import init_cache

    runner = _Runner(model)
    cache = init_cache(model.config, 1, len(prompt) + GREEDY_TOKENS)
    logits, _, _, cache = runner(np.asarray([prompt]), cache)
    ours, theirs, gap = list(prompt), list(prompt), None
    for _ in range(GREEDY_TOKENS):
        ours.append(int(np.argmax(logits[0, -1])))
        logits, _, _, cache = runner(np.asarray([[ours[-1]]]), cache)
        with torch.no_grad():
            row = hf(torch.tensor([theirs])).logits[0, -1].numpy()
        theirs.append(int(np.argmax(row)))
        if gap is None and ours[-1] != theirs[-1]:
            top2 = np.sort(row)[-2:]
            gap = float((top2[1] - top2[0]) / max(np.max(np.abs(row)), 1e-30))
    new_ours, new_theirs = ours[len(prompt):], theirs[len(prompt):]
    agree = next((i for i, (a, b) in enumerate(zip(new_ours, new_theirs, strict=True)) if a != b), GREEDY_TOKENS)
    tie = gap is not None and gap < 1e-4
    status = PASS if agree == GREEDY_TOKENS or tie else FAIL
    detail = f"{agree} of {GREEDY_TOKENS} agree after a {len(prompt)}-token prompt"
    if gap is not None:
        detail += f" (reference top-2 gap there: {gap:.1e}{', a near-tie' if tie else ''})"
    return Check("vs transformers: greedy tokens", status, agree / GREEDY_TOKENS, None, None, detail)


# ------------------------------------------------------------------------------------------------ driver
def verify(model, *, name: str = "model", reference: str | None = None, seq_len: int | None = None,
           batch: int = 2, seed: int = 0) -> VerifyReport:
    """Run every check on `model` (an `MiniMaxM1`; it is compared in fp32, so pass it loaded in fp32 or it is
    cast) over `batch` random sequences of `seq_len` tokens (default: three chunks of 1.5 lightning blocks + 1,
    so blocks and chunks do not align). `reference`: None or "transformers"."""
    from m1jax.pallas_kernels.lightning.api import resolve_impl

    if reference not in (None, "transformers"):
        raise ValueError(f"reference must be None or 'transformers', got {reference!r}")
    config = model.config
    chunk = config.block_size + config.block_size // 2 + 1
    seq_len = 3 * chunk if seq_len is None else int(seq_len)
    if seq_len < 5 or batch < 1:
        raise ValueError(f"verify needs seq_len ≥ 5 and batch ≥ 1, got seq_len={seq_len}, batch={batch}")
    chunk = -(-seq_len // 3)
    base = variant(model, dtype="float32", param_dtype="float32")
    config = base.config
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
    impl = resolve_impl(config.lightning_impl)
    kinds = "".join("L" if t == "linear_attention" else "S" for t in config.layer_types)
    summary = (f"{config.num_hidden_layers} layers {kinds if len(kinds) <= 16 else kinds[:16] + '…'}, "
               f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, lightning {impl}; probe "
               f"{batch}×{seq_len} tokens; {jax.device_count()} {jax.default_backend()} device(s)")
    checks: list[Check] = []
    with jax.default_matmul_precision("highest"):
        entries = _layer_arrays(base)
        checks += [check_weights_finite(entries), check_weight_scale(entries)]
        runner = _Runner(base)
        want, routing = runner.full(tokens)
        checks.append(check_activations(*want))
        bf16 = variant(base, dtype="bfloat16", param_dtype="bfloat16")
        checks.append(compare("bf16 vs fp32", _Runner(bf16).full(tokens)[0], want, BF16_TOL,
                              "bf16 weights and compute"))
        if config.lightning_layers:
            recurrent = variant(base, lightning_impl="recurrent")
            checks.append(compare("lightning blocked vs recurrent", _Runner(recurrent).full(tokens)[0], want,
                                  SAME_MATH_TOL, f"{impl} vs token-by-token"))
            if impl == "pallas":
                xla = variant(base, lightning_impl="xla")
                checks.append(compare("lightning pallas vs xla", want, _Runner(xla).full(tokens)[0], SAME_MATH_TOL))
        else:
            checks.append(Check("lightning blocked vs recurrent", SKIP, detail="no lightning layers"))
        sizes = [chunk] * (seq_len // chunk) + ([seq_len % chunk] if seq_len % chunk else [])
        checks.append(compare("chunked vs one-shot prefill", runner.chunked(tokens, sizes), want, SAME_MATH_TOL,
                              f"chunks of {chunk}"))
        steps = seq_len - 2 * chunk  # the chunked prefill's first two chunks, then one token at a time
        decoded = runner.chunked(tokens, [chunk, chunk] + [1] * steps)
        checks.append(compare("cached decode vs full forward", _last(decoded, steps), _last(want, steps),
                              SAME_MATH_TOL, f"last {steps} tokens one at a time"))
        checks.append(check_sharded(base, tokens, want))
        checks.append(check_routing(routing, config))
        if reference == "transformers":
            checks += check_transformers(base, tokens, want)
    return VerifyReport(name, summary, checks)


def _last(forward, n: int):
    """(logits, layer outputs) of the last `n` positions."""
    logits, hidden = forward
    return logits[:, -n:], [h[:, -n:] for h in hidden]
