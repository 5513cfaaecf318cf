"""`ModelConfig`: the one configuration class of m1jax.

It holds the architecture of a MiniMax-M1 / MiniMax-Text-01 model plus the runtime choices (dtypes, kernel
implementations) and reads/writes Hugging Face `config.json` files in both spellings:

* remote-code (`MiniMaxM1ForCausalLM`, the published M1/Text-01 repos): `attn_type_list` (0 = lightning,
  1 = softmax), `layernorm_{full,linear}_attention_{alpha,beta}`, `layernorm_mlp_{alpha,beta}`, `rotary_dim`,
  `postnorm`, `rope_theta`; the lightning block size is a module constant (256).
* transformers-native (`MiniMaxForCausalLM`, transformers >= 4.53): `layer_types`, `*_alpha_factor`,
  `*_beta_factor`, `rope_parameters`, `block_size`; `rotary_dim` absent means RoPE over the whole head.

`ModelConfig.from_hf_dict(d).to_hf_dict() == d` for every config this module accepts (keys it does not
interpret are carried through verbatim).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

LIGHTNING = "linear_attention"
SOFTMAX = "full_attention"
LAYER_KINDS = (LIGHTNING, SOFTMAX)

DTYPES = ("float32", "bfloat16", "float16")
LIGHTNING_IMPLS = ("auto", "xla", "pallas", "recurrent")
MOE_IMPLS = ("auto", "ragged", "tiled", "gather", "switch", "dense")
INT8_EXPERTS = "int8-experts"
QUANTIZE_MODES = (None, INT8_EXPERTS)  # m1jax.quantize implements them
MOE_PARALLEL = ("auto", "off")
SCAN_LAYERS = ("auto", True, False)
REMAT_POLICIES = ("none", "full", "save_dots", "offload")

RC_DEFAULT_BLOCK_SIZE = 256


class ConfigError(ValueError):
    """A config field is missing, malformed or unsupported; the message names the field and why."""


def dtype_name(dtype: Any, field: str = "dtype") -> str:
    """The name of a floating dtype given as a string ("bfloat16"), a JAX/NumPy scalar type (`jnp.bfloat16`,
    `np.float32`) or a `np.dtype`; `ConfigError` naming `field` if it is none of `DTYPES`."""
    name = dtype
    if not isinstance(dtype, str):
        try:
            import numpy as np

            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name not in DTYPES:
        raise ConfigError(f"config field '{field}': must be one of {DTYPES} (a string, jnp/np dtype), got {dtype!r}")
    return name


# (field, remote-code key, transformers key) for the DeepNorm residual factors.
_RESIDUAL_KEYS = (
    ("full_attn_alpha", "layernorm_full_attention_alpha", "full_attn_alpha_factor"),
    ("full_attn_beta", "layernorm_full_attention_beta", "full_attn_beta_factor"),
    ("linear_attn_alpha", "layernorm_linear_attention_alpha", "linear_attn_alpha_factor"),
    ("linear_attn_beta", "layernorm_linear_attention_beta", "linear_attn_beta_factor"),
    ("mlp_alpha", "layernorm_mlp_alpha", "mlp_alpha_factor"),
    ("mlp_beta", "layernorm_mlp_beta", "mlp_beta_factor"),
)

# Fields whose HF key is the same in both spellings.
_PLAIN_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "rms_norm_eps",
    "hidden_act", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "router_aux_loss_coef", "router_jitter_noise", "initializer_range", "thinking_budget",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + runtime configuration of a MiniMax-M1-family model (hashable: usable as a jit static)."""

    # --- architecture (from config.json) ---
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    rotary_dim: int | None = None  # None: RoPE over the whole head (transformers semantics)
    rope_theta: float = 10_000_000.0
    block_size: int = RC_DEFAULT_BLOCK_SIZE
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    postnorm: bool = True
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6  # RC's RMSNorm default; RC does not pass the config eps
    hidden_act: str = "silu"
    max_position_embeddings: int = 10_240_000
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    initializer_range: float = 0.02
    shared_intermediate_size: int = 0
    thinking_budget: int | None = None  # default reasoning tokens before `</think>` is forced (None: unlimited)

    # --- runtime (never written to config.json) ---
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of weights (router gates always float32)
    lightning_impl: str = "auto"  # "xla" | "pallas" | "recurrent" | "auto"
    moe_impl: str = "auto"  # "ragged" | "tiled" | "gather" | "switch" | "dense" | "auto"
    quantize: str | None = None  # None | "int8-experts" (routed experts' w1/w3/w2 int8 + per-channel scales)
    moe_parallel: str = "auto"  # "auto": expert-parallel shard_map under a mesh with expert/tensor axes | "off"
    scan_layers: str | bool = "auto"  # True: one scan over groups of `layer_period` layers; "auto": if > 1 group
    remat: str = "none"  # per scanned group (per layer unrolled): "none" | "full" | "save_dots" | "offload"
    lora_rank: int = 0  # > 0: low-rank adapters on `lora_targets` (m1jax.lora)
    lora_alpha: float = 16.0  # adapter scale α (the update is α/r · A B)
    lora_targets: tuple[str, ...] = ("attention", "experts")

    # --- provenance, for a lossless write-back ---
    hf_spelling: Literal["remote_code", "transformers"] = "remote_code"
    hf_source_json: str = "{}"  # the parsed dict, verbatim

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), name))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rope_dim(self) -> int:
        """Number of leading head dims that RoPE rotates (RC: `rotary_dim`; absent: the whole head)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def lightning_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LIGHTNING)

    @property
    def softmax_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SOFTMAX)

    @property
    def layer_period(self) -> int:
        """The smallest P dividing the layer count with `layer_types[i] == layer_types[i mod P]` (M1: 8)."""
        n = self.num_hidden_layers
        return next(p for p in range(1, n + 1) if n % p == 0 and self.layer_types == self.layer_types[:p] * (n // p))

    @property
    def scan_groups(self) -> int:
        """How many groups of `layer_period` layers one `lax.scan` runs over; 0 means the layers are unrolled.
        `scan_layers="auto"` scans when the pattern repeats at least twice."""
        groups = self.num_hidden_layers // self.layer_period
        if self.scan_layers is True or (self.scan_layers == "auto" and groups > 1):
            return groups
        return 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (tuple, list)):
            return tuple(int(t) for t in self.eos_token_id)
        return (int(self.eos_token_id),)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field and why."""

        def need(cond: bool, field: str, why: str):
            if not cond:
                raise ConfigError(f"config field '{field}': {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                     "num_experts_per_tok", "block_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 f"must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"top-{self.num_experts_per_tok} routing needs at least that many experts "
             f"(num_local_experts={self.num_local_experts})")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_KINDS})
        need(not bad, "layer_types", f"unknown layer kind(s) {bad}; expected {LAYER_KINDS}")
        if self.rotary_dim is not None:
            need(isinstance(self.rotary_dim, int) and 0 < self.rotary_dim <= self.head_dim
                 and self.rotary_dim % 2 == 0, "rotary_dim",
                 f"must be an even integer in (0, head_dim={self.head_dim}], got {self.rotary_dim!r}")
        need(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, "rope_theta",
             f"must be positive, got {self.rope_theta!r}")
        for name in ("rms_norm_eps", "lightning_norm_eps"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0, name, "must be > 0")
        for field, _, _ in _RESIDUAL_KEYS:
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 field, f"must be a finite number, got {value!r}")
        need(self.thinking_budget is None or (isinstance(self.thinking_budget, int)
                                               and not isinstance(self.thinking_budget, bool)
                                               and self.thinking_budget >= 0), "thinking_budget",
             f"must be an integer ≥ 0 (tokens) or null, got {self.thinking_budget!r}")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported (MiniMax uses it), got "
             f"{self.hidden_act!r}")
        need(self.shared_intermediate_size == 0, "shared_intermediate_size",
             "shared experts are not implemented (every published MiniMax-M1/Text-01 config has 0)")
        need(self.lightning_impl in LIGHTNING_IMPLS, "lightning_impl",
             f"must be one of {LIGHTNING_IMPLS}, got {self.lightning_impl!r}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        need(self.quantize in QUANTIZE_MODES, "quantize", f"must be one of {QUANTIZE_MODES}, got {self.quantize!r}")
        need(self.moe_parallel in MOE_PARALLEL, "moe_parallel",
             f"must be one of {MOE_PARALLEL}, got {self.moe_parallel!r}")
        need(isinstance(self.scan_layers, bool) or self.scan_layers == "auto", "scan_layers",
             f"must be one of {SCAN_LAYERS}, got {self.scan_layers!r}")
        need(self.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}, got {self.remat!r}")
        need(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank >= 0,
             "lora_rank", f"must be an integer ≥ 0, got {self.lora_rank!r}")
        need(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha",
             f"must be > 0, got {self.lora_alpha!r}")
        need(len(self.lora_targets) > 0 and set(self.lora_targets) <= {"attention", "experts"}, "lora_targets",
             f"must be a non-empty subset of ('attention', 'experts'), got {self.lora_targets!r}")
        need(self.hf_spelling in ("remote_code", "transformers"), "hf_spelling",
             f"must be 'remote_code' or 'transformers', got {self.hf_spelling!r}")
        if self.tie_word_embeddings:
            raise ConfigError("config field 'tie_word_embeddings': tied embeddings are not supported "
                              "(MiniMax checkpoints have a separate lm_head)")

    # ------------------------------------------------------------ HF read/write
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModelConfig:
        """Parse an HF `config.json` dict (either spelling); `runtime` sets dtype/param_dtype/*_impl/quantize/
        scan_layers/remat."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        spelling = "transformers" if ("layer_types" in d and "attn_type_list" not in d) else "remote_code"
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "num_local_experts", "num_experts_per_tok"]
        missing = [k for k in required if k not in d and not (k == "num_local_experts" and "num_experts" in d)]
        if spelling == "remote_code" and "attn_type_list" not in d:
            missing.append("attn_type_list (or layer_types)")
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")

        kw: dict[str, Any] = {k: d[k] for k in _PLAIN_KEYS if k in d}
        if "num_local_experts" not in d:
            kw["num_local_experts"] = d["num_experts"]
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        if d.get("head_dim") is None:
            if d["hidden_size"] % d["num_attention_heads"]:
                raise ConfigError("config field 'head_dim': absent and hidden_size is not divisible by "
                                  "num_attention_heads")
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        kw["shared_intermediate_size"] = d.get("shared_intermediate_size", 0)
        if d.get("sliding_window") is not None:
            raise ConfigError("config field 'sliding_window': sliding-window attention is not part of MiniMax-M1 "
                              f"and not supported (got {d['sliding_window']!r})")

        if spelling == "remote_code":
            types = d["attn_type_list"]
            if not isinstance(types, list) or any(t not in (0, 1) for t in types):
                raise ConfigError("config field 'attn_type_list': must be a list of 0 (lightning) / 1 (softmax)")
            kw["layer_types"] = tuple(SOFTMAX if t == 1 else LIGHTNING for t in types)
            for field, rc_key, _ in _RESIDUAL_KEYS:
                if rc_key in d:
                    kw[field] = d[rc_key]
            kw["block_size"] = d.get("block_size", RC_DEFAULT_BLOCK_SIZE)
            kw["rope_theta"] = d.get("rope_theta", 10_000.0)
            kw["rotary_dim"] = d.get("rotary_dim", kw.get("head_dim", d.get("head_dim")))
            kw["postnorm"] = d.get("postnorm", False)  # RC's config default is False
        else:
            types = d["layer_types"]
            if not isinstance(types, list):
                raise ConfigError("config field 'layer_types': must be a list of layer kinds")
            kw["layer_types"] = tuple(types)
            for field, _, hf_key in _RESIDUAL_KEYS:
                if hf_key in d:
                    kw[field] = d[hf_key]
            kw["block_size"] = d.get("block_size", RC_DEFAULT_BLOCK_SIZE)
            kw["rope_theta"] = _rope_theta_from_transformers(d)
            kw["rotary_dim"] = d.get("rotary_dim")  # transformers ignores it; honour it when present (RC semantics)
            kw["postnorm"] = d.get("postnorm", True)  # transformers hard-codes postnorm
        for name in ("lightning_norm_eps",):
            if name in runtime:
                kw[name] = runtime.pop(name)
        unknown = set(runtime) - {"dtype", "param_dtype", "lightning_impl", "moe_impl", "quantize", "moe_parallel",
                                  "scan_layers", "remat", "lora_rank", "lora_alpha", "lora_targets"}
        if unknown:
            raise TypeError(f"unknown runtime option(s): {sorted(unknown)}")
        try:
            return cls(**kw, **runtime, hf_spelling=spelling, hf_source_json=json.dumps(d, sort_keys=False))
        except TypeError as e:  # wrong JSON types reaching dataclass construction
            raise ConfigError(f"config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict in this config's spelling; unmodified fields keep their source form."""
        source = json.loads(self.hf_source_json)
        out = dict(source)
        # Parse the source again to know which of its interpreted values are still current.
        baseline = _fields_of(source) if source else {}

        def put(key: str, field: str, value: Any, *, default: Any = dataclasses.MISSING):
            if key in source and baseline.get(field, dataclasses.MISSING) == getattr(self, field):
                return  # unchanged: keep the verbatim source value
            if source and key not in source and default is not dataclasses.MISSING and value == default:
                return  # absent in the source and still the implied default: stay absent
            out[key] = value

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in _PLAIN_KEYS:
            value = getattr(self, key)
            if isinstance(value, tuple):
                value = list(value)
            put(key, key, value, default=defaults[key])
        put("shared_intermediate_size", "shared_intermediate_size", self.shared_intermediate_size, default=0)
        if self.hf_spelling == "remote_code":
            if not (baseline.get("layer_types") == self.layer_types and "attn_type_list" in source):
                out["attn_type_list"] = [1 if t == SOFTMAX else 0 for t in self.layer_types]
            for field, rc_key, _ in _RESIDUAL_KEYS:
                put(rc_key, field, getattr(self, field))
            put("block_size", "block_size", self.block_size, default=RC_DEFAULT_BLOCK_SIZE)
            put("rope_theta", "rope_theta", self.rope_theta)
            put("rotary_dim", "rotary_dim", self.rope_dim, default=self.head_dim)
            put("postnorm", "postnorm", self.postnorm, default=False)
        else:
            if not (baseline.get("layer_types") == self.layer_types and "layer_types" in source):
                out["layer_types"] = list(self.layer_types)
            for field, _, hf_key in _RESIDUAL_KEYS:
                put(hf_key, field, getattr(self, field))
            put("block_size", "block_size", self.block_size)
            if baseline.get("rope_theta") != self.rope_theta or not (
                    "rope_parameters" in source or "rope_theta" in source):
                out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
                out.pop("rope_theta", None)
            put("rotary_dim", "rotary_dim", self.rotary_dim, default=None)
            put("postnorm", "postnorm", self.postnorm, default=True)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d, **runtime)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save_json(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **runtime) -> ModelConfig:
        """A config from `configs/<name>.json` (e.g. `minimax-m1-80k`, `tiny`; see `list_presets()`)."""
        path = presets_dir() / f"{name}.json"
        if not path.exists():
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
        return cls.from_json_file(path, **runtime)

    # ------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: `total`, `embedding` (embed + lm_head), `active` per token (without embedding/head)."""
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        e, f, k = self.num_local_experts, self.intermediate_size, self.num_experts_per_tok
        lightning = 3 * h * hd * d + h * hd * d + h * hd * d + h * hd  # qkv, gate, out, norm
        softmax = h * hd * d + 2 * kv * hd * d + h * hd * d  # q, k, v, o
        norms = 2 * d
        expert = 3 * d * f
        router = e * d
        n_lin, n_soft = len(self.lightning_layers), len(self.softmax_layers)
        attn = n_lin * lightning + n_soft * softmax
        embedding = 2 * self.vocab_size * d
        total = embedding + d + attn + self.num_hidden_layers * (norms + router + e * expert)
        active = attn + self.num_hidden_layers * (norms + router + k * expert)
        return {"total": total, "embedding": embedding, "active": active, "active_with_embedding": active +
                embedding + d}


def _rope_theta_from_transformers(d: dict) -> float:
    params = d.get("rope_parameters")
    if params is None:
        return d.get("rope_theta", 1_000_000.0)  # transformers' MiniMaxConfig default_theta
    if not isinstance(params, dict):
        raise ConfigError("config field 'rope_parameters': must be an object")
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"config field 'rope_parameters.rope_type': only 'default' RoPE is supported, got "
                          f"{params.get('rope_type')!r}")
    if "rope_theta" not in params:
        raise ConfigError("config field 'rope_parameters.rope_theta': missing")
    return params["rope_theta"]


def _fields_of(d: dict) -> dict[str, Any]:
    """Interpreted field values of a source dict (used to detect unchanged fields on write-back)."""
    try:
        c = ModelConfig.from_hf_dict(d)
    except ConfigError:
        return {}
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}


def presets_dir() -> Path:
    """The `configs/` folder: beside the package in a checkout / editable install, else the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "_presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("the configs/ presets folder was not found next to the m1jax package")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))
