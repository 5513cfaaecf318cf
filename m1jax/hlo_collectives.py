"""Collectives and costs in compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`): what moves, how
much, and (`instruction_costs`) the bytes and FLOPs of every instruction that runs, loop bodies times their trip
counts, to rank what a step spends its memory traffic on.

Each collective instruction is counted once with the bytes of its result (an all-gather: the gathered array;
a reduce-scatter: the scattered shard; an all-reduce, all-to-all or collective-permute: its output buffer; a
ragged all-to-all: its whole output buffer, the worst case it was compiled for). Asynchronous pairs count once,
at their `-done` half. `Collective.count` is how often an instruction runs per execution of the program: the
product of the trip counts of the while loops around it, where a loop's condition compares its counter with a
constant (`lax.scan` / `fori_loop` with static bounds, e.g. scanned layers); a loop with a data-dependent
condition (the decode loop, a loop over the filled part of a cache) counts once, so figures are per iteration
of such a loop; of a conditional's branches only the costliest runs (e.g. one layer group's MoE).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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


def _trip_count(while_line: str, cond_lines: list[str], lines: dict[str, list[str]]) -> int | None:
    """Iterations of a while loop: XLA's `known_trip_count` when the text has it (XLA:CPU), else N for a
    condition `counter < constant(N)`, possibly fused (the TPU compiler's text; counter from 0, step 1, as
    lax.scan/fori_loop emit); None when the bound is not a constant of the condition."""
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
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of the HLO module text (asynchronous ones once, by their `-done`), with
    its execution count per run of the program (`instruction_costs`: static loops × their trip counts; of a
    conditional's branches only the one `instruction_costs` counts, so alternatives are not added up)."""
    comps = _computations(hlo_text)
    counts = {(c.computation, c.name): c.count for c in _CostModel(hlo_text).walk()} if comps else {}
    out = []
    for name, body in comps or [("", hlo_text.splitlines())]:
        for line in body:
            m = _INSTR.match(line)
            if m is None or m["phase"] == "-start":
                continue
            count = counts.get((name, m["name"]), 0) if comps else 1
            if count:
                out.append(Collective(m["name"], m["op"], _arrays(m["shape"]), count))
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


# ------------------------------------------------------------------------------------ costs per instruction
# Ops that move no data of their own (views, tuples, control flow whose bodies are counted themselves).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "add-dependency", "opt-barrier", "optimization-barrier",
         "domain"}
# Ops of one FLOP per result element (XLA's HloCostAnalysis: elementwise arithmetic; transcendentals included).
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "exponential",
                "log", "log-plus-one", "exponential-minus-one", "rsqrt", "sqrt", "tanh", "logistic", "power",
                "remainder", "sign", "floor", "ceil", "round-nearest-even", "round-nearest-afz", "sine", "cosine",
                "atan2", "compare", "select", "clamp", "and", "or", "xor", "not", "shift-left",
                "shift-right-logical", "shift-right-arithmetic", "erf", "cbrt", "tan", "is-finite"}
_SLICING = {"dynamic-slice", "slice", "gather"}  # read only their result's worth of their first operand
_COST_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(?P<flops>\d+)"[^}]*"bytes_accessed":"(?P<bytes>\d+)"')


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    shape: str  # the result shape text
    op: str
    operands: tuple[str, ...]
    line: str


def _parse(line: str) -> _Instr | None:
    """One instruction line → its name, result shape text, opcode, operand names."""
    m = _DEF.match(line)
    if m is None:
        return None
    rest = m["rest"]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    if end < 0:
        return None
    after = rest[end:].lstrip()
    paren = after.find("(")
    if paren < 0:
        return None
    operands = tuple(re.findall(r"%([\w.\-]+)", after[paren:_balanced(after, paren)]))
    return _Instr(m["name"], rest[:end], after[:paren], operands, line)


_LAYOUT_SPACE = re.compile(r"^\{[^}]*?S\((?P<space>\d+)\)")


def _shape_bytes(shape_text: str, hbm: bool = False) -> float:
    """Bytes of the arrays of a shape text; `hbm`: only those in memory space 0 (device memory: a layout's
    `S(n)`, n ≠ 0, places an array in on-chip memory, e.g. the TPU's VMEM)."""
    total = 0.0
    for m in _ARRAY.finditer(shape_text):
        if hbm:
            space = _LAYOUT_SPACE.match(shape_text[m.end():])
            if space is not None and space["space"] != "0":
                continue
        total += _nbytes(m["dtype"], [int(d) for d in m["dims"].split(",") if d])
    return total


def _elements(shape_text: str) -> int:
    return sum(math.prod(dims) for _, dims in _arrays(shape_text))


@dataclasses.dataclass(frozen=True)
class InstructionCost:
    """One instruction of a scheduled computation (the entry, loop bodies and conditions, branches; a fusion is
    one instruction): the bytes it reads and writes in memory, its FLOPs, how often it runs per execution of
    the program (`count`, see the module doc) and the JAX operation it came from (`source`, XLA's op_name)."""

    computation: str
    name: str
    op: str
    bytes: float  # read + written by one execution, every memory space
    hbm_bytes: float  # of those, in device memory (HBM)
    flops: float  # of one execution
    count: int
    source: str
    loops: tuple[str, ...] = ()  # the while instructions around it, outermost first
    trips: int | None = None  # a while loop: the trip count its body is counted with (None: unknown, once)

    @property
    def total_bytes(self) -> float:
        return self.count * self.bytes

    @property
    def total_hbm_bytes(self) -> float:
        return self.count * self.hbm_bytes

    @property
    def total_flops(self) -> float:
        return self.count * self.flops


class _CostModel:
    """Bytes and FLOPs of HLO instructions, counted the way XLA's cost analysis does: a scheduled instruction
    reads its operands and writes its result; a fusion reads of each operand only what its fused instructions
    touch (a slice of it when only slicing ops use it) and writes its result, in place (only the update) when
    the result is a dynamic-update-slice of an operand; a Mosaic kernel reports its own cost estimate.
    FLOPs: 2 per multiply-add of a dot or convolution (padding excluded), 1 per element of elementwise ops and
    per input element of reductions."""

    def __init__(self, hlo_text: str):
        self.comps = _computations(hlo_text)
        self.instrs: dict[str, dict[str, _Instr]] = {}
        for comp, body in self.comps:
            parsed = (_parse(line) for line in body)
            self.instrs[comp] = {i.name: i for i in parsed if i is not None}
        self._flops_cache: dict[str, float] = {}

    # -------------------------------------------------------------- FLOPs
    def flops(self, i: _Instr) -> float:
        m = _COST_ESTIMATE.search(i.line)
        if m is not None:
            return float(m["flops"])
        if i.op == "fusion":
            callee = _CALLEE.search(i.line)
            return self.computation_flops(callee["name"]) if callee else 0.0
        if i.op == "dot":
            return 2.0 * _elements(i.shape) * self._contracted(i)
        if i.op == "convolution":
            return self._convolution_flops(i)
        if i.op in _ELEMENTWISE:
            return float(_elements(i.shape))
        if i.op in ("reduce", "reduce-window"):
            comp = self._computation_of(i)
            return float(sum(_elements(comp[o].shape) for o in i.operands[:max(len(i.operands) // 2, 1)]
                             if o in comp))
        return 0.0

    def computation_flops(self, comp: str) -> float:
        if comp not in self._flops_cache:
            self._flops_cache[comp] = sum(self.flops(i) for i in self.instrs.get(comp, {}).values())
        return self._flops_cache[comp]

    def _computation_of(self, i: _Instr) -> dict[str, _Instr]:
        for instrs in self.instrs.values():
            if instrs.get(i.name) is i:
                return instrs
        return {}

    def _contracted(self, i: _Instr) -> int:
        comp = self._computation_of(i)
        lhs = comp.get(i.operands[0]) if i.operands else None
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.line)
        if lhs is None or m is None:
            return 1
        dims = _arrays(lhs.shape)[0][1]
        return math.prod(dims[int(d)] for d in m[1].split(",") if d)

    def _convolution_flops(self, i: _Instr) -> float:
        """2 × output elements × (input features per group) × valid kernel positions per output position."""
        comp = self._computation_of(i)
        lhs, rhs = (comp.get(o) for o in i.operands[:2])
        labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.line)
        if lhs is None or rhs is None or labels is None:
            return 0.0
        lhs_dims, rhs_dims, out_dims = _arrays(lhs.shape)[0][1], _arrays(rhs.shape)[0][1], _arrays(i.shape)[0][1]
        lhs_l, rhs_l, out_l = labels.groups()
        groups = re.search(r"feature_group_count=(\d+)", i.line)
        in_features = rhs_dims[rhs_l.index("i")]
        out_elems = math.prod(out_dims)
        window = re.search(r"window=\{([^}]*)\}", i.line)
        fields = dict(re.findall(r"(\w+)=([\w\-]+)", window[1])) if window else {}

        def field(key, n, default):
            return [int(x) for x in fields[key].replace("-", "_").split("x")] if key in fields else [default] * n

        spatial = [c for c in rhs_l if c.isdigit()]
        n = len(spatial)
        sizes, strides = field("size", n, 1), field("stride", n, 1)
        dil = field("rhs_dilate", n, 1)
        pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else \
            [(0, 0)] * n
        valid_per_output = 1.0
        for s, c in enumerate(spatial):
            in_size, out_size = lhs_dims[lhs_l.index(c)], out_dims[out_l.index(c)]
            valid = 0
            for k in range(sizes[s]):  # output positions o with 0 ≤ o·stride + k·dilation − pad_low < in_size
                lo = pads[s][0] - k * dil[s]
                first = max(0, -(-lo // strides[s]))
                last = min(out_size - 1, (in_size - 1 + lo) // strides[s])
                valid += max(0, last - first + 1)
            valid_per_output *= valid / out_size
        del groups  # rhs input features are already per group
        return 2.0 * out_elems * in_features * valid_per_output

    # -------------------------------------------------------------- bytes
    def bytes(self, comp: str, i: _Instr, hbm: bool = False) -> float:
        """Bytes instruction `i` of scheduled computation `comp` reads and writes (`hbm`: in device memory)."""
        instrs = self.instrs[comp]

        def size(name_or_shape: str, is_name: bool = True) -> float:
            if is_name:
                return _shape_bytes(instrs[name_or_shape].shape, hbm) if name_or_shape in instrs else 0.0
            return _shape_bytes(name_or_shape, hbm)

        if i.op in _FREE or i.op.endswith("-start"):
            return 0.0
        if i.op.endswith("-done"):  # the async pair as one: the start's operands, the done's result
            start = instrs.get(i.operands[0]) if i.operands else None
            return size(i.shape, False) + sum(size(o) for o in (start.operands if start is not None else ()))
        m = _COST_ESTIMATE.search(i.line)
        if m is not None:  # a Mosaic kernel's own estimate (its operands in device memory)
            return float(m["bytes"])
        if i.op == "dynamic-update-slice" and len(i.operands) > 1:  # in place: the update read and written
            return size(i.operands[1]) + size(i.operands[1]) * (size(i.shape, False) > 0)
        if i.op in _SLICING and i.operands:
            return size(i.shape, False) + _shape_bytes(i.shape) * (size(i.operands[0]) > 0)
        if i.op == "fusion":
            callee = _CALLEE.search(i.line)
            if callee is not None and callee["name"] in self.instrs:
                reads, written = self._fusion_access(callee["name"])
                read = sum(size(o) if k not in reads else reads[k] * (size(o) > 0)
                           for k, o in enumerate(i.operands))
                out = size(i.shape, False)
                return read + (out if written is None else written * (out > 0))
        return size(i.shape, False) + sum(size(o) for o in i.operands)

    def _fusion_access(self, comp: str) -> tuple[dict[int, float], float | None]:
        """Per parameter index of a fused computation the bytes read when less than the whole operand (only
        slicing users, or the in-place operand of a dynamic-update-slice root), and the bytes written when the
        root updates in place (None: the whole result)."""
        instrs = self.instrs[comp]
        users: dict[str, list[_Instr]] = {}
        for i in instrs.values():
            for o in i.operands:
                users.setdefault(o, []).append(i)
        root = next((i for i in instrs.values() if i.line.lstrip().startswith("ROOT")), None)
        outputs = [instrs[o] for o in root.operands if o in instrs] if root is not None and root.op == "tuple" \
            else [root] if root is not None else []
        in_place = {o.operands[0] for o in outputs if o.op == "dynamic-update-slice"}
        written = None
        if outputs and in_place:
            written = sum(_shape_bytes(instrs[o.operands[1]].shape) if o.op == "dynamic-update-slice" and
                          o.operands[1] in instrs else _shape_bytes(o.shape) for o in outputs)
        reads = {}
        for i in instrs.values():
            if i.op != "parameter":
                continue
            k = int(re.search(r"parameter\((\d+)\)", i.line)[1])
            us = users.get(i.name, [])
            if i.name in in_place:
                reads[k] = 0.0
            elif us and all(u.op in _SLICING and u.operands[0] == i.name for u in us):
                reads[k] = sum(_shape_bytes(u.shape) for u in us)
            elif us and all(u.op == "fusion" for u in us):  # nested fusions, each reading part of it
                total = 0.0
                for u in us:
                    callee = _CALLEE.search(u.line)
                    inner = self._fusion_access(callee["name"])[0] if callee and callee["name"] in self.instrs \
                        else {}
                    total += inner.get(u.operands.index(i.name), _shape_bytes(i.shape))
                reads[k] = min(total, _shape_bytes(i.shape))
        return reads, written

    # -------------------------------------------------------------- walk
    def walk(self, loops: bool = True, trips: dict[str, int] | None = None) -> list[InstructionCost]:
        """Every scheduled instruction with its count per run: loop bodies × their trip counts (`loops`; else
        once, as XLA's cost analysis counts them), of a conditional only its costliest branch. `trips`:
        {substring of a while loop's op_name: its trip count} for loops whose bound is not a constant."""
        lines = dict(self.comps)
        memo: dict[str, float] = {}

        def total(comp: str) -> float:  # bytes of one execution of a scheduled computation, callees included
            if comp not in memo:
                memo[comp] = sum(c.bytes for c in visit(comp, 1, ()))
            return memo[comp]

        def visit(comp: str, count: int, loop_path: tuple[str, ...]) -> list[InstructionCost]:
            here = []
            for i in self.instrs.get(comp, {}).values():
                src = _OP_NAME.search(i.line)
                source = src["name"] if src else ""
                n = None
                if i.op == "while":
                    body, cond = (re.search(rf"\b{k}=%?([\w.\-]+)", i.line) for k in ("body", "condition"))
                    n = _trip_count(i.line, lines.get(cond[1], []), lines) if cond is not None else None
                    given = [t for key, t in (trips or {}).items() if key in source]
                    n = given[0] if given and n is None else n
                here.append(InstructionCost(comp, i.name, i.op, self.bytes(comp, i), self.bytes(comp, i, hbm=True),
                                            0.0 if i.op in _FREE else self.flops(i), count, source, loop_path, n))
                if i.op == "while":
                    n = (n or 1) if loops else 1
                    for c in (body, cond):
                        if c is not None:
                            here += visit(c[1], count * n, (*loop_path, i.name))
                elif i.op == "conditional":
                    m = _BRANCHES.search(i.line)
                    names = [n.strip().lstrip("%") for n in m["names"].split(",")] if m else \
                        [c["name"] for c in _CALLEE.finditer(i.line) if c["key"].endswith("_computation")]
                    if names:
                        here += visit(max(names, key=total), count, loop_path)
                elif i.op in ("call", "call-start", "async-start"):
                    callee = re.search(r"\b(?:to_apply|calls)=%?([\w.\-]+)", i.line)
                    if callee is not None:
                        here += visit(callee[1], count, loop_path)
            return here

        return visit(self.comps[-1][0], 1, ()) if self.comps else []  # ENTRY comes last


def instruction_costs(hlo_text: str, loops: bool = True, trips: dict[str, int] | None = None
                      ) -> list[InstructionCost]:
    """The bytes and FLOPs of every instruction that runs in a compiled HLO module (`_CostModel`), with its
    executions per run: loop bodies times their trip counts (`loops`; else once each, as XLA's
    `cost_analysis()` counts a loop), of a conditional its costliest branch. A loop whose bound is not a
    constant counts once unless `trips` ({substring of its op_name: trip count}) names it."""
    return _CostModel(hlo_text).walk(loops, trips)


def program_cost(hlo_text: str, loops: bool = True, trips: dict[str, int] | None = None) -> dict[str, float]:
    """{"flops", "bytes accessed", "hbm bytes"} of one run of the program: sums over `instruction_costs`."""
    costs = instruction_costs(hlo_text, loops, trips)
    return {"flops": sum(c.total_flops for c in costs), "bytes accessed": sum(c.total_bytes for c in costs),
            "hbm bytes": sum(c.total_hbm_bytes for c in costs)}


def costliest(costs: Iterable[InstructionCost], n: int = 20, key: str = "hbm_bytes") -> list[dict]:
    """The `n` JAX operations (XLA op_name, and opcode) whose instructions account for the most `key`
    ("hbm_bytes", "bytes" or "flops") per run, with totals per run: instructions, executions, hbm_bytes,
    bytes, flops; sorted by `key`, largest first."""
    if key not in ("hbm_bytes", "bytes", "flops"):
        raise ValueError(f"costliest: key must be hbm_bytes, bytes or flops, got {key!r}")
    groups: dict[tuple[str, str], dict] = {}
    for c in costs:
        g = groups.setdefault((c.source, c.op), {"source": c.source, "op": c.op, "instructions": 0,
                                                 "executions": 0, "hbm_bytes": 0.0, "bytes": 0.0, "flops": 0.0})
        g["instructions"] += 1
        g["executions"] += c.count
        g["hbm_bytes"] += c.total_hbm_bytes
        g["bytes"] += c.total_bytes
        g["flops"] += c.total_flops
    return sorted(groups.values(), key=lambda g: -g[key])[:n]
