"""ModelConfig: both HF spellings, lossless write-back, presets, parameter counts, clear errors."""

import json

import pytest

from m1jax.config import LIGHTNING, SOFTMAX, ConfigError, ModelConfig, list_presets, presets_dir

M1_TOTAL = 456_089_655_296


def test_real_m1_config_is_the_preset(fixtures_dir):
    real = ModelConfig.from_json_file(fixtures_dir / "minimax-m1" / "config.json")
    p80, p40 = ModelConfig.from_preset("minimax-m1-80k"), ModelConfig.from_preset("minimax-m1-40k")

    def architecture(c):  # the presets add only their default thinking budget to the published config
        return c.replace(thinking_budget=None, hf_source_json="{}")

    assert architecture(real) == architecture(p80) == architecture(p40)
    assert (real.thinking_budget, p40.thinking_budget, p80.thinking_budget) == (None, 40_000, 80_000)
    assert p40.to_hf_dict()["thinking_budget"] == 40_000 and "thinking_budget" not in real.to_hf_dict()
    assert real.softmax_layers == tuple(range(7, 80, 8))
    assert real.rope_dim == 64 and real.block_size == 256 and real.postnorm
    assert real.to_hf_dict() == json.loads((fixtures_dir / "minimax-m1" / "config.json").read_text())


@pytest.mark.parametrize("name", ["minimax-m1-40k", "minimax-m1-80k", "minimax-text-01"])
def test_preset_parameter_counts(name):
    counts = ModelConfig.from_preset(name).param_counts()
    assert counts["total"] == M1_TOTAL
    assert round(counts["active"] / 1e9, 1) == 45.9  # without embeddings and head


@pytest.mark.parametrize("name", list_presets())
def test_presets_round_trip_losslessly(name):
    raw = json.loads((presets_dir() / f"{name}.json").read_text())
    assert ModelConfig.from_hf_dict(raw).to_hf_dict() == raw


def test_transformers_spelling_parses_and_round_trips():
    rc = ModelConfig.from_preset("minimax-m1-80k")
    native = {
        "architectures": ["MiniMaxForCausalLM"], "model_type": "minimax", "vocab_size": 200064,
        "hidden_size": 6144, "intermediate_size": 9216, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 32, "num_experts_per_tok": 2,
        "max_position_embeddings": 10240000, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "layer_types": [SOFTMAX if (i + 1) % 8 == 0 else LIGHTNING for i in range(80)],
        "block_size": 256, "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0},
        "full_attn_alpha_factor": 3.5565588200778455, "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": 3.5565588200778455, "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": 3.5565588200778455, "mlp_beta_factor": 1.0, "tie_word_embeddings": False,
    }
    c = ModelConfig.from_hf_dict(native)
    assert c.hf_spelling == "transformers"
    assert c.rope_dim == 128  # transformers semantics: rotary_dim absent → whole head
    assert c.to_hf_dict() == native
    same = c.replace(rotary_dim=64, hf_source_json="{}", hf_spelling="remote_code")
    for field in ("layer_types", "rope_theta", "block_size", "mlp_alpha", "full_attn_beta", "postnorm"):
        assert getattr(same, field) == getattr(rc, field), field
    assert same.param_counts() == rc.param_counts()
    native["rotary_dim"] = 64
    assert ModelConfig.from_hf_dict(native).rope_dim == 64


def test_modified_config_writes_new_values_in_its_spelling():
    c = ModelConfig.from_preset("tiny").replace(block_size=16, layer_types=("full_attention",) * 4)
    d = c.to_hf_dict()
    assert d["block_size"] == 16 and d["attn_type_list"] == [1, 1, 1, 1]
    assert ModelConfig.from_hf_dict(d).replace(hf_source_json="{}") == c.replace(hf_source_json="{}")


def test_runtime_fields_are_not_written():
    c = ModelConfig.from_preset("tiny", dtype="bfloat16", lightning_impl="xla")
    d = c.to_hf_dict()
    assert "dtype" not in d and "lightning_impl" not in d
    assert c.dtype == "bfloat16"


@pytest.mark.parametrize("change, field", [
    ({"num_key_value_heads": 4}, "num_key_value_heads"),  # 6 heads not a multiple of 4
    ({"attn_type_list": [0, 0, 1]}, "layer_types"),
    ({"attn_type_list": [0, 2, 0, 1]}, "attn_type_list"),
    ({"rotary_dim": 7}, "rotary_dim"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"shared_intermediate_size": 128}, "shared_intermediate_size"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"layernorm_mlp_alpha": "big"}, "mlp_alpha"),
])
def test_malformed_config_names_the_field(change, field):
    raw = json.loads((presets_dir() / "tiny.json").read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(raw)


def test_missing_fields_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        ModelConfig.from_hf_dict({"vocab_size": 10})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path)
    with pytest.raises(ConfigError, match="no config file"):
        ModelConfig.from_json_file(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ConfigError, match="lightning_impl"):
        ModelConfig.from_preset("tiny", lightning_impl="cuda")


@pytest.mark.parametrize("given", ["bfloat16", "jnp", "np", "np.dtype"])
def test_dtypes_are_accepted_as_jax_numpy_or_strings(given):
    import jax.numpy as jnp
    import numpy as np

    value = {"bfloat16": "bfloat16", "jnp": jnp.bfloat16, "np": jnp.dtype("bfloat16").type,
             "np.dtype": np.dtype(jnp.bfloat16)}[given]
    config = ModelConfig.from_preset("tiny").replace(dtype=value, param_dtype=np.float32)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
    assert hash(config) == hash(ModelConfig.from_preset("tiny").replace(dtype="bfloat16"))
    with pytest.raises(ConfigError, match="config field 'param_dtype'.*got <class 'numpy.int32'>"):
        config.replace(param_dtype=np.int32)
