"""Collectives in compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`): what moves, and how much.

Each collective instruction is counted once with the bytes of its result (an all-gather: the gathered array;
a reduce-scatter: the scattered shard; an all-reduce, all-to-all or collective-permute: its output buffer; a
ragged all-to-all: its whole output buffer, the worst case it was compiled for). Asynchronous pairs count once,
at their `-done` half. Instructions are counted statically: one inside a loop body (a scanned layer) counts
once, not once per iteration.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Sequence

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
         "collective-broadcast")

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}

# `%name = <result shape> <op>(operands...)`; the op is the first ` <kind>[-start|-done](` on the line.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s"
                    r"(?P<op>ragged-all-to-all|all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute"
                    r"|collective-broadcast)(?P<phase>-start|-done)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subfc]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its name, kind (e.g. "all-gather") and result arrays (dtype, dims)."""

    name: str
    kind: str
    results: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def bytes(self) -> float:
        return sum(_nbytes(dt, dims) for dt, dims in self.results)


def _arrays(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
                 for m in _ARRAY.finditer(text))


def _nbytes(dtype: str, dims: Sequence[int]) -> float:
    n = 1
    for d in dims:
        n *= d
    return n * DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of the HLO module text (asynchronous ones once, by their `-done`)."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None or m["phase"] == "-start":
            continue
        out.append(Collective(m["name"], m["op"], _arrays(m["shape"])))
    return out


def bytes_by_kind(hlo_text: str) -> dict[str, float]:
    """Result bytes per collective kind (every kind in `KINDS`, 0 when absent)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for c in collectives(hlo_text):
        totals[c.kind] += c.bytes
    return totals


def counts_by_kind(hlo_text: str) -> dict[str, int]:
    """Number of instructions per collective kind (every kind in `KINDS`)."""
    counts = dict.fromkeys(KINDS, 0)
    for c in collectives(hlo_text):
        counts[c.kind] += 1
    return counts


def _is_piece_of(dims: Sequence[int], full: Sequence[int]) -> bool:
    """Whether an array of `dims` could be `full` or a shard of it: same rank, each dimension dividing the
    corresponding one of `full`, in some order of the dimensions (XLA may transpose before gathering)."""
    if len(dims) != len(full):
        return False
    return any(all(f % d == 0 for d, f in zip(dims, perm, strict=True))
               for perm in itertools.permutations(full))


def all_gathers_of(hlo_text: str, shapes: Iterable[Sequence[int]]) -> list[Collective]:
    """The all-gathers whose gathered result is one of `shapes` or a piece of one (see `_is_piece_of`): e.g.
    the global shapes of the expert weight stacks, to find any all-gather of an expert weight."""
    shapes = [tuple(s) for s in shapes]
    return [c for c in collectives(hlo_text) if c.kind == "all-gather"
            and any(_is_piece_of(dims, s) for _, dims in c.results for s in shapes)]
