"""The run configuration of `m1jax train cispo|sft`: one YAML/JSON file, validated field by field.

Every error is a `RunConfigError` whose message names the offending field by its dotted path
(e.g. `run config field 'optimizer.b2': must be in [0, 1), got 1.5`). Unknown keys are errors too (a typo must
not silently fall back to a default). Schema (defaults in brackets; `|` separates alternatives):

    seed: int [0]                  steps: int (optimizer/rollout steps of the run, required)
    output_dir: path (metrics.jsonl, checkpoints/, resolved against the working directory; required)
    model:     preset: NAME | config: {HF config.json dict} | checkpoint: DIR  (exactly one)
               dtype [float32], param_dtype [= dtype], moe_impl [auto], lightning_impl [auto], init_seed [= seed]
    tokenizer: DIR | null          (needed for text tasks/rewards; the reverse3 task has its own vocabulary)
    task:      name: reverse3 | jsonl;  path: FILE (jsonl);  prompt_field [prompt]  (sft: see `sft`)
    rewards:   [{name: NAME_OR_MODULE:FN, weight: W}, ...] or {NAME: W, ...}; on_error [raise]; workers [1]
    rollout:   num_prompts [16], group_size G [8], max_new_tokens [64], temperature [1.0], top_p [1.0],
               top_k [0], min_p [0.0], repetition_stop [3000 | null], repetition_threshold [0.99],
               prefill_chunk [4096], overlong: null | {cache_tokens: L_cache, penalty [1.0]},
               dynamic_sampling: null | {max_rounds [3]}
    cispo:     loss [cispo | grpo_clip], eps_low [null = no lower bound], eps_high [4.0], masked [false],
               normalization [group | batch], advantage_std [group | batch | none], num_minibatches μ [4],
               epochs [1], micro_batches [1], max_log_ratio [20.0], router_aux_loss_coef [0.0],
               entropy_coef β₀ [0.0: none], entropy_decay_steps [null: constant β; else linear decay to 0]
    sft:       data: FILE.jsonl, seq_len [128], batch_size [8], micro_batches [1], router_aux_loss_coef [0.0]
    optimizer: lr [3e-4], b1 [0.9], b2 [0.95], eps [1e-15], weight_decay [0.0], max_grad_norm [1.0 | null],
               schedule [cosine | constant], warmup_steps [0], min_lr_ratio [0.1], decay_steps [null = all]
    checkpoint: dir [output_dir/checkpoints], every [50], keep [3]
    mesh: null | {data: n, fsdp: n, tensor: n, expert: n}
    control: null | shuffle_rewards      (negative control: rewards permuted within the batch)
    log: {progress [true], tensorboard [false]}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUILTIN_TASKS = ("reverse3", "jsonl")
DTYPES = ("float32", "bfloat16", "float16")
CONTROLS = (None, "shuffle_rewards")
MESH_AXES = ("data", "fsdp", "tensor", "expert")


class RunConfigError(ValueError):
    """A run-config field is missing, malformed or inconsistent; the message names the field."""


# --------------------------------------------------------------------------------------------- field checks
class _Fields:
    """Reads one mapping of the config: typed getters that name `prefix.key` in every error."""

    def __init__(self, data: Any, prefix: str, allowed: tuple[str, ...]):
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RunConfigError(f"run config field '{prefix or '<root>'}': must be a mapping, got "
                                 f"{type(data).__name__}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise RunConfigError(f"run config field '{self.name(unknown[0])}': unknown key (allowed here: "
                                 f"{', '.join(allowed)})")
        self.data = dict(data)

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, why: str):
        raise RunConfigError(f"run config field '{self.name(key)}': {why}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def int(self, key, default=dataclasses.MISSING, *, min_value=None, allow_none=False):
        value = self._get(key, default)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {value!r}")
        if min_value is not None and value < min_value:
            self.fail(key, f"must be ≥ {min_value}, got {value}")
        return value

    def float(self, key, default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False,
              allow_none=False):
        value = self._get(key, default)
        if value is None and allow_none:
            return None
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                self.fail(key, f"must be a finite number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value!r}")
        value = float(value)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            self.fail(key, f"must be {'>' if lo_open else '≥'} {lo}, got {value}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            self.fail(key, f"must be {'<' if hi_open else '≤'} {hi}, got {value}")
        return value

    def bool(self, key, default=dataclasses.MISSING):
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def str(self, key, default=dataclasses.MISSING, *, choices=None, allow_none=False):
        value = self._get(key, default)
        if value is None and (allow_none or (choices is not None and None in choices)):
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"must be one of {[c for c in choices if c is not None]}, got {value!r}")
        return value

    def _get(self, key, default):
        if key in self.data:
            return self.data[key]
        if default is dataclasses.MISSING:
            self.fail(key, "is required")
        return default


# --------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: exactly one of `preset`, `config` (inline HF dict), `checkpoint` (dir)."""

    preset: str | None = None
    config: dict | None = None
    checkpoint: str | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    moe_impl: str = "auto"
    lightning_impl: str = "auto"
    init_seed: int | None = None

    @classmethod
    def parse(cls, data, prefix="model") -> ModelSpec:
        f = _Fields(data, prefix, ("preset", "config", "checkpoint", "dtype", "param_dtype", "moe_impl",
                                   "lightning_impl", "init_seed"))
        sources = [k for k in ("preset", "config", "checkpoint") if f.has(k)]
        if len(sources) != 1:
            raise RunConfigError(f"run config field '{prefix}': give exactly one of preset / config / checkpoint, "
                                 f"got {sources or 'none'}")
        config = f.data.get("config")
        if config is not None and not isinstance(config, Mapping):
            f.fail("config", f"must be an HF config.json mapping, got {type(config).__name__}")
        return cls(preset=f.str("preset", None, allow_none=True), config=dict(config) if config else None,
                   checkpoint=f.str("checkpoint", None, allow_none=True),
                   dtype=f.str("dtype", "float32", choices=DTYPES),
                   param_dtype=f.str("param_dtype", None, choices=(None,) + DTYPES),
                   moe_impl=f.str("moe_impl", "auto", choices=("auto", "ragged", "tiled", "dense")),
                   lightning_impl=f.str("lightning_impl", "auto", choices=("auto", "xla", "pallas")),
                   init_seed=f.int("init_seed", None, allow_none=True))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str = "reverse3"
    path: str | None = None
    prompt_field: str = "prompt"

    @classmethod
    def parse(cls, data, prefix="task") -> TaskSpec:
        f = _Fields(data, prefix, ("name", "path", "prompt_field"))
        name = f.str("name", "reverse3", choices=BUILTIN_TASKS)
        path = f.str("path", None, allow_none=True)
        if name == "jsonl" and path is None:
            f.fail("path", "is required for task 'jsonl' (a JSONL file of prompts)")
        return cls(name=name, path=path, prompt_field=f.str("prompt_field", "prompt"))


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class RewardsSpec:
    functions: tuple[RewardSpec, ...]
    on_error: str = "raise"
    workers: int = 1

    @classmethod
    def parse(cls, data, prefix="rewards") -> RewardsSpec:
        on_error, workers = "raise", 1
        if isinstance(data, Mapping) and "functions" in data:
            f = _Fields(data, prefix, ("functions", "on_error", "workers"))
            on_error = f.str("on_error", "raise", choices=("raise", "default"))
            workers = f.int("workers", 1, min_value=1)
            data, prefix = data["functions"], f"{prefix}.functions"
        items: list[tuple[str, Any]] = []
        if isinstance(data, Mapping):
            items = [(k, v) for k, v in data.items()]
        elif isinstance(data, list):
            for i, item in enumerate(data):
                if isinstance(item, str):
                    items.append((item, 1.0))
                    continue
                f = _Fields(item, f"{prefix}[{i}]", ("name", "weight"))
                items.append((f.str("name"), f.data.get("weight", 1.0)))
        else:
            raise RunConfigError(f"run config field '{prefix}': must be a list of {{name, weight}} or a mapping "
                                 f"name -> weight, got {type(data).__name__}")
        if not items:
            raise RunConfigError(f"run config field '{prefix}': needs at least one reward function")
        out = []
        for name, weight in items:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RunConfigError(f"run config field '{prefix}.{name}': weight must be a finite number, "
                                     f"got {weight!r}")
            out.append(RewardSpec(str(name), float(weight)))
        return cls(functions=tuple(out), on_error=on_error, workers=workers)


@dataclasses.dataclass(frozen=True)
class OverlongSpec:
    """DAPO soft overlong penalty over the last `cache_tokens` of the generation budget."""

    cache_tokens: int
    penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    num_prompts: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_stop: int | None = 3000
    repetition_threshold: float = 0.99
    prefill_chunk: int = 4096
    overlong: OverlongSpec | None = None
    dynamic_sampling_rounds: int = 0  # 0: off; else at most this many generation rounds to fill the batch

    @classmethod
    def parse(cls, data, prefix="rollout") -> RolloutSpec:
        f = _Fields(data, prefix, ("num_prompts", "group_size", "max_new_tokens", "temperature", "top_p", "top_k",
                                   "min_p", "repetition_stop", "repetition_threshold", "prefill_chunk", "overlong",
                                   "dynamic_sampling"))
        max_new = f.int("max_new_tokens", 64, min_value=1)
        overlong = None
        if f.has("overlong"):
            o = _Fields(f.data["overlong"], f.name("overlong"), ("cache_tokens", "penalty"))
            cache = o.int("cache_tokens", min_value=1)
            if cache > max_new:
                o.fail("cache_tokens", f"must be ≤ rollout.max_new_tokens = {max_new}, got {cache}")
            overlong = OverlongSpec(cache, o.float("penalty", 1.0, lo=0.0))
        rounds = 0
        ds = f.data.get("dynamic_sampling")
        if ds is True:
            rounds = 3
        elif ds not in (None, False):
            d = _Fields(ds, f.name("dynamic_sampling"), ("max_rounds",))
            rounds = d.int("max_rounds", 3, min_value=1)
        group = f.int("group_size", 8, min_value=1)
        if group < 2:
            f.fail("group_size", "must be ≥ 2: a group of one has zero advantage (no learning signal)")
        return cls(num_prompts=f.int("num_prompts", 16, min_value=1), group_size=group, max_new_tokens=max_new,
                   temperature=f.float("temperature", 1.0, lo=0.0, lo_open=True),
                   top_p=f.float("top_p", 1.0, lo=0.0, hi=1.0, lo_open=True), top_k=f.int("top_k", 0, min_value=0),
                   min_p=f.float("min_p", 0.0, lo=0.0, hi=1.0),
                   repetition_stop=f.int("repetition_stop", 3000, min_value=1, allow_none=True),
                   repetition_threshold=f.float("repetition_threshold", 0.99, lo=0.0, hi=1.0, hi_open=True),
                   prefill_chunk=f.int("prefill_chunk", 4096, min_value=1), overlong=overlong,
                   dynamic_sampling_rounds=rounds)


@dataclasses.dataclass(frozen=True)
class CispoSpec:
    loss: str = "cispo"
    eps_low: float | None = None
    eps_high: float = 4.0
    masked: bool = False
    normalization: str = "group"
    advantage_std: str | None = "group"
    num_minibatches: int = 4
    epochs: int = 1
    micro_batches: int = 1
    max_log_ratio: float = 20.0
    router_aux_loss_coef: float = 0.0
    entropy_coef: float = 0.0
    entropy_decay_steps: int | None = None

    def entropy_coef_at(self, step: int) -> float:
        """β at rollout step `step` (1-based): β₀ · max(0, 1 − (step − 1) / entropy_decay_steps), or β₀."""
        if not self.entropy_decay_steps:
            return self.entropy_coef
        return self.entropy_coef * max(0.0, 1.0 - (step - 1) / self.entropy_decay_steps)

    @classmethod
    def parse(cls, data, prefix="cispo") -> CispoSpec:
        f = _Fields(data, prefix, ("loss", "eps_low", "eps_high", "masked", "normalization", "advantage_std",
                                   "num_minibatches", "epochs", "micro_batches", "max_log_ratio",
                                   "router_aux_loss_coef", "entropy_coef", "entropy_decay_steps"))
        loss = f.str("loss", "cispo", choices=("cispo", "grpo_clip"))
        eps_high = f.float("eps_high", 4.0 if loss == "cispo" else 0.2)
        if eps_high <= 0:
            f.fail("eps_high", f"is an OFFSET: the cap 1 + eps_high = {1 + eps_high} must exceed 1 (CISPO practice: "
                               "eps_high: 4.0, i.e. cap 5; an absolute cap c is eps_high = c - 1)")
        eps_low = f.float("eps_low", None if loss == "cispo" else 0.2, lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                          allow_none=True)
        std = f.data.get("advantage_std", "group")
        if std not in ("group", "batch", "none", None):
            f.fail("advantage_std", f"must be one of ['group', 'batch', 'none'], got {std!r}")
        return cls(loss=loss, eps_low=eps_low, eps_high=eps_high, masked=f.bool("masked", False),
                   normalization=f.str("normalization", "group", choices=("group", "batch")),
                   advantage_std=None if std in ("none", None) else std,
                   num_minibatches=f.int("num_minibatches", 4, min_value=1), epochs=f.int("epochs", 1, min_value=1),
                   micro_batches=f.int("micro_batches", 1, min_value=1),
                   max_log_ratio=f.float("max_log_ratio", 20.0, lo=0.0, lo_open=True),
                   router_aux_loss_coef=f.float("router_aux_loss_coef", 0.0, lo=0.0),
                   entropy_coef=f.float("entropy_coef", 0.0, lo=0.0),
                   entropy_decay_steps=f.int("entropy_decay_steps", None, min_value=1, allow_none=True))


@dataclasses.dataclass(frozen=True)
class SftSpec:
    data: str
    seq_len: int = 128
    batch_size: int = 8
    micro_batches: int = 1
    router_aux_loss_coef: float = 0.0

    @classmethod
    def parse(cls, data, prefix="sft") -> SftSpec:
        f = _Fields(data, prefix, ("data", "seq_len", "batch_size", "micro_batches", "router_aux_loss_coef"))
        spec = cls(data=f.str("data"), seq_len=f.int("seq_len", 128, min_value=2),
                   batch_size=f.int("batch_size", 8, min_value=1), micro_batches=f.int("micro_batches", 1, min_value=1),
                   router_aux_loss_coef=f.float("router_aux_loss_coef", 0.0, lo=0.0))
        if spec.batch_size % spec.micro_batches:
            f.fail("micro_batches", f"must divide sft.batch_size = {spec.batch_size}, got {spec.micro_batches}")
        return spec


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """AdamW + global-norm clipping + warmup/cosine schedule (see `train.optim`). Hashable (a jit static)."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None

    @classmethod
    def parse(cls, data, prefix="optimizer") -> OptimizerSpec:
        f = _Fields(data, prefix, ("lr", "b1", "b2", "eps", "weight_decay", "max_grad_norm", "schedule",
                                   "warmup_steps", "min_lr_ratio", "decay_steps"))
        return cls(lr=f.float("lr", 3e-4, lo=0.0, lo_open=True), b1=f.float("b1", 0.9, lo=0.0, hi=1.0, hi_open=True),
                   b2=f.float("b2", 0.95, lo=0.0, hi=1.0, hi_open=True), eps=f.float("eps", 1e-15, lo=0.0),
                   weight_decay=f.float("weight_decay", 0.0, lo=0.0),
                   max_grad_norm=f.float("max_grad_norm", 1.0, lo=0.0, lo_open=True, allow_none=True),
                   schedule=f.str("schedule", "cosine", choices=("cosine", "constant")),
                   warmup_steps=f.int("warmup_steps", 0, min_value=0),
                   min_lr_ratio=f.float("min_lr_ratio", 0.1, lo=0.0, hi=1.0),
                   decay_steps=f.int("decay_steps", None, min_value=1, allow_none=True))


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    dir: str | None = None
    every: int = 50
    keep: int = 3

    @classmethod
    def parse(cls, data, prefix="checkpoint") -> CheckpointSpec:
        f = _Fields(data, prefix, ("dir", "every", "keep"))
        return cls(dir=f.str("dir", None, allow_none=True), every=f.int("every", 50, min_value=1),
                   keep=f.int("keep", 3, min_value=1))


@dataclasses.dataclass(frozen=True)
class LogSpec:
    progress: bool = True
    tensorboard: bool = False

    @classmethod
    def parse(cls, data, prefix="log") -> LogSpec:
        f = _Fields(data, prefix, ("progress", "tensorboard"))
        return cls(progress=f.bool("progress", True), tensorboard=f.bool("tensorboard", False))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    algorithm: str
    steps: int
    output_dir: str
    model: ModelSpec
    seed: int = 0
    tokenizer: str | None = None
    task: TaskSpec | None = None
    rewards: RewardsSpec | None = None
    rollout: RolloutSpec | None = None
    cispo: CispoSpec | None = None
    sft: SftSpec | None = None
    optimizer: OptimizerSpec = OptimizerSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    mesh: tuple[tuple[str, int], ...] | None = None
    control: str | None = None
    log: LogSpec = LogSpec()
    source: dict = dataclasses.field(default_factory=dict, compare=False)

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


_COMMON = ("algorithm", "seed", "steps", "output_dir", "model", "tokenizer", "optimizer", "checkpoint", "mesh", "log")
_KEYS = {"cispo": _COMMON + ("task", "rewards", "rollout", "cispo", "control"), "sft": _COMMON + ("sft",)}


def parse_run_config(data: Mapping[str, Any], algorithm: str) -> RunConfig:
    """Validate a run-config mapping for `algorithm` ("cispo" | "sft")."""
    if algorithm not in _KEYS:
        raise RunConfigError(f"unknown algorithm {algorithm!r}; expected one of {sorted(_KEYS)}")
    declared = data.get("algorithm", algorithm) if isinstance(data, Mapping) else algorithm
    if declared != algorithm:
        raise RunConfigError(f"run config field 'algorithm': this file is for {declared!r} but was run with "
                             f"`m1jax train {algorithm}`")
    f = _Fields(data, "", _KEYS[algorithm])
    if not f.has("model"):
        f.fail("model", "is required (preset, inline config or checkpoint)")
    mesh = None
    if f.has("mesh"):
        m = _Fields(f.data["mesh"], "mesh", MESH_AXES)
        mesh = tuple((axis, m.int(axis, 1, min_value=1)) for axis in MESH_AXES if axis in m.data)
    common = dict(algorithm=algorithm, seed=f.int("seed", 0, min_value=0), steps=f.int("steps", min_value=1),
                  output_dir=f.str("output_dir"), model=ModelSpec.parse(f.data.get("model")),
                  tokenizer=f.str("tokenizer", None, allow_none=True),
                  optimizer=OptimizerSpec.parse(f.data.get("optimizer")),
                  checkpoint=CheckpointSpec.parse(f.data.get("checkpoint")), mesh=mesh,
                  log=LogSpec.parse(f.data.get("log")), source=dict(data))
    if algorithm == "sft":
        if not f.has("sft"):
            f.fail("sft", "is required (data, seq_len, batch_size)")
        return RunConfig(**common, sft=SftSpec.parse(f.data["sft"]))

    if not f.has("rewards"):
        f.fail("rewards", "is required (e.g. [{name: reverse3, weight: 1.0}])")
    task = TaskSpec.parse(f.data.get("task"))
    rollout = RolloutSpec.parse(f.data.get("rollout"))
    cispo = CispoSpec.parse(f.data.get("cispo"))
    if rollout.num_prompts % cispo.num_minibatches:
        raise RunConfigError(f"run config field 'cispo.num_minibatches': must divide rollout.num_prompts = "
                             f"{rollout.num_prompts} (each minibatch holds whole prompt groups), got "
                             f"{cispo.num_minibatches}")
    rows = rollout.num_prompts // cispo.num_minibatches * rollout.group_size
    if rows % cispo.micro_batches:
        raise RunConfigError(f"run config field 'cispo.micro_batches': must divide the {rows} rows of a minibatch "
                             f"(num_prompts / num_minibatches × group_size), got {cispo.micro_batches}")
    if task.name == "jsonl" and common["tokenizer"] is None:
        f.fail("tokenizer", "is required for task 'jsonl' (prompts and completions are text)")
    control = f.str("control", None, choices=CONTROLS)
    return RunConfig(**common, task=task, rewards=RewardsSpec.parse(f.data["rewards"]), rollout=rollout,
                     cispo=cispo, control=control)


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
