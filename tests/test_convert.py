"""`m1jax convert` / `m1jax export` / `from_pretrained` of a converted checkpoint.

* At the real MiniMax-M1 layout (413 zero-based shards, 8,243 tensors out of layer order, fp32 router gates),
  at tiny width: convert → load equals the direct HF load; HF → m1jax → HF is bit-identical per tensor;
  a conversion killed with SIGKILL and rerun gives the same arrays as an uninterrupted one.
* The transformers-native layout converts; an export loads in transformers' `MiniMaxForCausalLM`; orbax itself
  restores the parameters; a sharded load reads only each device's slice.
* Every bad input is reported (all problems at once, tensor and file named) before anything is written, and
  the CLI prints it without a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from m1jax.convert.errors import ConvertError, IncompleteCheckpointError
from m1jax.convert.hf_checkpoint import CheckpointError, HFCheckpoint
from m1jax.convert.hf_to_m1jax import KILL_ENV, convert_checkpoint
from m1jax.convert.m1jax_checkpoint import JOURNAL, MARKER, M1jaxCheckpoint
from m1jax.convert.m1jax_to_hf import export_checkpoint, export_model, parse_size
from m1jax.convert.orbax_store import OrbaxArrayStore
from synthetic_checkpoint import add_tensor, edit_tensor, read_index, real_m1, write_m1_layout, write_small

import m1jax.cli
from m1jax.config import ModelConfig
from m1jax.layer_stack import per_layer_arrays
from m1jax.loading import abstract_model, from_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_params(model) -> dict:
    """Parameters by their per-layer checkpoint paths (whether or not the model scans its layers)."""
    return per_layer_arrays(model.config, {k: np.asarray(v.get_value())
                                           for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})


def assert_same_bits(a: np.ndarray, b: np.ndarray, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), what


def assert_same_hf(a_dir, b_dir):
    """Same tensor names, dtypes, shapes and bytes (whatever the sharding into files)."""
    a, b = HFCheckpoint(a_dir), HFCheckpoint(b_dir)
    assert set(a.weight_map) == set(b.weight_map)
    for name in a.weight_map:
        assert a.info(name).dtype == b.info(name).dtype, name
        assert_same_bits(np.asarray(a.get(name)), np.asarray(b.get(name)), name)


def stored_arrays(path) -> dict[str, np.ndarray]:
    ckpt = M1jaxCheckpoint(path)
    return {key: ckpt.store.read(key) for key in ckpt.marker["parameters"]}


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = m1jax.cli.main(argv)
    return rc, capsys.readouterr().err


def tiny_dict(**changes) -> dict:
    return ModelConfig.from_preset("tiny").replace(**changes).to_hf_dict()


# --------------------------------------------------------------------------- the real M1 layout, tiny width
@pytest.fixture(scope="module")
def m1_hf(tmp_path_factory, fixtures_dir):
    return write_m1_layout(tmp_path_factory.mktemp("m1") / "hf", fixtures_dir)


@pytest.fixture(scope="module")
def m1_converted(m1_hf, tmp_path_factory):
    return convert_checkpoint(m1_hf, tmp_path_factory.mktemp("m1c") / "m1jax", progress=False)


def test_synthetic_checkpoint_has_the_real_layout(m1_hf, fixtures_dir):
    _, weight_map = real_m1(fixtures_dir)
    ckpt = HFCheckpoint(m1_hf)
    assert ckpt.weight_map == weight_map  # name for name, shard for shard
    assert len(weight_map) == 8243 and len(ckpt.files) == 413
    assert "model-00000-of-00413.safetensors" in ckpt.files
    assert ckpt.info("model.layers.5.block_sparse_moe.gate.weight").dtype == "F32"
    assert ckpt.info("model.layers.5.block_sparse_moe.experts.31.w2.weight").dtype == "BF16"
    assert ckpt.config.num_hidden_layers == 80 and ckpt.config.num_local_experts == 32
    ckpt.validate()


def test_convert_then_load_equals_direct_hf_load(m1_hf, m1_converted):
    direct, converted = flat_params(from_pretrained(m1_hf)), flat_params(from_pretrained(m1_converted))
    assert direct.keys() == converted.keys() and len(direct) == 803
    for path in direct:
        assert_same_bits(converted[path], direct[path], path)
    assert converted[("layers", 0, "block_sparse_moe", "gate")].dtype == np.float32
    assert converted[("layers", 0, "block_sparse_moe", "w1")].dtype == ml_dtypes.bfloat16
    marker = json.loads((m1_converted / MARKER).read_text())
    assert marker["dtype"] == "bfloat16" and len(marker["parameters"]) == 803
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt", "generation_config.json"):
        assert (m1_converted / name).read_bytes() == (m1_hf / name).read_bytes(), name
    assert not (m1_converted / JOURNAL).exists()


def test_round_trip_is_bit_identical(m1_hf, m1_converted, tmp_path):
    out = tmp_path / "hf"
    rc = m1jax.cli.main(["export", str(m1_converted), str(out), "--shard-size", "300KB", "--quiet"])
    assert rc == 0
    assert_same_hf(m1_hf, out)
    index = read_index(out)
    files = sorted(set(index["weight_map"].values()))
    data_bytes = {f: sum(i.nbytes for i in HFCheckpoint(out).files[f].infos.values()) for f in files}
    assert len(files) > 5 and max(data_bytes.values()) <= 300_000  # the header comes on top, as in transformers
    assert index["metadata"]["total_size"] == read_index(m1_hf)["metadata"]["total_size"]
    assert json.loads((out / "config.json").read_text()) == json.loads((m1_hf / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (m1_hf / "tokenizer.json").read_bytes()
    from safetensors import safe_open  # the reference reader (and transformers) need metadata format=pt

    with safe_open(str(out / files[0]), "np") as f:
        assert f.metadata() == {"format": "pt"}


# --------------------------------------------------------------------------- kill -9 and resume
def _convert_cli(src, dst, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "m1jax", "convert", str(src), str(dst), "--workers", "2",
                           "--block-bytes", "40000", *extra], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})}, timeout=300)


def test_kill_9_then_resume_gives_the_uninterrupted_result(m1_hf, m1_converted, tmp_path):
    dst = tmp_path / "m1jax"
    killed = _convert_cli(m1_hf, dst, env={KILL_ENV: "12"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done_before = len(_journal_ids(dst))
    assert 0 < done_before < 803

    # an interrupted conversion is never read as a checkpoint
    with pytest.raises(IncompleteCheckpointError, match="incomplete m1jax conversion.*rerun `m1jax convert"):
        from_pretrained(dst)
    with pytest.raises(IncompleteCheckpointError, match="incomplete m1jax conversion"):
        export_checkpoint(dst, tmp_path / "hf", progress=False)
    import orbax.checkpoint as ocp

    with pytest.raises(FileNotFoundError, match="_METADATA"):  # nor can orbax alone (metadata comes last)
        ocp.StandardCheckpointer().restore(dst / "params")

    # resuming with other arguments or a changed source is refused, naming the difference
    other = _convert_cli(m1_hf, dst, "--dtype", "float32")
    assert other.returncode == 2 and "argument dtype: 'stored' before, 'float32' now" in other.stderr
    assert "Traceback" not in other.stderr

    resumed = _convert_cli(m1_hf, dst)
    assert resumed.returncode == 0, resumed.stderr
    assert "convert:" in resumed.stderr and "B/s]" in resumed.stderr  # tqdm: done/total [elapsed<left, rate]
    assert not (dst / JOURNAL).exists() and (dst / MARKER).exists()
    a, b = stored_arrays(dst), stored_arrays(m1_converted)
    assert a.keys() == b.keys()
    for key in a:
        assert_same_bits(a[key], b[key], key)
    # the resumed run skipped what was committed before the kill
    assert f"convert: resuming {dst}: {done_before}/803 blocks" in resumed.stderr


def _journal_ids(dst) -> set[str]:
    ids = set()
    for line in (dst / JOURNAL).read_text().splitlines()[1:]:
        ids.update(json.loads(line)["done"])
    return ids


def test_changed_source_refuses_resume(tmp_path):
    src = write_small(tmp_path / "hf", tiny_dict())
    dst = tmp_path / "m1jax"
    killed = _convert_cli(src, dst, env={KILL_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL
    shard = sorted(set(read_index(src)["weight_map"].values()))[1]
    os.utime(src / shard, ns=(1, 1))
    with pytest.raises(ConvertError, match=f"source shard {shard} changed \\(mtime_ns"):
        convert_checkpoint(src, dst, block_bytes=40000, progress=False)


# --------------------------------------------------------------------------- other layouts, transformers, orbax
def test_logits_after_conversion_equal_the_hf_load(tmp_path):
    src = write_small(tmp_path / "hf", tiny_dict())
    dst = convert_checkpoint(src, tmp_path / "m1jax", progress=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 13)))
    logits = [np.asarray(jax.jit(lambda t, m=m: m(t).logits)(tokens))
              for m in (from_pretrained(src, dtype="float32"), from_pretrained(dst, dtype="float32"))]
    assert np.isfinite(logits[0]).all() and np.abs(logits[0]).max() > 0
    np.testing.assert_array_equal(logits[1], logits[0])


def _hf_tiny():
    base = ModelConfig.from_preset("tiny-hf")
    types = ("linear_attention", "linear_attention", "full_attention")
    return base.replace(num_hidden_layers=3, layer_types=types, rotary_dim=None, hf_source_json="{}",
                        hf_spelling="transformers", block_size=8)


def test_transformers_layout_converts(tmp_path):
    from hf_oracle import make_hf_model, save_transformers_layout

    config = _hf_tiny()
    src = save_transformers_layout(make_hf_model(config), config, tmp_path / "hf", shards=3)
    dst = convert_checkpoint(src, tmp_path / "m1jax", progress=False)  # fp32 tensors stay fp32 by default
    direct, converted = flat_params(from_pretrained(src, dtype="float32")), flat_params(from_pretrained(dst))
    for path in direct:
        assert_same_bits(converted[path], direct[path], path)


def test_export_loads_in_transformers(tmp_path):
    import torch
    from hf_oracle import make_hf_model, save_original_layout
    from transformers import MiniMaxForCausalLM

    config = _hf_tiny()
    hf = make_hf_model(config, rc_slopes=False)
    src = save_original_layout(hf, config, tmp_path / "hf", shards=1, spelling="transformers")  # no index
    dst = convert_checkpoint(src, tmp_path / "m1jax", progress=False)  # lossless by default: fp32 stays fp32
    assert json.loads((dst / MARKER).read_text())["dtype"] == "float32"
    out = export_checkpoint(dst, tmp_path / "out", shard_size="20KB", progress=False)
    assert_same_hf(src, out)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, config.vocab_size, (2, 11)))
    loaded = MiniMaxForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(tokens).logits.numpy(), hf(tokens).logits.numpy())

    # the in-memory path writes the same files
    model = from_pretrained(dst)
    again = export_model(model, tmp_path / "again", shard_size="20KB", tokenizer_dir=dst)
    assert_same_hf(out, again)
    assert read_index(again) == read_index(out)


def test_orbax_restores_the_converted_parameters(tmp_path):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding

    from m1jax.sharding import logical_to_spec, make_mesh

    src = write_small(tmp_path / "hf", tiny_dict())
    dst = convert_checkpoint(src, tmp_path / "m1jax", progress=False)
    model = from_pretrained(dst)
    per_layer = model.config.replace(scan_layers=False)  # the checkpoint layout: one entry per layer
    _, abstract = abstract_model(per_layer)
    restored = ocp.StandardCheckpointer().restore(dst / "params", abstract)  # the NNX restore pattern
    expected = flat_params(model)
    for path, var in nnx.to_flat_state(restored):
        assert_same_bits(np.asarray(var.get_value()), expected[path], path)

    mesh = make_mesh({"data": 2, "tensor": 4})
    _, targets = abstract_model(per_layer)  # concrete shardings (an AbstractMesh cannot be restored into)
    for _, var in nnx.to_flat_state(targets):
        v = var.get_value()
        spec = logical_to_spec(var.get_metadata()["logical_axes"], v.shape, mesh)
        var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec)))
    restored = ocp.StandardCheckpointer().restore(dst / "params", targets)
    w1 = restored["layers"][0]["block_sparse_moe"]["w1"].get_value()
    assert tuple(w1.sharding.spec) == (None, None, "tensor")
    assert_same_bits(np.asarray(w1), expected[("layers", 0, "block_sparse_moe", "w1")])


def test_sharded_load_reads_only_each_devices_slice(tmp_path, monkeypatch):
    from m1jax.sharding import make_mesh

    src = write_small(tmp_path / "hf", tiny_dict())
    dst = convert_checkpoint(src, tmp_path / "m1jax", progress=False)
    unsharded = flat_params(from_pretrained(dst))

    reads: dict[str, list[tuple]] = {}
    original = OrbaxArrayStore.read

    def spy(self, key, index=()):
        out = original(self, key, index)
        reads.setdefault(key, []).append(out.shape)
        return out

    monkeypatch.setattr(OrbaxArrayStore, "read", spy)
    mesh = make_mesh({"data": 2, "tensor": 4})
    model = from_pretrained(dst, mesh=mesh)
    sharded = per_layer_arrays(model.config, {k: v.get_value() for k, v in
                                              nnx.to_flat_state(nnx.state(model, nnx.Param))})
    for path, value in sharded.items():
        assert_same_bits(np.asarray(value), unsharded[path], path)
    for key, path, split_axis in (("lm_head.value", ("lm_head",), 1),
                                  ("embed_tokens.value", ("embed_tokens",), 0),
                                  ("layers.2.block_sparse_moe.w1.value", ("layers", 2, "block_sparse_moe", "w1"), 2),
                                  ("layers.2.block_sparse_moe.w2.value", ("layers", 2, "block_sparse_moe", "w2"), 1)):
        full = unsharded[path].shape
        assert sharded[path].sharding.spec[split_axis] == "tensor", key
        want = tuple(s // 4 if d == split_axis else s for d, s in enumerate(full))
        assert reads[key] and all(shape == want for shape in reads[key]), (key, reads[key], want)


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def small_hf(tmp_path):
    return write_small(tmp_path / "hf", tiny_dict())


BAD_INPUTS = {
    "missing": (lambda p: edit_tensor(p, "model.layers.1.block_sparse_moe.experts.2.w3.weight", None),
                ["missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'"]),
    "unexpected": (lambda p: add_tensor(p, "model.layers.1.self_attn.bogus.weight", np.zeros(3, np.float32)),
                   ["unexpected tensor 'model.layers.1.self_attn.bogus.weight' in model-00000-of-"]),
    "mis-shaped": (lambda p: edit_tensor(p, "model.norm.weight", np.zeros(65, np.float32)),
                   ["tensor 'model.norm.weight' in model-", "has shape [65], config implies [64]"]),
    "wrong dtype": (lambda p: edit_tensor(p, "model.layers.0.input_layernorm.weight", np.zeros(64, np.int32)),
                    ["tensor 'model.layers.0.input_layernorm.weight' in model-", "has dtype I32"]),
    "truncated shard": (lambda p: _truncate(p, 1), ["model-00001-of-", "truncated"]),
    "missing shard": (lambda p: os.remove(p / sorted(set(read_index(p)["weight_map"].values()))[2]),
                      ["model-00002-of-", "file not found"]),
    "unreadable index": (lambda p: (p / "model.safetensors.index.json").write_text("{not json"),
                         ["model.safetensors.index.json: not a valid safetensors index"]),
    "config disagrees": (lambda p: (p / "config.json").write_text(json.dumps(tiny_dict(num_local_experts=3))),
                         ["unexpected tensor 'model.layers.0.block_sparse_moe.experts.3.w1.weight'"]),
    "broken config": (lambda p: (p / "config.json").write_text("[1, 2"), ["config.json is not valid JSON"]),
}


def _truncate(path, k):
    shard = path / sorted(set(read_index(path)["weight_map"].values()))[k]
    shard.write_bytes(shard.read_bytes()[:-7])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_reported_before_anything_is_written(case, small_hf, tmp_path, capsys):
    damage, fragments = BAD_INPUTS[case]
    damage(small_hf)
    dst = tmp_path / "out"
    rc, err = run_cli(["convert", str(small_hf), str(dst)], capsys)
    assert rc == 2
    assert err.startswith("m1jax convert: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not dst.exists()


def test_all_problems_are_listed_at_once(small_hf):
    for name in ("model.norm.weight", "model.layers.3.self_attn.q_proj.weight"):
        edit_tensor(small_hf, name, None)
    add_tensor(small_hf, "model.layers.0.extra.weight", np.zeros(2, np.float32))
    with pytest.raises(CheckpointError, match="3 problems") as err:
        convert_checkpoint(small_hf, small_hf.parent / "out", progress=False)
    assert "model.layers.3.self_attn.q_proj.weight" in str(err.value) and "extra" in str(err.value)


def test_destination_rules(small_hf, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, err = run_cli(["convert", str(small_hf), str(busy)], capsys)
    assert rc == 2 and "exists and is not empty" in err and "Traceback" not in err
    assert (busy / "notes.txt").read_text() == "mine"

    dst = tmp_path / "m1jax"
    assert run_cli(["convert", str(small_hf), str(dst)], capsys)[0] == 0
    rc, err = run_cli(["convert", str(small_hf), str(dst)], capsys)
    assert rc == 0 and "already a complete conversion" in err
    rc, err = run_cli(["convert", str(small_hf), str(dst), "--dtype", "fp16"], capsys)
    assert rc == 2 and "already holds a complete m1jax checkpoint of different inputs" in err
    rc, err = run_cli(["convert", str(small_hf), str(small_hf / "inside")], capsys)
    assert rc == 2 and "must not be the source directory or inside it" in err
    rc, err = run_cli(["export", str(small_hf), str(tmp_path / "x")], capsys)
    assert rc == 2 and "not an m1jax checkpoint" in err
    rc, err = run_cli(["export", str(dst), str(busy)], capsys)
    assert rc == 2 and "not an empty directory" in err
    rc, err = run_cli(["export", str(dst), str(tmp_path / "y"), "--shard-size", "lots"], capsys)
    assert rc == 2 and "cannot read size 'lots'" in err
    rc, err = run_cli(["convert", str(small_hf), str(tmp_path / "z"), "--dtype", "int4"], capsys)
    assert rc == 2 and "unsupported dtype 'int4'" in err


def test_cli_error_without_traceback_in_a_subprocess(small_hf, tmp_path):
    edit_tensor(small_hf, "lm_head.weight", None)
    proc = subprocess.run([sys.executable, "-m", "m1jax", "convert", str(small_hf), str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == 2
    assert "missing tensor 'lm_head.weight'" in proc.stderr and "Traceback" not in proc.stderr


def test_progress_line_and_sizes(small_hf, tmp_path):
    stream = io.StringIO()
    convert_checkpoint(small_hf, tmp_path / "m1jax", stream=stream, block_bytes=20000)
    line = stream.getvalue().strip().splitlines()[-1].split("\r")[-1]
    assert line.startswith("convert: 100%") and re.search(r"\[\d\d:\d\d<00:00, .*B/s\]$", line), line
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_size("1.5MB") == 1_500_000


def test_one_writer_at_a_time(tmp_path):
    from m1jax.convert.journal import Journal

    path = tmp_path / JOURNAL
    first = Journal.start(path, {"dtype": "bfloat16"}, {})
    with pytest.raises(ConvertError, match="another m1jax convert is writing to"):
        Journal.resume(path, {"dtype": "bfloat16"}, {}, what="destination")
    first.close()
    Journal.resume(path, {"dtype": "bfloat16"}, {}, what="destination").close()
