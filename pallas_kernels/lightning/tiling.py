"""Block sizes and per-backend kernel layout of the lightning-attention Pallas kernels — the one place they are chosen.

Forward algorithm on the "gpu" layout (`Tiling.algorithm`):

* "chunk_parallel" (default on GPU, `chunked.py`): a state pass (one program per (batch, head, K tile,
  V tile) walks the sequence and stores the state entering every `state_chunk` tokens) and a fully parallel
  output pass over (V tiles, chunks, batch·heads). The backward's dq (a forward-shaped problem) uses it too.
* "sequential" (`prefill._sequence_scan`): the layouts below, also used by the backward's dk/dv.

Two layouts run the same block math of the sequential kernels (`prefill._forward_block` / `prefill._reverse_block`):

* "gpu" (Pallas Triton): grid (batch, head, value tile); each program walks the sequence blocks with an
  in-kernel `lax.fori_loop`, the D×BV fp32 state living in registers. Triton needs every loaded/computed
  array to have a power-of-two size and every `dot` operand dimension ≥ 16.
* "tpu" (Mosaic): grid (batch, head, value tile, sequence block) with the last axis "arbitrary" (sequential)
  and the state in a VMEM scratch buffer. Blocks must tile (8, 128) or span the whole array dimension.

Interpret mode (CPU): `interpret=True` emulates the "gpu" layout; a `pltpu.InterpretParams` instance runs
the "tpu" layout under the TPU interpreter (which also checks for races and uninitialised reads).

The Pallas kernels pick their own sequence block C from `block_size` (see `choose_tiling`): lightning
attention is exact for any C, so C only changes results at fp rounding level.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

GPU_BLOCK_T = (16, 128)   # allowed tokens per sequence block on GPU (powers of two)
GPU_DEFAULT_BLOCK_T = 64  # largest C used unless a tiling is passed explicitly (register pressure)
GPU_BLOCK_V = 64          # value-dim tile of the prefill kernels on GPU
GPU_DECODE_BLOCK_V = 32   # value-dim tile of the decode kernel on GPU (more programs for a memory-bound op)
GPU_DEFAULT_ALGORITHM = "chunk_parallel"  # forward on GPU: "chunk_parallel" or "sequential"
GPU_STATE_CHUNK = 128     # chunk_parallel: tokens between stored states (a multiple of block_t)
GPU_TARGET_PROGRAMS = 528  # split the sequence into segments until batch·heads·tiles·segments reaches this
GPU_MIN_SEGMENT_BLOCKS = 8  # ... but keep at least this many blocks of C tokens per segment
TPU_LANES = 128
NN = (((1,), (0,)), ((), ()))  # dot dimension numbers: A B
NT = (((1,), (1,)), ((), ()))  # A Bᵀ


def dot(a, b, dims=NN):
    """The kernels' one matmul: `lax.dot_general(a, b, dims)` accumulated in fp32.

    fp32 operands multiply at `Precision.HIGHEST` (true fp32 products); anything else (bf16) at an explicit
    `Precision.DEFAULT` (native bf16 products) — Mosaic rejects HIGHEST on bf16 operands ("Bad lhs type"), and
    an explicit precision keeps a global `jax_default_matmul_precision` from reaching the kernel.
    """
    fp32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if fp32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Kernel layout for one backend (hashable: a static argument of the jitted kernels).

    target: "gpu" (fori_loop over sequence blocks, Triton) or "tpu" (sequential grid axis, Mosaic).
    block_t: tokens per sequence block C. block_v: largest value-dim tile of the prefill kernels.
    decode_block_v: value-dim tile of the decode kernel. num_warps / num_stages: Triton launch parameters.
    num_segments: sequence segments run in parallel as extra grid rows (`prefill._sequence_scan`).
    interpret: False (compiled), True (generic interpreter) or a `pltpu.InterpretParams`.

    algorithm: forward algorithm, "sequential" or "chunk_parallel" (gpu layout only; `chunked.py`). Its fields:
    state_chunk: tokens between stored states Cs (a multiple of block_t and state_block_t); the output pass
      handles Cs tokens per program in sub-chunks of block_t. state_block_t: tokens per step of the state pass.
    state_block_k / state_block_v / state_num_warps / state_num_stages: state-pass tiles and launch parameters.
    chunk_block_v / chunk_num_warps / chunk_num_stages: output-pass value tile and launch parameters (fp32
      operands use at most 64 value columns there: shared memory). chunk_group: chunks per output-pass
      program, walked in a loop whose loads Triton can pipeline (lowered to the largest power of two ≤ it
      that divides the number of chunks).
    """

    target: str
    block_t: int
    block_v: int
    decode_block_v: int
    num_warps: int = 4
    num_stages: int = 2
    num_segments: int = 1
    interpret: Any = False
    algorithm: str = "sequential"
    state_chunk: int = GPU_STATE_CHUNK
    state_block_t: int = 64
    state_block_k: int = 64
    state_block_v: int = 64
    state_num_warps: int = 4
    state_num_stages: int = 3
    chunk_block_v: int = 64
    chunk_num_warps: int = 4
    chunk_num_stages: int = 2
    chunk_group: int = 1

    @property
    def seq_in_grid(self) -> bool:
        return self.target == "tpu"

    def compiler_params(self, num_grid_axes: int, sequential_last: bool, *, num_warps: int | None = None,
                        num_stages: int | None = None):
        """Backend compiler parameters for a pallas_call with `num_grid_axes` grid axes (Triton launch
        parameters default to `num_warps` / `num_stages`)."""
        if self.target == "tpu":
            sem = ["parallel"] * num_grid_axes
            if sequential_last:
                sem[-1] = "arbitrary"
            return pltpu.CompilerParams(dimension_semantics=tuple(sem))
        if self.interpret:
            return None
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps or self.num_warps,
                                       num_stages=num_stages or self.num_stages)

    def value_tile(self, dim: int, *, decode: bool = False, cap: int | None = None) -> int:
        """Tile of a value-like dimension `dim` (the output width of a kernel); `cap` overrides the block field."""
        if cap is None:
            cap = self.decode_block_v if decode else self.block_v
        tile = min(cap, dim)
        if dim % tile:
            raise NotImplementedError(f"value dim {dim} is not a multiple of the tile {tile}")
        return tile


def resolve_interpret(interpret):
    """`None` → interpret on CPU (the only mode Pallas has there), compiled elsewhere."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def target_for(interpret) -> str:
    """Which layout runs: "tpu" on TPU or under the TPU interpreter, else "gpu" (also plain interpret)."""
    if isinstance(interpret, pltpu.InterpretParams) or jax.default_backend() == "tpu":
        return "tpu"
    return "gpu"


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def choose_tiling(seq_len: int, head_dim: int, value_dim: int, *, batch: int = 1, heads: int = 1,
                  block_size: int = 256, interpret=None, **overrides) -> Tiling:
    """Pick the kernel layout and block sizes; raise NotImplementedError for shapes a backend cannot tile.

    GPU: C = clamp(pow2_floor(block_size), 16, 64), shrunk towards the sequence length (but ≥ 16); head
    dims must be powers of two ≥ 16; the sequence is split into power-of-two segments until
    batch·heads·value-tiles·segments ≥ GPU_TARGET_PROGRAMS (≈ 4 programs per H100 SM; compiled only — under
    the interpreter segments only add a pass, tests ask for them explicitly).
    GPU forward algorithm: GPU_DEFAULT_ALGORITHM ("chunk_parallel"), states every GPU_STATE_CHUNK tokens (at
    most the sequence rounded up to a power of two, at least C); the other chunk_parallel fields are the
    `Tiling` defaults (checked for sm_90 registers / shared memory with `offline_triton_check.py`).
    TPU: C = block_size rounded up to a multiple of 128, at most the padded sequence; head dims must be
    multiples of 128 when compiled (any size under the interpreter); always the "sequential" algorithm.
    `overrides` replace fields (for tuning sweeps), e.g. `block_t=128, num_warps=8`.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    interpret = resolve_interpret(interpret)
    target = target_for(interpret)
    seq = max(int(seq_len), 1)
    if target == "gpu":
        for name, d in (("head_dim", head_dim), ("value_dim", value_dim)):
            if d < 16 or d & (d - 1):
                raise NotImplementedError(f"Pallas GPU lightning kernels need a power-of-two {name} >= 16, got {d}")
        block_t = min(_pow2_floor(block_size), GPU_DEFAULT_BLOCK_T, pl.next_power_of_2(seq))
        block_t = max(block_t, GPU_BLOCK_T[0])
        programs = batch * heads * max(value_dim // GPU_BLOCK_V, 1)
        n_blocks = -(-seq // block_t)
        segments = 1
        while (not interpret and programs * segments < GPU_TARGET_PROGRAMS
               and n_blocks >= 2 * segments * GPU_MIN_SEGMENT_BLOCKS):
            segments *= 2
        tiling = Tiling("gpu", block_t, GPU_BLOCK_V, GPU_DECODE_BLOCK_V, num_segments=segments,
                        interpret=interpret, algorithm=GPU_DEFAULT_ALGORITHM,
                        state_chunk=min(GPU_STATE_CHUNK, max(block_t, pl.next_power_of_2(seq))))
    else:
        if not interpret and (head_dim % TPU_LANES or value_dim % TPU_LANES):
            raise NotImplementedError(f"Pallas TPU lightning kernels need head dims that are multiples of "
                                      f"{TPU_LANES}, got {head_dim}, {value_dim}")
        block_t = max(TPU_LANES, -(-int(block_size) // TPU_LANES) * TPU_LANES)
        block_t = min(block_t, -(-seq // TPU_LANES) * TPU_LANES)
        tiling = Tiling("tpu", block_t, TPU_LANES, TPU_LANES, interpret=interpret)
    tiling = dataclasses.replace(tiling, **overrides)
    if target == "gpu" and not (GPU_BLOCK_T[0] <= tiling.block_t <= GPU_BLOCK_T[1]
                                and tiling.block_t & (tiling.block_t - 1) == 0):
        raise NotImplementedError(f"GPU block_t must be a power of two in {GPU_BLOCK_T}, got {tiling.block_t}")
    if tiling.algorithm == "chunk_parallel":
        if target != "gpu":
            raise NotImplementedError("the chunk_parallel forward exists for the gpu layout only")
        if "state_chunk" not in overrides:  # follow an overridden block size
            tiling = dataclasses.replace(tiling, state_chunk=max(tiling.state_chunk, tiling.block_t,
                                                                 tiling.state_block_t if "state_block_t" in overrides
                                                                 else 0))
        if "state_block_t" not in overrides:
            tiling = dataclasses.replace(tiling, state_block_t=min(tiling.state_block_t, tiling.state_chunk))
        check_chunk_tiling(tiling)
    elif tiling.algorithm != "sequential":
        raise ValueError(f"algorithm must be 'sequential' or 'chunk_parallel', got {tiling.algorithm!r}")
    return tiling


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_chunk_tiling(tiling: Tiling) -> None:
    """Raise NotImplementedError unless the chunk_parallel fields can be tiled (powers of two, Cs a multiple of
    block_t and state_block_t, every tile ≥ 16 for Triton's dot)."""
    fields = ("block_t", "state_chunk", "state_block_t", "state_block_k", "state_block_v", "chunk_block_v")
    for name in fields:
        value = getattr(tiling, name)
        if not (_is_pow2(value) and value >= 16):
            raise NotImplementedError(f"chunk_parallel needs {name} to be a power of two >= 16, got {value}")
    if not _is_pow2(tiling.chunk_group):
        raise NotImplementedError(f"chunk_group must be a power of two, got {tiling.chunk_group}")
    if tiling.state_chunk % tiling.block_t or tiling.state_chunk % tiling.state_block_t:
        raise NotImplementedError(f"state_chunk {tiling.state_chunk} must be a multiple of block_t "
                                  f"{tiling.block_t} and state_block_t {tiling.state_block_t}")
