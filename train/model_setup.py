"""The model a run trains: built from a preset, an inline HF config, an HF / m1jax checkpoint, or a previous
training run; held as fp32 master parameters plus the dtypes the forward pass casts them to.

    master θ (fp32, optimizer state fp32)  ──cast──▶  compute θ (config.param_dtype; router gates fp32)

With a mesh, parameters are created (`init_sharded`), read (`from_pretrained`) or restored (orbax, into the
abstract sharded state) directly in the sharding of the m1jax rules table (`m1jax.sharding`): nothing passes
through one device or the host. `build_model(..., abstract=True)` returns `jax.ShapeDtypeStruct`s with those
shardings instead (a restore target: a resumed run never initialises the parameters it is about to replace).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from m1jax.train.checkpointing import TrainCheckpointer, is_train_checkpoint_dir
from m1jax.train.run_config import ModelSpec, RunConfigError

from m1jax import lora
from m1jax.config import ConfigError, ModelConfig
from m1jax.loading import abstract_model, init_sharded, param_shardings
from m1jax.model import MiniMaxM1

MODEL_CONFIG_FILE = "model_config.json"
LORA_FILE = "lora.json"


@dataclasses.dataclass
class ModelBundle:
    """config: the compute config; graphdef: the model structure; params: fp32 master `nnx.State` of what is
    trained; param_dtypes: per-leaf compute dtypes (static, in `jax.tree.leaves(params)` order); frozen: the
    rest of the model, held in its compute dtypes and never updated (LoRA: the base weights; None otherwise)."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    param_dtypes: tuple[str, ...]
    frozen: nnx.State | None = None

    def compute_model(self, params):
        """The model at `params` (these or updated trainable parameters) in its compute dtypes."""
        from m1jax.train.update import compute_model

        return compute_model(self.graphdef, params, self.param_dtypes, self.frozen)

    def inference_model(self, params):
        """The model for generation at `params`: LoRA adapters merged into their weights (once, not at every
        decode step) unless the base experts are int8."""
        model = self.compute_model(params)
        c = model.config
        if c.lora_rank and not (c.quantize is not None and "experts" in c.lora_targets):
            model = lora.merge(model)
        return model


def compute_dtypes(config: ModelConfig) -> tuple[str, ...]:
    """Dtype names of every parameter of a model with `config` (leaf order of its state)."""
    _, state = abstract_model(config)
    return tuple(jnp.dtype(x.dtype).name for x in jax.tree.leaves(state))


def _runtime(spec: ModelSpec) -> dict:
    return {"dtype": spec.dtype, "param_dtype": "float32", "moe_impl": spec.moe_impl,
            "lightning_impl": spec.lightning_impl, "quantize": spec.quantize, "scan_layers": spec.scan_layers,
            "remat": spec.remat, "moe_parallel": spec.moe_parallel}


def _resolve_config(spec: ModelSpec) -> ModelConfig:
    try:
        if spec.preset is not None:
            return ModelConfig.from_preset(spec.preset, **_runtime(spec))
        return ModelConfig.from_hf_dict(spec.config, **_runtime(spec))
    except ConfigError as e:
        field = "model.preset" if spec.preset is not None else "model.config"
        raise RunConfigError(f"run config field '{field}': {e}") from None


def _init(config: ModelConfig, seed: int, mesh) -> MiniMaxM1:
    """Random init with `nnx.Rngs(seed)`; with a mesh, created directly in the rules' sharding."""
    return MiniMaxM1(config, rngs=nnx.Rngs(seed)) if mesh is None else init_sharded(config, mesh, seed=seed)


def abstract_params(config: ModelConfig, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameters as `jax.ShapeDtypeStruct`s with their shardings): the rules' `NamedSharding` on
    `mesh`, or the first device without a mesh. Nothing is allocated."""
    graphdef, state = abstract_model(config)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, state)
    else:
        shardings = param_shardings(state, mesh)
    return graphdef, jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state,
                                  shardings)


def is_abstract(params) -> bool:
    """Whether `params` are shapes only (`build_model(..., abstract=True)`)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def _checkpoint_root(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def build_model(spec: ModelSpec, *, seed: int, mesh=None, abstract: bool = False) -> ModelBundle:
    """The run's model (see module docstring); random init uses `nnx.Rngs(seed)`. `abstract`: shapes and
    shardings only for a preset, inline config or training checkpoint (an HF / m1jax checkpoint is read, and a
    LoRA model is always built)."""
    abstract = abstract and spec.lora is None
    param_dtype = spec.param_dtype or spec.dtype
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if not path.is_dir():
            raise RunConfigError(f"run config field 'model.checkpoint': {path} is not a directory")
        if is_train_checkpoint_dir(path) and (_checkpoint_root(path) / LORA_FILE).is_file():
            return _restore_lora_run(_checkpoint_root(path), spec, seed=seed, mesh=mesh)
        if is_train_checkpoint_dir(path):
            root = _checkpoint_root(path)
            try:
                d = json.loads((root / MODEL_CONFIG_FILE).read_text())
                config = ModelConfig.from_hf_dict(d, **_runtime(spec))
            except (OSError, json.JSONDecodeError, ConfigError) as e:
                raise RunConfigError(f"run config field 'model.checkpoint': no usable {MODEL_CONFIG_FILE} in "
                                     f"{root}: {e}") from None
            graphdef, params = abstract_params(config, mesh)
            if not abstract:
                ckpt = TrainCheckpointer(root)
                params = ckpt.restore_params(ckpt.latest_step(), params)
                ckpt.close()
        else:
            from m1jax.loading import from_pretrained

            model = from_pretrained(path, dtype=spec.dtype, param_dtype="float32", mesh=mesh,
                                    **{k: v for k, v in _runtime(spec).items() if k not in ("dtype", "param_dtype")})
            config = model.config
            if config.quantize is not None and spec.lora is None:
                raise RunConfigError(f"run config field 'model.checkpoint': {path} holds {config.quantize} weights "
                                     f"(written by `m1jax convert --quantize`); training needs float expert "
                                     f"weights: convert the HF checkpoint without --quantize")
            graphdef, params = nnx.split(model)
    else:
        config = _resolve_config(spec)
        graphdef, params = abstract_params(config, mesh) if abstract else nnx.split(_init(config, seed, mesh))
    compute_config = config.replace(param_dtype=param_dtype)
    if spec.lora is not None:
        return _with_adapters(compute_config, graphdef, params, spec, seed=seed)
    if not abstract:  # (already fp32: every source above is built with param_dtype fp32)
        params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              params)
    return ModelBundle(config=compute_config, graphdef=graphdef, params=params,
                       param_dtypes=compute_dtypes(compute_config))


def _with_adapters(config: ModelConfig, graphdef, params, spec: ModelSpec, *, seed: int) -> ModelBundle:
    """The LoRA bundle: the base cast to its compute dtypes and frozen, fresh adapters (fp32 masters) trained."""
    from m1jax.train.update import cast_params

    base = nnx.merge(graphdef, cast_params(params, compute_dtypes(config)))
    model = lora.attach(base, rank=spec.lora.rank, alpha=spec.lora.alpha, targets=spec.lora.targets, seed=seed)
    graphdef, adapters, frozen = nnx.split(model, lora.LoRAParam, ...)
    dtypes = tuple(jnp.dtype(x.dtype).name for x in jax.tree.leaves(adapters))
    adapters = jax.tree.map(lambda x: x.astype(jnp.float32), adapters)
    return ModelBundle(config=model.config, graphdef=graphdef, params=adapters, param_dtypes=dtypes, frozen=frozen)


def _restore_lora_run(root: Path, spec: ModelSpec, *, seed: int, mesh) -> ModelBundle:
    """A LoRA run's model: its base (the run's own model spec, from `lora.json`) plus its latest adapters."""
    from m1jax.train.run_config import ModelSpec as Spec

    try:
        base_spec = Spec.parse(json.loads((root / LORA_FILE).read_text())["model"], "model")
    except (OSError, json.JSONDecodeError, KeyError, RunConfigError) as e:
        raise RunConfigError(f"run config field 'model.checkpoint': unusable {LORA_FILE} in {root}: {e}") from None
    bundle = build_model(base_spec.model_copy(update={"dtype": spec.dtype, "param_dtype": spec.param_dtype}),
                         seed=seed, mesh=mesh)
    ckpt = TrainCheckpointer(root)
    bundle.params = ckpt.restore_params(ckpt.latest_step(), bundle.params)
    ckpt.close()
    return bundle


def save_model_config(config: ModelConfig, directory: Path, model_source: dict | None = None) -> None:
    """`model_config.json` (HF dict) beside the checkpoints, so `model: {checkpoint: DIR}` can rebuild it; for
    a LoRA run also `lora.json` with the run's `model` section (`model_source`), whose base the adapters need."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.lora_rank:
        tmp = directory / (LORA_FILE + ".tmp")
        tmp.write_text(json.dumps({"model": model_source}, indent=2) + "\n")
        tmp.replace(directory / LORA_FILE)
    tmp = directory / (MODEL_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    tmp.replace(directory / MODEL_CONFIG_FILE)
