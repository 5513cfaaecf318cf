"""Collectives in compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`): what moves, and how much.

Each collective instruction is counted once with the bytes of its result (an all-gather: the gathered array;
a reduce-scatter: the scattered shard; an all-reduce, all-to-all or collective-permute: its output buffer; a
ragged all-to-all: its whole output buffer, the worst case it was compiled for). Asynchronous pairs count once,
at their `-done` half. `Collective.count` is how often an instruction runs per execution of the program: the
product of the trip counts of the while loops around it, where a loop's condition compares its counter with a
constant (`lax.scan` / `fori_loop` with static bounds, e.g. scanned layers); a loop with a data-dependent
condition (the decode loop, a loop over the filled part of a cache) counts once, so figures are per iteration
of such a loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Sequence

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
    count: int = 1  # executions per run of the program (trip counts of enclosing static loops)

    @property
    def bytes(self) -> float:
        """Result bytes of one execution."""
        return sum(_nbytes(dt, dims) for dt, dims in self.results)

    @property
    def total_bytes(self) -> float:
        """Result bytes of all `count` executions."""
        return self.count * self.bytes


def _arrays(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
                 for m in _ARRAY.finditer(text))


def _nbytes(dtype: str, dims: Sequence[int]) -> float:
    n = 1
    for d in dims:
        n *= d
    return n * DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(r"\b(?P<key>condition|body|calls|to_apply|true_computation|false_computation)"
                     r"=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_CONSTANT = re.compile(r"^\s*%?(?P<name>[\w.\-]+)\s*=\s*[su]\d+\[\]\S*\s+constant\((?P<value>-?\d+)\)")
_ROOT_CALL = re.compile(r"^\s*ROOT\s.*?\s(?P<op>compare|fusion)\((?P<operands>[^)]*)\)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


def _computations(hlo_text: str) -> list[tuple[str, list[str]]]:
    """(name, body lines) of every computation, in the order of the text (callees before their callers)."""
    comps, current = [], None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m is not None and not line.startswith(" "):
            current = (m["name"], [])
            comps.append(current)
        elif current is not None and line.strip() != "}":
            current[1].append(line)
    return comps


def _trip_count(while_line: str, cond_lines: list[str], lines: dict[str, list[str]]) -> int:
    """Iterations of a while loop: XLA's `known_trip_count` when the text has it (XLA:CPU), else N for a
    condition `counter < constant(N)`, possibly fused (the TPU compiler's text; counter from 0, step 1, as
    lax.scan/fori_loop emit); 1 when the bound is not a constant of the condition."""
    m = _KNOWN_TRIPS.search(while_line)
    if m is not None:
        return max(int(m["n"]), 1)
    consts = {m["name"]: int(m["value"]) for m in map(_CONSTANT.match, cond_lines) if m}
    for line in cond_lines:
        m = _ROOT_CALL.match(line)
        if m is None:
            continue
        is_lt = "direction=LT" in line
        if m["op"] == "fusion":
            callee = _CALLEE.search(line)
            is_lt = callee is not None and any("compare(" in x and "direction=LT" in x and "ROOT" in x
                                               for x in lines.get(callee["name"], []))
        operands = [o.strip().lstrip("%") for o in m["operands"].split(",")]
        if is_lt and len(operands) == 2 and operands[1] in consts:
            return max(consts[operands[1]], 1)
    return 1


def _multipliers(hlo_text: str) -> dict[str, int]:
    """How often each computation runs per execution of the entry computation."""
    comps = _computations(hlo_text)
    lines = dict(comps)
    mult: dict[str, int] = {}
    if comps:
        mult[comps[-1][0]] = 1  # ENTRY comes last
    for name, body in reversed(comps):
        here = mult.get(name, 0)
        if here == 0:
            continue
        for line in body:
            callees = [(m["key"], m["name"]) for m in _CALLEE.finditer(line)]
            trips = 1
            for key, callee in callees:
                if key == "condition" and callee in lines:
                    trips = _trip_count(line, lines[callee], lines)
            for key, callee in callees:
                mult[callee] = mult.get(callee, 0) + here * (trips if key in ("body", "condition") else 1)
            for m in _BRANCHES.finditer(line):
                for callee in (n.strip().lstrip("%") for n in m["names"].split(",")):
                    mult[callee] = mult.get(callee, 0) + here
    return mult


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of the HLO module text (asynchronous ones once, by their `-done`), with
    its execution count per run of the program."""
    mult = _multipliers(hlo_text)
    out = []
    for name, body in _computations(hlo_text) or [("", hlo_text.splitlines())]:
        for line in body:
            m = _INSTR.match(line)
            if m is None or m["phase"] == "-start":
                continue
            out.append(Collective(m["name"], m["op"], _arrays(m["shape"]), max(mult.get(name, 1), 1)))
    return out


def bytes_by_kind(hlo_text: str) -> dict[str, float]:
    """Result bytes per collective kind moved per run of the program (loop trip counts included; every kind
    in `KINDS`, 0 when absent)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for c in collectives(hlo_text):
        totals[c.kind] += c.total_bytes
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


def all_gathers_of(hlo_text: str, shapes: Iterable[Sequence[int]],
                   parameter: Callable[[str], bool] | None = None) -> list[Collective]:
    """The all-gathers of a given weight: those whose gathered result is one of `shapes` or a piece of one (see
    `_is_piece_of`), e.g. the global shapes of the expert weight stacks.

    parameter: a test on a jit parameter's name (the `op_name` XLA records for it, e.g.
    `params['layers'][3]['block_sparse_moe']['w1'].value`). Given, a gather whose operand traces back to named
    parameters (`gathered_parameters`) counts only if one of them passes the test, whatever its shape: a shard
    of an attention projection can have the shape of a piece of an expert stack. Gathers that do not trace back
    are judged by shape alone.
    """
    shapes = [tuple(s) for s in shapes]
    graph = _Graph(hlo_text) if parameter is not None else None
    out = []
    for c in collectives(hlo_text):
        if c.kind != "all-gather" or not any(_is_piece_of(dims, s) for _, dims in c.results for s in shapes):
            continue
        names = graph.gathered_parameters(c.name) if graph is not None else None
        if names is None or any(parameter(n) for n in names):
            out.append(c)
    return out


# ------------------------------------------------------------------------------- operands back to parameters
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
_INDEX = re.compile(r"\bindex=(?P<k>\d+)")
# ops whose result is (a piece, copy or re-layout of) their first operand
_FORWARDING = {"bitcast", "copy", "copy-start", "copy-done", "convert", "reshape", "transpose", "slice",
               "dynamic-slice", "all-gather", "all-gather-start", "all-gather-done", "optimization-barrier"}


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


class _Graph:
    """Instructions of an HLO module by computation: op, operand names, tuple index, parameter names, and the
    while loops that call each body."""

    def __init__(self, hlo_text: str):
        self.instr: dict[tuple[str, str], tuple[str, list[str], str]] = {}
        self.computation_of: dict[str, str] = {}
        self.callers: dict[str, list[tuple[str, str]]] = {}  # body → [(caller computation, while instruction)]
        for comp, body in _computations(hlo_text):
            for line in body:
                m = _DEF.match(line)
                if m is None:
                    continue
                rest = m["rest"]
                end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
                after = rest[end:].lstrip()
                paren = after.find("(")
                if end < 0 or paren < 0:
                    continue
                op = after[:paren]
                operands = re.findall(r"%([\w.\-]+)", after[paren:_balanced(after, paren)])
                self.instr[(comp, m["name"])] = (op, operands, line)
                self.computation_of.setdefault(m["name"], comp)
                if op == "while":
                    callee = re.search(r"\bbody=%?([\w.\-]+)", line)
                    if callee:
                        self.callers.setdefault(callee[1], []).append((comp, m["name"]))

    def gathered_parameters(self, name: str) -> set[str] | None:
        """Names of the parameters the operand of instruction `name` is made from (through re-layouts, slices,
        fusions, tuples and the state of while loops), or None when a path ends somewhere unnamed."""
        comp = self.computation_of.get(name)
        if comp is None:
            return None
        _, operands, _ = self.instr[(comp, name)]
        names: set[str] = set()
        unresolved = [False]
        seen: set = set()

        def chase(comp: str, inst: str, index: int | None, depth: int) -> None:
            if (comp, inst, index) in seen or depth > 200:
                return
            seen.add((comp, inst, index))
            entry = self.instr.get((comp, inst))
            if entry is None:
                unresolved[0] = True
                return
            op, ops, line = entry
            if op == "parameter":
                if index is None:
                    m = _OP_NAME.search(line)
                    if m is not None:
                        names.add(m["name"])
                        return
                for caller, loop in self.callers.get(comp, []):  # a while body's state: the loop's operand
                    chase(caller, self.instr[(caller, loop)][1][0], index, depth + 1)
                if not self.callers.get(comp):
                    unresolved[0] = True
                return
            if op == "get-tuple-element":
                m = _INDEX.search(line)
                chase(comp, ops[0], int(m["k"]) if m else None, depth + 1)
            elif op == "tuple" and index is not None and index < len(ops):
                chase(comp, ops[index], None, depth + 1)
            elif op in _FORWARDING and ops:
                chase(comp, ops[0], index, depth + 1)
            elif op == "fusion":
                for o in ops:
                    chase(comp, o, None, depth + 1)
            # any other op computes a new value: not a parameter's

        for o in operands[:1]:
            chase(comp, o, None, 0)
        if unresolved[0] and not names:
            return None
        return names
