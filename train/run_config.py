"""The run configuration of `m1jax train cispo|sft`: one YAML/JSON file whose schema is the pydantic models below.

Each section is one frozen model; its fields, defaults and bounds are the reference. Files are read strictly:
unknown keys are errors, "1" is not an integer, true is not a number (YAML 1.1's `3e-4` string is a number). Every
error is one `RunConfigError` naming the field as the file spells it, e.g. `run config field 'optimizer.b2': must
be less than 1, got 1.5` or `'rewards[1].weight'`. The file (worked example: configs/train/cispo_reverse3.yaml):

    seed, steps, output_dir, tokenizer (DIR, for text tasks), mesh ({axis: size} over m1jax.sharding.MESH_AXES)
    model: ModelSpec (exactly one of preset / config / checkpoint);  optimizer, checkpoint, log: *Spec
    cispo runs: task, rewards, rollout, cispo: *Spec;  control: null | shuffle_rewards (the negative control)
        rewards: [{name, weight}, ...] | [name, ...] | {name: weight} | {functions: one of those, on_error, workers}
        rollout.dynamic_sampling: true | {max_rounds}
    sft runs: sft: SftSpec
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from m1jax.train.rewards import ON_ERROR
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from m1jax.config import DTYPES, LIGHTNING_IMPLS, MOE_IMPLS, MOE_PARALLEL, REMAT_POLICIES, SCAN_LAYERS
from m1jax.sharding import MESH_AXES

BUILTIN_TASKS = ("reverse3", "jsonl")


class RunConfigError(ValueError):
    """A run-config field is missing, malformed or inconsistent; the message names the field."""


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string: a string that spells a number is that number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Float = Annotated[float, BeforeValidator(_yaml_number)]
PosInt = Annotated[int, Field(ge=1)]
Text = Annotated[str, Field(min_length=1)]


def _none_is_none(value: Any) -> Any:
    return None if value == "none" else value


def _check(ok: bool, field: str, why: str) -> None:
    """A rule of a model validator: unless `ok`, the error `why` at `field` (dotted, relative to the model being
    validated; "" = the model itself)."""
    if not ok:
        raise PydanticCustomError("run_config", "{why}", {"why": why, "field": field})


def _require(ok: Callable[[Any], bool], why: str) -> AfterValidator:
    """A field check whose message says why (where a plain bound would not)."""

    def check(value):
        if not ok(value):
            raise ValueError(why)
        return value

    return AfterValidator(check)


class _Section(BaseModel):
    """One section of the run config: frozen, strict, finite numbers, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        """The section's shorthand spellings → its canonical mapping (override per section)."""
        return data

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any) -> Any:
        data = cls._normalize(data)
        for key in data if isinstance(data, Mapping) else ():
            _check(key in cls.model_fields, str(key), f"unknown key (allowed here: {', '.join(cls.model_fields)})")
        return data

    @classmethod
    def parse(cls, data: Any, prefix: str | None = None):
        """Validate one section (None = all defaults); errors are `RunConfigError`s naming `prefix.field`
        (default prefix: the section's name, e.g. `optimizer` for `OptimizerSpec`)."""
        prefix = cls.__name__.removesuffix("Spec").lower() if prefix is None else prefix
        try:
            return cls.model_validate({} if data is None else data)
        except ValidationError as e:
            raise RunConfigError(_describe(e, data, prefix)) from None


def _path(loc: tuple, data: Any, prefix: str = "") -> str:
    """An error location as the file spells it: `rewards[1].weight`, `rewards.code.weight` for a {name: weight}
    mapping; containers only a shorthand's normalization added (`rewards.functions`) are left out."""
    out, node = prefix, data
    for part, nxt in zip(loc, (*loc[1:], None), strict=True):
        if part == "[key]":
            continue
        if isinstance(part, int) and not isinstance(node, Mapping):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(part, int):  # the {name: weight} spelling of a list
            part = list(node)[part]
        elif isinstance(nxt, int) and isinstance(node, list | Mapping) and part not in node:
            continue
        out = f"{out}.{part}" if out else str(part)
        node = node.get(part) if isinstance(node, Mapping) else None
    return out or "<root>"


def _describe(error: ValidationError, data: Any, prefix: str = "") -> str:
    """One line per pydantic error: `run config field 'PATH': must be …, got VALUE`, joined by '; '."""
    lines = []
    for e in error.errors(include_url=False):
        loc, ctx = e["loc"], e.get("ctx") or {}
        if e["type"] == "run_config":
            loc, why = (*loc, *[p for p in ctx["field"].split(".") if p]), ctx["why"]
        elif e["type"] == "missing":
            why = "is required"
        else:
            why = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
            if not isinstance(e["input"], Mapping | list | tuple):
                why += f", got {e['input']!r}"
        lines.append(f"run config field '{_path(loc, data, prefix)}': {why}")
    return "; ".join(lines)


# --------------------------------------------------------------------------------------------- sections
class LoraSpec(_Section):
    """Low-rank adapters (`m1jax.lora`): only they are trained (optimizer state for them alone), the base
    weights stay frozen in the compute dtype (int8 experts with `model.quantize: int8-experts`)."""

    rank: PosInt
    alpha: Annotated[Float, Field(gt=0)] | None = None  # None: 2 · rank
    targets: Annotated[tuple[Literal["attention", "experts"], ...],
                       BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)] = ("attention", "experts")

    @model_validator(mode="after")
    def _some_target(self) -> LoraSpec:
        _check(len(self.targets) > 0, "targets", "must name at least one of attention / experts")
        return self


class ModelSpec(_Section):
    """Where the model comes from — exactly one of `preset`, `config` (an inline HF config.json dict),
    `checkpoint` (a directory) — and its runtime choices (`param_dtype` None: = dtype; `init_seed` None: = seed;
    `scan_layers`, `remat` (per scanned layer group), `moe_parallel`: the `m1jax.config.ModelConfig` fields;
    `logprob_seq_chunk`, `logprob_vocab_chunk`: the fp32 head's log-probs in chunks of that many positions per row /
    vocabulary columns (None: all at once), `m1jax.train.logprobs.head_logprobs`).
    `lora`: train low-rank adapters instead of every weight; `quantize: int8-experts` (LoRA only) keeps the
    frozen experts int8."""

    preset: Text | None = None
    config: dict[str, Any] | None = None
    checkpoint: Text | None = None
    dtype: Literal[DTYPES] = "float32"
    param_dtype: Literal[DTYPES] | None = None
    moe_impl: Literal[MOE_IMPLS] = "auto"
    lightning_impl: Literal[LIGHTNING_IMPLS] = "auto"
    scan_layers: Literal[SCAN_LAYERS] = "auto"
    remat: Literal[REMAT_POLICIES] = "none"
    moe_parallel: Literal[MOE_PARALLEL] = "auto"
    logprob_seq_chunk: PosInt | None = None
    logprob_vocab_chunk: PosInt | None = None
    init_seed: int | None = None
    lora: LoraSpec | None = None
    quantize: Literal["int8-experts"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        sources = [k for k in ("preset", "config", "checkpoint") if getattr(self, k) is not None]
        _check(len(sources) == 1, "", f"give exactly one of preset / config / checkpoint, got {sources or 'none'}")
        _check(self.quantize is None or self.lora is not None, "quantize",
               "int8 experts cannot be trained: set model.lora (frozen int8 base + trained adapters) or drop it")
        return self


class TaskSpec(_Section):
    """The prompts of a CISPO run: the built-in reverse3 task, or `path` (JSONL records with a `prompt_field`)."""

    name: Literal[BUILTIN_TASKS] = "reverse3"
    path: Text | None = None
    prompt_field: Text = "prompt"

    @model_validator(mode="after")
    def _jsonl_needs_path(self) -> TaskSpec:
        _check(self.name != "jsonl" or self.path is not None, "path", "is required for task 'jsonl' (a JSONL file)")
        return self


class RewardSpec(_Section):
    name: Text  # a built-in reward or MODULE:FN
    weight: Float = 1.0


class RewardsSpec(_Section):
    """R = Σ_k weight_k · reward_k; `on_error` and `workers` as in `m1jax.train.rewards.RewardSet.score`."""

    functions: tuple[RewardSpec, ...]
    on_error: Literal[ON_ERROR] = "raise"
    workers: PosInt = 1

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        explicit = isinstance(data, Mapping) and "functions" in data
        functions = data["functions"] if explicit else data
        if isinstance(functions, Mapping):
            functions = [{"name": name, "weight": weight} for name, weight in functions.items()]
        _check(isinstance(functions, list | tuple) and len(functions) > 0, "functions" if explicit else "",
               f"needs at least one reward function: a list of {{name, weight}} or of names, or a mapping name → "
               f"weight; got {functions!r}")
        functions = tuple({"name": f} if isinstance(f, str) else f for f in functions)
        return {**data, "functions": functions} if explicit else {"functions": functions}


class OverlongSpec(_Section):
    """DAPO soft overlong penalty over the last `cache_tokens` of the generation budget."""

    cache_tokens: PosInt
    penalty: Float = Field(1.0, ge=0)


class DynamicSamplingSpec(_Section):
    """Regenerate groups with zero reward variance: at most `max_rounds` generation rounds fill the batch."""

    max_rounds: PosInt = 3


class RolloutSpec(_Section):
    """How rollouts are sampled; `mesh` ({axis: size}, None: the run's `mesh`): the generation engine's own layout
    of the same devices (e.g. weights stationary over tensor × expert), the parameters resharded into it each
    step."""

    num_prompts: PosInt = 16
    group_size: Annotated[int, _require(lambda g: g >= 2, "must be ≥ 2: a group of one has zero advantage")] = 8
    max_new_tokens: PosInt = 64
    temperature: Float = Field(1.0, gt=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: Float = Field(0.0, ge=0, le=1)
    repetition_stop: PosInt | None = 3000
    repetition_threshold: Float = Field(0.99, ge=0, lt=1)
    prefill_chunk: PosInt = 4096
    overlong: OverlongSpec | None = None
    dynamic_sampling: DynamicSamplingSpec | None = None  # `true`: the default max_rounds
    mesh: dict[Literal[MESH_AXES], PosInt] | None = None

    @property
    def dynamic_sampling_rounds(self) -> int:
        """0: off; else at most this many generation rounds to fill the batch."""
        return self.dynamic_sampling.max_rounds if self.dynamic_sampling else 0

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("dynamic_sampling"), bool):
            data = {**data, "dynamic_sampling": {} if data["dynamic_sampling"] else None}
        return data

    @model_validator(mode="after")
    def _overlong_fits(self) -> RolloutSpec:
        cache = self.overlong.cache_tokens if self.overlong else 0
        _check(cache <= self.max_new_tokens, "overlong.cache_tokens",
               f"must be ≤ rollout.max_new_tokens = {self.max_new_tokens}, got {cache}")
        return self


class CispoSpec(_Section):
    """The policy loss. `eps_low`/`eps_high` are offsets of the IS-weight clip [1 − eps_low, 1 + eps_high]
    (eps_low None: no lower bound); grpo_clip defaults both to 0.2. `entropy_coef` β₀ decays linearly to 0 over
    `entropy_decay_steps` (None: constant). `advantage_std: none` divides advantages by no std. `routing_replay`:
    the engine records each rollout token's routed experts and the π_old and update forwards use them instead of
    their own top-k (the policy gradient then follows the routing that produced the sample)."""

    loss: Literal["cispo", "grpo_clip"] = "cispo"
    eps_low: Float | None = Field(None, gt=0, lt=1)
    eps_high: Annotated[Float, _require(lambda e: e > 0, "is an OFFSET: the cap 1 + eps_high must exceed 1 (CISPO "
                                        "practice: 4.0, i.e. cap 5; an absolute cap c is eps_high = c - 1)")] = 4.0
    masked: bool = False
    normalization: Literal["group", "batch"] = "group"
    advantage_std: Annotated[Literal["group", "batch", "none"] | None, AfterValidator(_none_is_none)] = "group"
    num_minibatches: PosInt = 4
    epochs: PosInt = 1
    micro_batches: PosInt = 1
    max_log_ratio: Float = Field(20.0, gt=0)
    router_aux_loss_coef: Float = Field(0.0, ge=0)
    entropy_coef: Float = Field(0.0, ge=0)
    entropy_decay_steps: PosInt | None = None
    routing_replay: bool = False  # record the rollout's routed experts; π_old and the updates replay them

    def entropy_coef_at(self, step: int) -> float:
        """β at rollout step `step` (1-based): β₀ · max(0, 1 − (step − 1) / entropy_decay_steps), or β₀."""
        if not self.entropy_decay_steps:
            return self.entropy_coef
        return self.entropy_coef * max(0.0, 1.0 - (step - 1) / self.entropy_decay_steps)

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("loss") == "grpo_clip":
            data = {"eps_low": 0.2, "eps_high": 0.2, **data}
        return data


class SftSpec(_Section):
    data: Text  # JSONL
    seq_len: int = Field(128, ge=2)
    batch_size: PosInt = 8
    micro_batches: PosInt = 1
    router_aux_loss_coef: Float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> SftSpec:
        _check(self.batch_size % self.micro_batches == 0, "micro_batches",
               f"must divide sft.batch_size = {self.batch_size}, got {self.micro_batches}")
        return self


class OptimizerSpec(_Section):
    """AdamW + global-norm clipping (None: off) + warmup/cosine schedule (see `m1jax.train.optim`; `decay_steps` None:
    the whole run). Hashable (a jit static)."""

    lr: Float = Field(3e-4, gt=0)
    b1: Float = Field(0.9, ge=0, lt=1)
    b2: Float = Field(0.95, ge=0, lt=1)
    eps: Float = Field(1e-15, ge=0)
    weight_decay: Float = Field(0.0, ge=0)
    max_grad_norm: Float | None = Field(1.0, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    decay_steps: PosInt | None = None


class CheckpointSpec(_Section):
    dir: Text | None = None  # None: output_dir/checkpoints
    every: PosInt = 50
    keep: PosInt = 3


class LogSpec(_Section):
    progress: bool = True
    tensorboard: bool = False


_SECTIONS = ("model", "task", "rewards", "rollout", "cispo", "sft", "optimizer", "checkpoint", "log")
_ONLY = {"cispo": ("task", "rewards", "rollout", "cispo", "control"), "sft": ("sft",)}


class RunConfig(_Section):
    """A validated run config; `source` is the mapping it was read from (after overrides)."""

    algorithm: Literal["cispo", "sft"]
    steps: PosInt  # optimizer steps (sft) or rollout steps (cispo) of the run
    output_dir: Text
    model: ModelSpec
    seed: int = Field(0, ge=0)
    tokenizer: Text | None = None
    task: TaskSpec | None = None
    rewards: RewardsSpec | None = None
    rollout: RolloutSpec | None = None
    cispo: CispoSpec | None = None
    sft: SftSpec | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    mesh: dict[Literal[MESH_AXES], PosInt] | None = None
    control: Literal["shuffle_rewards"] | None = None
    log: LogSpec = LogSpec()
    _source: dict = {}  # a private attribute: not read from the file

    @classmethod
    def _normalize(cls, data: Any) -> Any:
        """A section given as null takes its defaults; a cispo run always has task, rollout and cispo."""
        if not isinstance(data, Mapping):
            return data
        for other, keys in _ONLY.items():
            for key in keys if other != data.get("algorithm") else ():
                _check(key not in data, key, f"unknown key (a setting of `m1jax train {other}` runs)")
        data = {k: v for k, v in data.items() if v is not None or k not in _SECTIONS}
        if data.get("algorithm") == "cispo":
            data = {"task": {}, "rollout": {}, "cispo": {}, **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.algorithm == "sft":
            _check(self.sft is not None, "sft", "is required (data, seq_len, batch_size)")
            return self
        _check(self.rewards is not None, "rewards", "is required (e.g. [{name: reverse3, weight: 1.0}])")
        r, c = self.rollout, self.cispo
        _check(r.num_prompts % c.num_minibatches == 0, "cispo.num_minibatches", f"must divide rollout.num_prompts = "
               f"{r.num_prompts} (each minibatch holds whole prompt groups), got {c.num_minibatches}")
        rows = r.num_prompts // c.num_minibatches * r.group_size
        _check(rows % c.micro_batches == 0, "cispo.micro_batches", f"must divide the {rows} rows of a minibatch "
               f"(num_prompts / num_minibatches × group_size), got {c.micro_batches}")
        _check(self.task.name != "jsonl" or self.tokenizer is not None, "tokenizer",
               "is required for task 'jsonl' (prompts and completions are text)")
        return self

    @property
    def source(self) -> dict:
        return self._source

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints").absolute()

    @property
    def init_seed(self) -> int:
        return self.seed if self.model.init_seed is None else self.model.init_seed

    @property
    def optimizer_steps(self) -> int:
        """Optimizer updates of the whole run (the schedule's horizon)."""
        if self.algorithm == "cispo":
            return self.steps * self.cispo.num_minibatches * self.cispo.epochs
        return self.steps


def parse_run_config(data: Mapping[str, Any], algorithm: str) -> RunConfig:
    """Validate a run-config mapping for `algorithm` ("cispo" | "sft")."""
    if algorithm not in _ONLY:
        raise RunConfigError(f"unknown algorithm {algorithm!r}; expected one of {sorted(_ONLY)}")
    if not isinstance(data, Mapping):
        raise RunConfigError(f"run config field '<root>': must be a mapping, got {type(data).__name__}")
    declared = data.get("algorithm", algorithm)
    if declared != algorithm:
        raise RunConfigError(f"run config field 'algorithm': this file is for {declared!r} but was run with "
                             f"`m1jax train {algorithm}`")
    cfg = RunConfig.parse({**data, "algorithm": algorithm}, prefix="")
    cfg._source = dict(data)
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides (value parsed as YAML: numbers, booleans, null, lists) on a config mapping."""
    import yaml

    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} must look like field.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: '{part}' is not a mapping")
        node[parts[-1]] = value
    return data


def load_run_config(path: str | os.PathLike, algorithm: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML or JSON run config (by extension; YAML otherwise), apply overrides, validate."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunConfigError(f"cannot read run config {path}: {e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RunConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{path}: the run config must be a mapping at the top level")
    data = apply_overrides(dict(data), overrides or [])
    try:
        return parse_run_config(data, algorithm)
    except RunConfigError as e:
        raise RunConfigError(f"{path}: {e}") from None
