"""The trainer's memory features on CPU: chunked log-probs equal the unchunked fp32 head (values and gradients),
remat chosen in the run config leaves the gradients unchanged, fp32 masters are cast where each weight is read
(no second full-size copy), and the optimizer state and restores are built abstract-first in their shardings."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from m1jax.train import model_setup
from m1jax.train.checkpointing import TrainCheckpointer
from m1jax.train.logprobs import head_logprobs, sequence_logprobs
from m1jax.train.model_setup import build_model, is_abstract
from m1jax.train.run_config import RunConfigError, load_run_config
from m1jax.train.update import (
    LossSpec,
    abstract_optimizer_state,
    accumulate_gradients,
    batch_loss,
    cast_params,
    compute_model,
    init_optimizer_state,
)

from m1jax.sharding import make_mesh

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "train" / "cispo_reverse3.yaml"


def run_config(*overrides: str, output_dir="/tmp/unused"):
    return load_run_config(EXAMPLE, "cispo", [f"output_dir={output_dir}", *overrides])


def scanned_overrides(policy: str, dtype: str = "float32") -> list[str]:
    """The example's model with 4 layers (lightning, softmax) × 2, scanned as 2 groups, remat `policy`."""
    return ["model.config.num_hidden_layers=4", "model.config.attn_type_list=[0, 1, 0, 1]",
            "model.scan_layers=true", f"model.remat={policy}", f"model.dtype={dtype}"]


def batch(rows=4, length=11, seed=0):
    """CISPO rows: a response mask after 5 prompt tokens, advantages, old log-probs near 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 14, (rows, length)).astype(np.int32)
    valid = np.arange(length)[None] < rng.integers(7, length + 1, rows)[:, None]
    mask = (valid & (np.arange(length)[None] >= 5)).astype(np.float32)
    return {"tokens_BxL": jnp.asarray(tokens), "valid_BxL": jnp.asarray(valid), "mask_BxL": jnp.asarray(mask),
            "old_logp_BxL": jnp.asarray(rng.normal(-2.5, 0.3, (rows, length)).astype(np.float32)),
            "adv_B": jnp.asarray(rng.normal(0, 1, rows).astype(np.float32)),
            "denom_B": jnp.full((rows,), float(mask.sum()), jnp.float32)}


def grads_of(bundle, b, spec=LossSpec("cispo", entropy_bonus=True)):
    grads, stats = accumulate_gradients(bundle.params, b, graphdef=bundle.graphdef, param_dtypes=bundle.param_dtypes,
                                        spec=spec, micro_batches=1, entropy_coef=0.1)
    return jax.tree.leaves(grads), stats


@pytest.fixture(scope="module")
def bundle():
    return build_model(run_config().model, seed=0)


# ------------------------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("seq_chunk, vocab_chunk", [pytest.param(3, None, marks=pytest.mark.slow),
                                                    pytest.param(4, 4, marks=pytest.mark.slow), (None, 5), (100, 100)])
def test_chunked_logprobs_equal_the_unchunked_head(bundle, seq_chunk, vocab_chunk):
    """Values and gradients (w.r.t. every parameter) of log-probs and entropies: strided sequence chunks are the
    same arithmetic; vocabulary chunks sum in another order (fp32 tolerance). 14 columns in chunks of 4 or 5
    leave padding columns, 10 positions in chunks of 3 or 4 padding positions."""
    b = batch()
    weights_BxL = jnp.asarray(np.random.default_rng(1).normal(size=b["tokens_BxL"].shape).astype(np.float32))

    def f(params, **kw):
        model = compute_model(bundle.graphdef, params, bundle.param_dtypes)
        out = sequence_logprobs(model, b["tokens_BxL"], valid_BxL=b["valid_BxL"], with_entropy=True, **kw)
        return jnp.sum(out.logp_BxL * weights_BxL) + jnp.sum(out.entropy_BxL * weights_BxL ** 2), out

    (v0, ref), g0 = jax.value_and_grad(f, has_aux=True)(bundle.params)
    (v1, out), g1 = jax.value_and_grad(lambda p: f(p, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk),
                                       has_aux=True)(bundle.params)
    tol = {"rtol": 1e-6, "atol": 1e-6} if vocab_chunk is None else {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(out.logp_BxL, ref.logp_BxL, **tol)
    np.testing.assert_allclose(out.entropy_BxL, ref.entropy_BxL, **tol)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(c, a, **tol)
    assert np.all(np.isfinite(np.asarray(out.logp_BxL)))


def test_chunked_head_never_holds_the_full_logits(bundle):
    """With both chunks set, no value in the gradient's program has the `[B, T, V]` shape of the full logits."""
    model = compute_model(bundle.graphdef, bundle.params, bundle.param_dtypes)
    h = jnp.ones((4, 12, model.config.hidden_size))
    t = jnp.ones((4, 12), jnp.int32)

    def shapes(**kw):
        jaxpr = jax.make_jaxpr(jax.grad(lambda h: jnp.sum(head_logprobs(model, h, t, with_entropy=True, **kw)[1])))(h)
        found = set()

        def walk(jp):
            for eqn in jp.eqns:
                found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
                for p in eqn.params.values():
                    for q in p if isinstance(p, tuple | list) else (p,):
                        inner = getattr(q, "jaxpr", q)
                        if hasattr(inner, "eqns"):
                            walk(inner)

        walk(jaxpr.jaxpr)
        return found

    v = model.config.vocab_size
    assert (4, 12, v) in shapes()
    chunked = shapes(seq_chunk=4, vocab_chunk=4)
    assert not any(len(s) == 3 and s[0] == 4 and s[-1] == v for s in chunked), sorted(chunked)


def test_bad_chunk_values_are_refused(bundle):
    model = compute_model(bundle.graphdef, bundle.params, bundle.param_dtypes)
    with pytest.raises(ValueError, match="seq_chunk"):
        head_logprobs(model, jnp.ones((1, 3, model.config.hidden_size)), jnp.ones((1, 3), jnp.int32), seq_chunk=0)
    with pytest.raises(RunConfigError, match="model.logprob_vocab_chunk"):
        run_config("model.logprob_vocab_chunk=0")


@pytest.mark.slow
def test_chunked_update_equals_unchunked_on_a_mesh(bundle):
    """The CISPO gradient with chunked log-probs on the 8-device mesh (data 2 × tensor 4: the head's vocabulary
    split over tensor) equals the unchunked single-device one."""
    b = batch(rows=4)
    g_ref, s_ref = grads_of(bundle, b)
    mesh = make_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        sharded = build_model(run_config().model, seed=0, mesh=mesh)
        g, s = grads_of(sharded, b, LossSpec("cispo", entropy_bonus=True, seq_chunk=4, vocab_chunk=8))
    assert float(s["policy_loss"]) == pytest.approx(float(s_ref["policy_loss"]), rel=1e-5)
    for a, c in zip(g_ref, g, strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- remat
@pytest.mark.parametrize("policy", ["full", pytest.param("save_dots", marks=pytest.mark.slow)])
def test_remat_from_the_run_config_keeps_the_gradients(policy):
    """`model.remat` in the run config reaches the scanned layer groups and the CISPO gradient is the no-remat
    one (fp32: the recomputed forward is the same arithmetic)."""
    b = batch()
    plain = build_model(run_config(*scanned_overrides("none")).model, seed=0)
    remat = build_model(run_config(*scanned_overrides(policy)).model, seed=0)
    assert remat.config.remat == policy and remat.config.scan_groups == 2
    jaxpr = str(jax.make_jaxpr(lambda p: grads_of(remat, {**b}, LossSpec("cispo"))[0])(remat.params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    g0, s0 = grads_of(plain, b)
    g1, s1 = grads_of(remat, b)
    assert float(s1["policy_loss"]) == float(s0["policy_loss"])
    for a, c in zip(g0, g1, strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-7)


def test_unknown_remat_policy_names_the_field():
    with pytest.raises(RunConfigError, match="model.remat"):
        run_config("model.remat=sometimes")


# ------------------------------------------------------------------------------------------- cast at use
@pytest.mark.slow  # two scanned models' gradients (~18 s)
def test_bf16_masters_are_cast_where_read_with_the_same_gradients():
    """bf16 compute: the update's model holds the fp32 masters and each layer casts its weights inside the layer
    scan; the loss equals casting the whole tree first, the gradients to bf16 precision, and no bf16 copy of a
    stacked `[G, ...]` parameter is made outside the scan."""
    bf16 = build_model(run_config(*scanned_overrides("none", "bfloat16")).model, seed=0)
    b = batch()
    spec = LossSpec("cispo")
    kw = dict(graphdef=bf16.graphdef, param_dtypes=bf16.param_dtypes, spec=spec, aux_weight=1.0)

    def cast_first(params, b):
        model_params = cast_params(params, bf16.param_dtypes)
        return batch_loss(model_params, b, **{**kw, "param_dtypes": tuple(jnp.dtype(x.dtype).name for x in
                                                                           jax.tree.leaves(model_params))})

    (l0, _), g0 = jax.value_and_grad(cast_first, has_aux=True)(bf16.params, b)
    (l1, _), g1 = jax.value_and_grad(batch_loss, has_aux=True)(bf16.params, b, **kw)
    assert float(l1) == float(l0)  # the same forward arithmetic
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        # the same to bf16 precision (where a gradient sums contributions, e.g. the embedding rows, it now sums
        # them in fp32 after the cast instead of in bf16 before it)
        a, c = np.asarray(a, np.float32), np.asarray(c)
        assert c.dtype == np.float32
        assert np.max(np.abs(c - a)) <= 2 ** -7 * max(np.max(np.abs(a)), 1e-30)

    stacked = {x.shape for path, x in jax.tree_util.tree_leaves_with_path(bf16.params)
               if "stacked_layers" in jax.tree_util.keystr(path) and x.ndim >= 3}
    assert stacked

    def top_level_bf16_casts(f):
        jaxpr = jax.make_jaxpr(f)(bf16.params, b).jaxpr
        return {tuple(e.outvars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
                and e.params["new_dtype"] == jnp.bfloat16}

    assert top_level_bf16_casts(lambda p, b: cast_first(p, b)[0]) & stacked  # the old way copies every stack
    assert not top_level_bf16_casts(lambda p, b: batch_loss(p, b, **kw)[0]) & stacked


# ------------------------------------------------------------------------------------ sharded from the start
def test_optimizer_state_is_created_in_the_parameters_sharding(bundle):
    mesh = make_mesh({"data": 2, "tensor": 4})
    cfg = run_config()
    with jax.set_mesh(mesh):
        sharded = build_model(cfg.model, seed=0, mesh=mesh)
        opt = init_optimizer_state(sharded.params, cfg.optimizer, 0)
        abstract = abstract_optimizer_state(sharded.params, cfg.optimizer, 0)
    params = jax.tree.leaves(sharded.params)
    adam = [s for s in jax.tree.leaves(opt, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")][0]
    for moments in (adam.mu, adam.nu):
        for p, m in zip(params, jax.tree.leaves(moments), strict=True):
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim) and m.dtype == jnp.float32
    assert any(any(s is not None for s in p.sharding.spec) for p in params)
    for real, shape in zip(jax.tree.leaves(opt), jax.tree.leaves(abstract), strict=True):
        assert real.shape == shape.shape and real.sharding.is_equivalent_to(shape.sharding, real.ndim)


def test_resume_restores_into_the_abstract_sharded_state(tmp_path, monkeypatch):
    """A run whose checkpoint directory holds a checkpoint builds no parameters: they and the optimizer state
    stay abstract (shapes and shardings) until orbax restores straight into them; a new run from that training
    checkpoint (`model.checkpoint`) reads its parameters the same way."""
    from m1jax.train.cispo_trainer import CISPOTrainer

    overrides = ["mesh={data: 2, tensor: 4}", "log.progress=false"]
    cfg = run_config(*overrides, output_dir=tmp_path / "run")
    first = CISPOTrainer(cfg)
    first.step = 3
    first.save_checkpoint()
    first.close()

    def no_init(*a, **k):
        raise AssertionError("a resumed run initialised its parameters")

    monkeypatch.setattr(model_setup, "_init", no_init)
    second = CISPOTrainer(cfg)
    assert is_abstract(second.params) and is_abstract(second.opt_state)
    assert second.maybe_resume() == 3
    assert not is_abstract(second.params) and not is_abstract(second.opt_state)
    for a, c in zip(jax.tree.leaves((first.params, first.opt_state)),
                    jax.tree.leaves((second.params, second.opt_state)), strict=True):
        assert c.sharding.is_equivalent_to(a.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    second.close()

    mesh = make_mesh({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh):
        spec = run_config(f"model={{checkpoint: {tmp_path / 'run'}}}").model
        again = build_model(spec, seed=0, mesh=mesh)
    for a, c in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        assert c.sharding.is_equivalent_to(a.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    ckpt = TrainCheckpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == 3
    ckpt.close()


# ------------------------------------------------------------------------------------------ rollout mesh
SMALL = ["steps=1", "rollout.num_prompts=4", "rollout.group_size=4", "cispo.num_minibatches=2", "log.progress=false",
         "optimizer.eps=1e-6", "mesh={data: 2, tensor: 4}"]


@pytest.mark.slow
def test_rollouts_on_their_own_mesh_give_the_same_step(tmp_path):
    """Rollouts on an inference layout (`rollout.mesh`: weights over tensor × expert, resharded from the update's
    data × tensor layout each step) sample the same completions and give the same update as rollouts on the
    update's mesh."""
    from m1jax.train.cispo_trainer import CISPOTrainer

    runs = {}
    for name, extra in (("same", []), ("own", ["rollout.mesh={tensor: 4, expert: 2}"])):
        trainer = CISPOTrainer(run_config(*SMALL, *extra, output_dir=tmp_path / name))
        [runs[name]] = trainer.run(resume=False)
        if extra:
            model = trainer.rollout_model()
            w1 = [x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                  if "w1" in jax.tree_util.keystr(p)][0]
            assert w1.sharding.mesh.shape["expert"] == 2 and "expert" in str(w1.sharding.spec)
        runs[name + "_params"] = jax.tree.leaves(trainer.params)
        trainer.close()
    a, b = runs["same"], runs["own"]
    for key in ("reward_mean", "reward_std", "response_len_mean"):
        assert a[key] == b[key], key
    for key in ("loss", "grad_norm", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for x, y in zip(runs["same_params"], runs["own_params"], strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_rollout_mesh_of_the_wrong_size_names_the_field(tmp_path):
    from m1jax.train.cispo_trainer import CISPOTrainer

    with pytest.raises(RunConfigError, match="rollout.mesh"):
        CISPOTrainer(run_config(*SMALL, "rollout.mesh={tensor: 3}", output_dir=tmp_path / "bad"))
