"""Read SASS (``nvdisasm -c`` text) and find the instructions a thread executes on a kernel's hot path.

No GPU is involved: this is static analysis of disassembly, used by ``bench/codegen.py`` and the compile-and-inspect
tests. The text is split into functions, each function into basic blocks (a block starts at offset 0, at every
branch target and after every branch/EXIT/RET); loops are cut at their back edges (found by a depth-first walk
from the entry), which leaves a DAG in which each loop body is counted once.

The hot path is then one entry-to-exit path of that DAG, chosen by ``hot_path``: the path with the most *widest*
global stores (the vectorized data stores of the fast path), and among those the fewest instructions. Fewest,
because the cold code of a fast path is a branch around it: the slow argument reduction of libdevice sin/cos,
the scalar tail, the unaligned fallback. A predicated instruction counts as executed. Returning ``CALL`` targets are
not followed (none of our kernels makes calls on its fast path).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Instr", "parse", "hot_path", "access_bytes", "GLOBAL_STORES", "GLOBAL_LOADS", "GENERIC", "LOCAL"]

_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^\s*(\.L\w+):\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_OPERAND_PRED = re.compile(r"!?U?P[0-9]")
_TARGET = re.compile(r"`\((\.L\w+)\)")

GLOBAL_STORES = ("STG",)          # explicit global-space stores
GLOBAL_LOADS = ("LDG",)
GENERIC = ("LD", "ST")            # generic-space accesses: the address space is resolved at run time
LOCAL = ("LDL", "STL")            # thread-local memory: spills or stack arrays
_STORES = ("STG", "ST")
_ENDS = ("EXIT", "RET", "KILL")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass
class Instr:
    offset: int
    pred: str | None
    op: str               # full opcode with modifiers, e.g. "STG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]

    @property
    def target(self) -> str | None:
        m = _TARGET.search(self.operands)
        return m.group(1) if m else None


@dataclass
class Function:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)   # label -> index of the instruction it marks


def parse(text: str) -> dict[str, Function]:
    """``nvdisasm -c`` output -> {function name: Function} (names as the disassembler prints them)."""
    funcs: dict[str, Function] = {}
    cur: Function | None = None
    pending: list[str] = []
    for line in text.splitlines():
        if m := _FUNC.match(line):
            cur = funcs.setdefault(m.group(1), Function(m.group(1)))
            pending = []
        elif cur is None:
            continue
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.match(line):
            pred = m.group(2).strip() if m.group(2) else None
            for lab in pending:
                cur.labels[lab] = len(cur.instrs)
            pending = []
            cur.instrs.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return funcs


def access_bytes(ins: Instr) -> int:
    """Bytes moved per thread by a load/store instruction (STG.E.128 -> 16, STG.E.U16 -> 2, STG.E -> 4)."""
    for mod in ins.op.split(".")[1:]:
        if mod in _WIDTH:
            return _WIDTH[mod]
    return 4


def _is_jump(ins: Instr) -> bool:
    # CALL.REL.NOINC pushes no return address: ptxas uses it as a plain (often predicated) jump, e.g. to a loop's
    # EXIT block. Other CALLs return to the next instruction and are not followed.
    return ins.base in ("BRA", "JMP") or (ins.base == "CALL" and "NOINC" in ins.op)


def _blocks(fn: Function) -> tuple[list[tuple[int, int]], dict[int, list[int]]]:
    """Basic blocks as (first, last+1) instruction index ranges, and successor block indices of each block."""
    n = len(fn.instrs)
    leaders = {0} | set(fn.labels.values())
    for i, ins in enumerate(fn.instrs):
        if _is_jump(ins) or ins.base in ("BRX", "JMX") or ins.base in _ENDS:
            leaders.add(i + 1)
    starts = sorted(x for x in leaders if x < n)
    ranges = [(s, e) for s, e in zip(starts, starts[1:] + [n])]
    at = {s: b for b, (s, _) in enumerate(ranges)}
    succ: dict[int, list[int]] = {}
    for b, (s, e) in enumerate(ranges):
        last = fn.instrs[e - 1]
        out: list[int] = []
        falls = True
        if _is_jump(last):
            tgt = last.target
            if tgt is None or tgt not in fn.labels:
                raise ValueError(f"{fn.name}: cannot resolve branch target of {last}")
            out.append(at[fn.labels[tgt]])
            # @P BRA, BRA.DIV (taken only when the warp diverged), @P CALL.REL.NOINC fall through when not taken
            # and BRA.U !UP0, `(target): a uniform predicate given as an operand
            falls = last.pred is not None or last.op.startswith("BRA.DIV") or bool(_OPERAND_PRED.match(last.operands))
        elif last.base in ("BRX", "JMX"):
            raise ValueError(f"{fn.name}: indirect branch at {last.offset:#x} is not supported")
        elif last.base in _ENDS:
            falls = last.pred is not None
        if falls and e < n:
            out.append(at[e])
        succ[b] = out
    return ranges, succ


def _dag(succ: dict[int, list[int]]) -> dict[int, list[int]]:
    """Drop the back edges found by an iterative depth-first walk from block 0."""
    dag = {b: [] for b in succ}
    state = {0: 1}                       # 1 = on the stack, 2 = done
    stack = [(0, iter(succ[0]))]
    while stack:
        b, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            state[b] = 2
            stack.pop()
        elif state.get(nxt) == 1:
            continue                     # back edge: a loop
        else:
            dag[b].append(nxt)
            if nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
    return dag


def hot_path(fn: Function) -> list[Instr]:
    """The instructions of the hot path (see the module docstring), in address order."""
    ranges, succ = _blocks(fn)
    dag = _dag(succ)
    stores = [i for i in fn.instrs if i.base in _STORES]
    widest = max((access_bytes(i) for i in stores), default=0)

    def weight(b: int) -> tuple[int, int]:
        s, e = ranges[b]
        wide = sum(1 for i in fn.instrs[s:e] if i.base in _STORES and access_bytes(i) == widest)
        return (-wide, e - s)

    # reachable blocks in topological order (reverse post-order of the DAG)
    order, seen = [], set()
    stack = [(0, iter(dag[0]))]
    seen.add(0)
    while stack:
        b, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(b)
            stack.pop()
        elif nxt not in seen:
            seen.add(nxt)
            stack.append((nxt, iter(dag[nxt])))
    order.reverse()
    best: dict[int, tuple[tuple[int, int], list[int]]] = {0: (weight(0), [0])}
    for b in order:
        if b not in best:
            continue
        cost, path = best[b]
        for nxt in dag[b]:
            w = weight(nxt)
            cand = ((cost[0] + w[0], cost[1] + w[1]), path + [nxt])
            if nxt not in best or cand[0] < best[nxt][0]:
                best[nxt] = cand
    exits = [b for b in best if fn.instrs[ranges[b][1] - 1].base in _ENDS]
    if not exits:
        raise ValueError(f"{fn.name}: no path from the entry reaches an EXIT")
    _, path = min((best[b] for b in exits), key=lambda cp: cp[0])
    return [ins for b in path for ins in fn.instrs[ranges[b][0]:ranges[b][1]]]
