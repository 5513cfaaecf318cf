"""`m1jax convert`: an HF checkpoint directory → an m1jax checkpoint (orbax parameters + config + tokenizer).

Streaming: every parameter is cut into blocks along the axis its source is laid out by (expert stacks: one or a
few experts; a transposed `[out, in]` weight: a range of `out` rows), each ≤ `block_bytes` unless one source
tensor is larger. A block is read from a fresh memory map of its source tensor(s), transposed/cast in
cache-sized tiles, and written into its region of the output array; consecutive small blocks share one OCDBT
commit. At most `workers` batches are in flight, so peak memory is about
`workers × 3 × max(block_bytes, largest expert tensor)` plus the interpreter, whatever the model size.

With `quantize="int8-experts"` every expert stack is cut into blocks of whole experts, and each block is
quantized as it is written (`m1jax.quantize.quantize_int8`): the int8 weight plus its fp32 scales `…_scale`.

Resumable: a journal (see `journal.py`) records each committed batch; a rerun with the same arguments and an
unchanged source skips those blocks and produces identical arrays. The commit marker is written last.
Hidden test hook: `M1JAX_CONVERT_KILL_AFTER=N` makes the converter SIGKILL itself after its N-th commit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from m1jax.convert.array_copy import contiguous_copy
from m1jax.convert.errors import ConvertError
from m1jax.convert.hf_checkpoint import SAFETENSORS_DTYPE_NAMES, HFCheckpoint, copy_tokenizer_files
from m1jax.convert.hf_layout import ParamSpec
from m1jax.convert.journal import Journal, describe_differences
from m1jax.convert.m1jax_checkpoint import (
    ABSENT,
    COMPLETE,
    EMPTY,
    FORMAT,
    FORMAT_VERSION,
    INCOMPLETE,
    JOURNAL,
    MARKER,
    PARAMS,
    directory_state,
)
from m1jax.convert.orbax_store import OrbaxArrayStore, array_key, fsync_dir, write_json_atomic
from m1jax.convert.progress import human_bytes, progress_bar
from m1jax.convert.safetensors_io import DTYPE_NAMES, DTYPES
from numpy.lib.array_utils import byte_bounds

from m1jax.config import QUANTIZE_MODES
from m1jax.quantize import is_expert_weight_path, quantize_int8, scale_path

BLOCK_BYTES = 64 * 1024 * 1024
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                 "f32": "float32", "fp16": "float16", "float16": "float16", "f16": "float16"}
NUMPY_DTYPES = {"bfloat16": DTYPES["BF16"], "float32": DTYPES["F32"], "float16": DTYPES["F16"]}
KILL_ENV = "M1JAX_CONVERT_KILL_AFTER"


def canonical_dtype(name) -> str:
    """"bfloat16" | "float32" | "float16" from a name or alias ("bf16", "fp32", ...) or a numpy/JAX dtype."""
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            pass
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ConvertError(f"unsupported dtype {name!r}; use one of bfloat16, float32, float16") from None


def stored_dtype(ckpt: HFCheckpoint, spec: ParamSpec) -> str:
    """The dtype that holds the parameter's source tensors without loss (float64 sources: float32)."""
    names = {SAFETENSORS_DTYPE_NAMES[ckpt.info(n).dtype] for n in spec.sources}
    return names.pop() if len(names) == 1 else "float32"


@dataclass(frozen=True)
class Block:
    """One region of one output parameter, and where it is read from."""

    spec: int  # index into the spec list
    key: str  # orbax parameter name
    number: int
    index: tuple  # region of the JAX-layout parameter (tuple of slices)
    nbytes: int  # bytes written (output dtype)
    order: tuple  # (shard, byte offset, number): blocks are processed in file order
    scale_key: str | None = None  # int8 experts: the scales array this block's experts also fill

    @property
    def id(self) -> str:
        return f"{self.key}#{self.number}"


@dataclass(frozen=True)
class ArrayPlan:
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


def _block_axis(view) -> int:
    """The JAX axis the source is laid out by (largest stride of the view): its blocks read contiguous rows."""
    movable = [i for i in range(view.ndim) if view.shape[i] > 1]
    return max(movable, key=lambda i: abs(view.strides[i])) if movable else 0


def plan(ckpt: HFCheckpoint, specs: list[ParamSpec], dtype: str | None, block_bytes: int,
         quantize: str | None = None
         ) -> tuple[dict[str, ArrayPlan], list[Block]]:
    """Output arrays (shape, dtype, chunks) and the blocks that fill them, in source-file order.

    Router gates are fp32; other parameters `dtype`, or (None) the dtype their source tensors are stored in."""
    arrays: dict[str, ArrayPlan] = {}
    blocks: list[Block] = []
    for i, spec in enumerate(specs):
        key = array_key(spec.path)
        quantized = quantize is not None and is_expert_weight_path(spec.path)
        if quantized:
            out_dtype = np.dtype(np.int8)
        else:
            out_dtype = NUMPY_DTYPES["float32" if spec.fp32 else dtype or stored_dtype(ckpt, spec)]
        shape = spec.shape
        if spec.stacked or quantized:
            axis = 0
        else:
            axis = _block_axis(spec.view([ckpt.get(n) for n in spec.sources]))  # maps only, touches nothing
        row_elems = int(np.prod(shape, dtype=np.int64)) // shape[axis]
        row_bytes = row_elems * out_dtype.itemsize
        work_bytes = row_elems * 4 if quantized else row_bytes  # a quantized block is held in fp32 once
        rows = min(shape[axis], max(1, block_bytes // max(work_bytes, 1)))
        chunks = tuple(rows if d == axis else s for d, s in enumerate(shape))
        arrays[key] = ArrayPlan(shape, out_dtype, chunks)
        scale_key = None
        if quantized:
            scale_key = array_key(scale_path(spec.path))
            arrays[scale_key] = ArrayPlan((shape[0], shape[2]), np.dtype(np.float32), (rows, shape[2]))
        for b in range(-(-shape[axis] // rows)):
            lo, hi = b * rows, min((b + 1) * rows, shape[axis])
            index = tuple(slice(lo, hi) if d == axis else slice(None) for d in range(len(shape)))
            first = spec.sources[lo] if spec.stacked else spec.sources[0]
            order = (ckpt.weight_map[first], ckpt.info(first).begin, b)
            blocks.append(Block(i, key, b, index, (hi - lo) * row_bytes, order, scale_key))
    blocks.sort(key=lambda blk: blk.order)
    return arrays, blocks


def read_block(ckpt: HFCheckpoint, spec: ParamSpec, block: Block, dtype: np.dtype) -> np.ndarray:
    """The block's region of the JAX-layout parameter, as a fresh contiguous array of `dtype`.

    The source tensors are mapped afresh for this block (and unmapped when it returns, so only the pages this
    block touched were ever resident). The bytes a block spans are copied to RAM in one sequential pass before
    being transposed there in tiles, so a cold (not page-cached) source is read sequentially, not in the
    row-strided order of a transpose.
    """
    if spec.stacked:
        lo, hi = block.index[0].start, block.index[0].stop
        view = spec.view([np.array(ckpt.map_tensor(n)) for n in spec.sources[lo:hi]])
        region = np.asarray(view[(slice(None), *block.index[1:])])
    else:
        maps = [ckpt.map_tensor(n) for n in spec.sources]
        region = np.asarray(spec.view(maps)[block.index])
        if len(maps) == 1 and not region.flags.c_contiguous:
            region = stage_in_memory(region, maps[0])
    data = region if (region.flags.owndata and region.flags.c_contiguous) else contiguous_copy(region)
    return data if data.dtype == dtype else data.astype(dtype)


def block_writes(ckpt: HFCheckpoint, spec: ParamSpec, block: Block, arrays: dict[str, ArrayPlan]) -> list[tuple]:
    """`(key, index, array)` writes of one block: its region, or its int8 experts and their scales."""
    if block.scale_key is None:
        return [(block.key, block.index, read_block(ckpt, spec, block, arrays[block.key].dtype))]
    q, s = quantize_int8(read_block(ckpt, spec, block, np.dtype(np.float32)))
    return [(block.key, block.index, q), (block.scale_key, (block.index[0], slice(None)), s)]


def stage_in_memory(view: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """The same strided `view` of the C-contiguous `mapped` array, over a RAM copy of just the bytes it spans."""
    lo, hi = byte_bounds(view)
    base = byte_bounds(mapped)[0]
    buf = np.array(mapped.reshape(-1).view(np.uint8)[lo - base:hi - base])
    first = view.__array_interface__["data"][0]
    return np.ndarray(view.shape, view.dtype, buffer=buf, offset=first - lo, strides=view.strides)


def batches(blocks: list[Block], done: set[str], batch_bytes: int) -> Iterator[list[Block]]:
    """Unfinished blocks grouped into commits of about `batch_bytes` (a larger block is a batch of its own)."""
    batch, size = [], 0
    for block in blocks:
        if block.id in done:
            continue
        if batch and size + block.nbytes > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(block)
        size += block.nbytes
    if batch:
        yield batch


def source_check(src: Path, dst: Path) -> None:
    src, dst = src.resolve(), dst.resolve()
    if src == dst or src in dst.parents:
        raise ConvertError(f"destination {dst} must not be the source directory or inside it")
    if directory_state(src) in (COMPLETE, INCOMPLETE):
        raise ConvertError(f"{src} is an m1jax checkpoint, not an HF checkpoint (use `m1jax export` to go back)")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                       workers: int = 2, block_bytes: int = BLOCK_BYTES, progress: bool = True,
                       stream=None, quantize: str | None = None) -> Path:
    """Convert the HF checkpoint `src` (either layout) into the m1jax checkpoint `dst`; return `dst`.

    Validates everything first (raising `CheckpointError` listing every bad tensor and file) and writes
    nothing until then. `dst` must be absent, empty, an interrupted conversion of the same source with the same
    arguments (resumed), or a finished one of them (left as is). Router gates are stored fp32, the rest `dtype`
    (None: each tensor in the dtype it is stored in, so the conversion is lossless).
    With `quantize="int8-experts"` the routed experts' weights are int8 with fp32 scales (recorded in the marker,
    so `from_pretrained` loads them as such).
    """
    src, dst = Path(src), Path(dst)
    stream = sys.stderr if stream is None else stream
    dtype = None if dtype is None else canonical_dtype(dtype)
    if workers < 1:
        raise ConvertError(f"--workers must be at least 1, got {workers}")
    if quantize not in QUANTIZE_MODES:
        raise ConvertError(f"--quantize must be one of {[m for m in QUANTIZE_MODES if m]} (or absent), "
                           f"got {quantize!r}")
    source_check(src, dst)
    ckpt = HFCheckpoint(src)
    specs = ckpt.validate()
    arguments = {"dtype": dtype or "stored", "block_bytes": int(block_bytes), "layout": ckpt.layout, "format": FORMAT,
                 "format_version": FORMAT_VERSION}
    if quantize is not None:
        arguments["quantize"] = quantize
    source = ckpt.fingerprint()
    state = directory_state(dst)
    journal_path = dst / JOURNAL
    if state == COMPLETE:
        return _already_complete(dst, arguments, source, stream, progress)
    if state not in (ABSENT, EMPTY, INCOMPLETE):
        raise ConvertError(f"destination {dst} exists and is not empty, and is not an interrupted m1jax "
                           f"conversion; refusing to write into it (choose a new or empty directory)")
    if state == INCOMPLETE and not journal_path.exists():
        raise ConvertError(f"destination {dst} has {PARAMS}/ but no conversion journal; it cannot be resumed "
                           f"safely: delete it and convert again")

    arrays, blocks = plan(ckpt, specs, dtype, block_bytes, quantize)
    if state == INCOMPLETE:
        journal = Journal.resume(journal_path, arguments, source, what=f"destination {dst}")
    else:
        dst.mkdir(parents=True, exist_ok=True)
        journal = Journal.start(journal_path, arguments, source)
    try:
        store = OrbaxArrayStore(dst / PARAMS)
        store.create({k: (a.shape, a.dtype, a.chunks) for k, a in arrays.items()})
        total = sum(b.nbytes for b in blocks)
        finished = sum(b.nbytes for b in blocks if b.id in journal.done)
        done_blocks = sum(b.id in journal.done for b in blocks)
        if progress and done_blocks:
            stream.write(f"convert: resuming {dst}: {done_blocks}/{len(blocks)} blocks "
                         f"({human_bytes(finished)}) already converted\n")
        with progress_bar("convert", total, finished, stream=stream, enabled=progress) as bar:
            _write_blocks(ckpt, specs, arrays, blocks, journal, store, bar, workers, block_bytes)
        store.finalize({k: (a.shape, a.dtype, a.chunks) for k, a in arrays.items()})
        shutil.copyfile(src / "config.json", dst / ".config.json.tmp")
        os.replace(dst / ".config.json.tmp", dst / "config.json")
        tokenizer = copy_tokenizer_files(src, dst)
        write_json_atomic(dst / MARKER, {
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype or ckpt.main_dtype(), "params_dir": PARAMS,
            **({"quantize": quantize} if quantize is not None else {}),
            "arguments": arguments, "source": source, "tokenizer_files": tokenizer,
            "total_bytes": total,
            "parameters": {k: {"shape": list(a.shape), "dtype": DTYPE_NAMES[a.dtype]} for k, a in arrays.items()},
        })
    finally:
        journal.close()
    journal_path.unlink()
    fsync_dir(dst)
    return dst


def _already_complete(dst: Path, arguments: dict, source: dict, stream, progress: bool) -> Path:
    marker = json.loads((dst / MARKER).read_text())
    diffs = describe_differences({"arguments": marker.get("arguments", {}), "source": marker.get("source", {})},
                                 {"arguments": arguments, "source": source})
    if diffs:
        raise ConvertError(f"destination {dst} already holds a complete m1jax checkpoint of different inputs "
                           f"({'; '.join(diffs[:10])}); choose another destination or delete it")
    (dst / JOURNAL).unlink(missing_ok=True)  # left behind if a run died right after writing the marker
    if progress:
        stream.write(f"convert: {dst} is already a complete conversion of this source; nothing to do\n")
    return dst


def _write_blocks(ckpt, specs, arrays, blocks, journal, store, bar, workers, batch_bytes) -> None:
    """Run the batches on `workers` threads (at most `workers` in flight); journal each one after its commit."""
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    commits = [0]
    lock = threading.Lock()

    def run(batch: list[Block]) -> None:
        writes = [w for b in batch for w in block_writes(ckpt, specs[b.spec], b, arrays)]
        store.write_batch(writes)  # returns once the commit is on disk (tensorstore fsyncs data and manifest)
        del writes
        with lock:
            journal.record([b.id for b in batch])
            commits[0] += 1
            if kill_after and commits[0] >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.update(sum(b.nbytes for b in batch))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m1jax-convert") as pool:
        pending = set()
        for batch in batches(blocks, journal.done, batch_bytes):
            if len(pending) >= workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    f.result()
            pending.add(pool.submit(run, batch))
        for f in pending:
            f.result()
