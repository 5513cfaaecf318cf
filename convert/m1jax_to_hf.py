"""`m1jax export`: m1jax parameters (a converted checkpoint, or a model in memory) → an HF checkpoint in the
original MiniMax-M1 layout, as the official repo ships it (what transformers' `MiniMaxForCausalLM` and vLLM load):

    model-00001-of-0000N.safetensors ...   `block_sparse_moe.experts.E.w1/w2/w3`, fp32 router gates, the rest in
                                           `dtype`; shards of at most `shard_size` bytes (a larger tensor alone)
    model.safetensors.index.json           weight_map + metadata.total_size, written last
    config.json                            the source config written back (`ModelConfig.to_hf_dict`)
    tokenizer files                        copied from the m1jax checkpoint (or `tokenizer_dir`)

Streaming: tensors are written one at a time in row blocks; an expert stack is read one expert at a time, so
peak memory is about one HF tensor plus a 64 MB block.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from m1jax.convert.errors import ConvertError
from m1jax.convert.hf_checkpoint import INDEX, copy_tokenizer_files
from m1jax.convert.hf_layout import ORIGINAL, ParamSpec, param_specs
from m1jax.convert.hf_to_m1jax import NUMPY_DTYPES, canonical_dtype
from m1jax.convert.m1jax_checkpoint import M1jaxCheckpoint
from m1jax.convert.progress import progress_bar
from m1jax.convert.safetensors_io import SafetensorsWriter

from m1jax.config import ModelConfig
from m1jax.quantize import dequantize_views

DEFAULT_SHARD_SIZE = 5 * 10**9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """"5GB" → 5·10⁹, "512MiB" → 512·2²⁰, "1000" → 1000 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConvertError(f"cannot read size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConvertError(f"size must be positive, got {text!r}")
    return size


class _JaxArrayView:
    """Numpy-indexable view of a (possibly sharded) jax array, or of its slice `array[group]` (one layer of a
    scanned model's stack): `view[index]` fetches only that region."""

    def __init__(self, array, group: int | None = None):
        self.array = array
        self.dtype = array.dtype
        self.group = group
        self.shape = tuple(array.shape if group is None else array.shape[1:])

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return np.asarray(self.array[index if self.group is None else (self.group, *index)])


def plan_shards(entries: list[tuple[str, np.dtype, tuple[int, ...]]], shard_size: int) -> list[list[int]]:
    """Entry indices grouped into consecutive shards of at most `shard_size` bytes (an oversized tensor alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"destination {dst} exists and is not an empty directory; refusing to write into it")


def export_weights(config: ModelConfig, view_of: Callable[[ParamSpec], object], dst: str | os.PathLike, *,
                   dtype: str | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
                   tokenizer_dir: str | os.PathLike | None = None, progress: bool = True, stream=None) -> Path:
    """Write the HF checkpoint of the parameters `view_of(spec)` (numpy-indexable, JAX layout) to `dst`.

    Router gates are written fp32, the rest `dtype` (None: each parameter's own dtype, a lossless export)."""
    dst = Path(dst)
    dtype = None if dtype is None else canonical_dtype(dtype)
    shard_size = parse_size(shard_size)
    _check_destination(dst)
    specs = param_specs(config, ORIGINAL)
    views = {spec.path: view_of(spec) for spec in specs}  # fails early on a missing parameter
    entries = [(name, NUMPY_DTYPES["float32" if spec.fp32 else dtype or canonical_dtype(views[spec.path].dtype)],
                shape)
               for spec in specs for name, shape in zip(spec.sources, spec.source_shapes, strict=True)]
    shards = plan_shards(entries, shard_size)
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {entries[i][0]: files[s] for s, idx in enumerate(shards) for i in idx}
    total = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for _, dt, shape in entries)
    dst.mkdir(parents=True, exist_ok=True)
    bar = progress_bar("export", total, stream=stream, enabled=progress)

    def tensors():
        for spec in specs:
            view = views[spec.path]
            yield from spec.hf_tensors(lambda index, view=view: view[index])

    stream_of_tensors = tensors()
    for s, idx in enumerate(shards):
        shard_entries = [entries[i] for i in idx]
        with SafetensorsWriter(dst / files[s], [(name, dt, shape) for name, dt, shape in shard_entries],
                               {"format": "pt"}) as writer:
            for name, dt, shape in shard_entries:
                got_name, array = next(stream_of_tensors)
                writer.write(got_name, array)
                bar.update(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
                del array
    bar.close()
    (dst / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, dst)
    index = {"metadata": {"total_size": total}, "weight_map": shard_of}
    tmp = dst / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, dst / INDEX)
    return dst


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                      shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = True, stream=None,
                      tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Export the converted m1jax checkpoint `src` (refused if incomplete) as an HF checkpoint in `dst`
    (int8 experts are dequantized, q·s, to `dtype`, by default the checkpoint's storage dtype), with the tokenizer
    files of `tokenizer_dir` (default: the checkpoint's own)."""
    ckpt = M1jaxCheckpoint(src)
    views = dequantize_views(ckpt.views(), NUMPY_DTYPES[canonical_dtype(dtype or ckpt.dtype)])
    return export_weights(ckpt.config, lambda spec: views[spec.path], dst, dtype=dtype, shard_size=shard_size,
                          tokenizer_dir=tokenizer_dir or ckpt.path, progress=progress, stream=stream)


def export_model(model, out_dir: str | os.PathLike, *, dtype: str | None = None,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, tokenizer_dir: str | os.PathLike | None = None,
                 progress: bool = False, stream=None) -> Path:
    """Export an in-memory `MiniMaxM1` (sharded or not) as an HF checkpoint in `out_dir`.

    Each HF tensor is fetched from the device arrays on its own (an expert stack one expert at a time); int8
    experts are dequantized (q·s) to `dtype`, by default the model's `param_dtype`.
    """
    return export_weights(model.config, model_view_of(model, dtype), out_dir, dtype=dtype, shard_size=shard_size,
                          tokenizer_dir=tokenizer_dir, progress=progress, stream=stream)


def model_view_of(model, dtype: str | None = None) -> Callable[[ParamSpec], object]:
    """`spec → numpy-indexable view` of an in-memory model's parameter (per layer, int8 experts dequantized to
    `dtype`, by default the model's `param_dtype`); raises `ConvertError` for a parameter the model lacks."""
    from flax import nnx

    from m1jax.layer_stack import per_layer_arrays

    arrays = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    views = {path: v if isinstance(v, _JaxArrayView) else _JaxArrayView(v)
             for path, v in per_layer_arrays(model.config, arrays, take=_JaxArrayView).items()}
    flat = dequantize_views(views, NUMPY_DTYPES[canonical_dtype(dtype or model.config.param_dtype)])

    def view_of(spec: ParamSpec):
        if spec.path not in flat:
            raise ConvertError(f"the model has no parameter {'.'.join(map(str, spec.path))}")
        return flat[spec.path]

    return view_of


def model_hf_tensors(model, dtype: str | None = None):
    """Yield `(hf name, numpy array)` of an in-memory model in the original HF layout (what `export_model`
    writes, without the files)."""
    view_of = model_view_of(model, dtype)
    for spec in param_specs(model.config, ORIGINAL):
        view = view_of(spec)
        yield from spec.hf_tensors(lambda index, view=view: view[index])
