"""Reading a compiled XLA program's HLO text: its computations, while-loop trip counts, the model call (named
scope) of each op, and from them what one run of the program moves and computes per device:

- `collectives`: collective payload bytes by kind and model call, every loop's trip count applied;
- `op_costs` / `roofline`: HBM bytes accessed and matmul FLOPs per op with trip counts applied (XLA's own
  `cost_analysis` counts a loop body once), summed by model call and by what the op does (matmuls, float
  conversions, copies and transposes, slicing of scanned stacks, ...), with a per-op roofline time
  max(FLOPs / peak, bytes / bandwidth) on a chip.

The steps name each model call with `jax.named_scope` (distill.py), which reaches the HLO as op_name metadata.
"""

from __future__ import annotations

import collections
import math
import re
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------- the module
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")  # dtype, dims, layout
_HEAD = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_COLL = re.compile(r" (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r" while\(%([\w.\-]+)\).*condition=%([\w.\-]+), body=%([\w.\-]+)")
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_CONST = re.compile(r"[su]32\[\](?:\{[^}]*\})? constant\((-?\d+)\)")  # TPU HLO adds a layout
_INDEX = re.compile(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|true_computation|false_computation)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")


def _arrays(type_str: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array of a type: libtpu's memory-space assignment places some buffers in
    on-chip memory (a layout with `S(n)`, n > 0), which move through `copy-start` prefetches instead."""
    return [(int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _DTYPE_BYTES[dt],
             not re.search(r"S\([1-9]", layout)) for dt, dims, layout in _ARRAY.findall(type_str)]


def _array_bytes(type_str: str) -> list[int]:
    return [n for n, _ in _arrays(type_str)]


def _hbm_bytes(type_str: str) -> list[int]:
    return [n * in_hbm for n, in_hbm in _arrays(type_str)]


def _op(rhs: str, name: str) -> list[str] | None:
    """The operand names of an instruction `name(...)`, or None if rhs is another instruction."""
    m = re.search(r"\s" + re.escape(name) + r"\(([^)]*)\)", rhs)
    return _OPERANDS.findall(m.group(1)) if m else None


class _Module:
    """The computations of an HLO text: per computation its instructions (name -> right-hand side) and root."""

    def __init__(self, hlo_text: str):
        self.defs: dict[str, dict[str, str]] = {}
        self.roots: dict[str, str] = {}
        self.entry, cur = None, None
        for line in hlo_text.splitlines():
            head = _HEAD.match(line)
            if head:
                cur = head.group(1)
                self.defs[cur] = {}
                self.entry = cur if line.startswith("ENTRY") else self.entry
            elif line.strip() == "}":
                cur = None
            elif cur is not None and (d := _DEF.match(line)):
                self.defs[cur][d.group(1)] = d.group(2)
                if line.lstrip().startswith("ROOT "):
                    self.roots[cur] = d.group(1)

    def _const(self, comp: str, name: str) -> int | None:
        m = _CONST.search(self.defs[comp].get(name, ""))
        return int(m.group(1)) if m else None

    def trips(self, caller: str, init: str, cond: str, body: str) -> int:
        """A while loop's trip count from its induction variable: `i < N` in the condition's root compare, the
        step `i + s` in the body's root tuple, the start in the operand tuple (XLA's windowed einsums count
        by 2). Falls back to the condition's largest integer constant."""
        rhs = self.defs.get(cond, {}).get(self.roots.get(cond, ""), "")
        args = _op(rhs, "compare")
        fallback = max((int(n) for r in self.defs.get(cond, {}).values() for n in _CONST.findall(r)), default=1)
        if not args or len(args) != 2 or "direction=LT" not in rhs:
            return fallback
        index, bound = _INDEX.search(self.defs[cond].get(args[0], "")), self._const(cond, args[1])
        if index is None or bound is None:
            return fallback
        k, step, start = int(index.group(1)), 1, 0
        root = _op(self.defs[body].get(self.roots.get(body, ""), ""), "tuple") or []
        if k < len(root) and (add := _op(self.defs[body].get(root[k], ""), "add")):
            step = next((c for a in add if (c := self._const(body, a)) is not None), 1)
        first = _op(self.defs[caller].get(init, ""), "tuple") or []
        if k < len(first):
            start = self._const(caller, first[k]) or 0
        return max(0, -(-(bound - start) // max(step, 1)))


def _scope(rhs: str, outer: str = "(no op_name)") -> str:
    """The named scope an instruction was traced under (distill.py names each model call), from its op_name:
    `jit(run)/transpose(jvp(student_scm))/...` -> `student_scm backward`; `(top level)` for an op outside
    any scope; an op without op_name takes the scope of the op that calls its computation (`outer`: a fusion,
    a loop), so only what the compiler inserted between ops (e.g. resharding) is `(no op_name)`."""
    m = _OP_NAME.search(rhs)
    if not m:
        return outer
    parts = m.group(1).split("/")
    inner = re.fullmatch(r"(?:\w+\()*(\w*)\)*", parts[1]) if len(parts) > 2 else None
    if not inner or not inner.group(1):
        return "(top level)"
    return inner.group(1) + (" backward" if parts[1].startswith("transpose(") else "")


def collectives(hlo_text: str) -> collections.Counter:
    """Per-device payload bytes of one run of a compiled (partitioned) HLO module by (collective kind, named
    scope): an all-gather's result, the operand of the others, times the trip count of every enclosing loop.
    libtpu writes a reduce-scatter as a fusion `all-reduce-scatter.N` (an all-reduce, then each device's
    slice, emitted as one reduce-scatter): its all-reduce counts as a reduce-scatter."""
    mod = _Module(hlo_text)
    memo: dict[tuple[str, str], collections.Counter] = {}

    def walk(name: str, outer: str) -> collections.Counter:
        if (name, outer) not in memo:
            acc = memo[name, outer] = collections.Counter()
            for rhs in mod.defs.get(name, {}).values():
                scope = _scope(rhs, outer)
                op = _COLL.search(" " + rhs)
                if op:
                    sizes = _array_bytes(rhs[:op.start()])
                    if op.group(2):  # an async start's tuple: (operands, results, context)
                        n = max(sizes) if op.group(1) == "all-gather" else sizes[0]
                    elif op.group(1) == "reduce-scatter":  # synchronous: its result is one device's share
                        defs = mod.defs[name]
                        n = sum(sum(_array_bytes(defs.get(o, "").split(" ", 1)[0]))
                                for o in _op(rhs, "reduce-scatter") or [])
                    else:
                        n = sum(sizes)
                    kind = "reduce-scatter" if name.startswith("all-reduce-scatter") else op.group(1)
                    acc[kind, scope] += n
                loop = _WHILE.search(" " + rhs)
                if loop:
                    n = mod.trips(name, *loop.groups())
                    for k, v in walk(loop.group(3), scope).items():
                        acc[k] += n * v
                    continue
                for single, branches in _CALLS.findall(rhs):
                    for callee in [single] if single else _OPERANDS.findall(branches):
                        acc.update(walk(callee, scope))
        return memo[name, outer]

    return walk(mod.entry, "(no op_name)") if mod.entry else collections.Counter()


def by_kind(found: collections.Counter) -> dict[str, int]:
    """Collective bytes (from `collectives`) summed by kind."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for (kind, _), n in found.items():
        out[kind] += int(n)
    return out


def by_scope(found: collections.Counter) -> dict[str, int]:
    """Collective bytes (from `collectives`) summed by named scope, largest first."""
    out = collections.Counter()
    for (_, scope), n in found.items():
        out[scope] += int(n)
    return dict(out.most_common())


def wire_bytes(kinds: dict[str, int]) -> int:
    """What collectives of these payloads move per device in a ring, up to the (n-1)/n factor every kind
    shares: an all-reduce moves its payload twice (a reduce-scatter, then an all-gather), the others once."""
    return sum(kinds.values()) + kinds.get("all-reduce", 0)


# ---------------------------------------------------------------- bytes and FLOPs per op
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_STRUCTURAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency", "iota"}
_SLICES = {"dynamic-slice", "slice"}
_PREFETCH = {"copy-start", "slice-start"}  # libtpu's async moves between HBM and on-chip memory
_LAYOUT = {"copy", "transpose", "reshape", "bitcast", "pad", "concatenate", "reverse"}


class OpCost(NamedTuple):
    """One op of the program: its model call, what it does, FLOPs and HBM bytes per run, runs per step."""
    scope: str
    category: str
    flops: float
    bytes: float
    runs: int


def _opcode(rhs: str) -> tuple[str, str]:
    """(result type, opcode) of an instruction's right-hand side."""
    m = _OPCODE.search(" " + rhs)
    return (rhs[:m.start()], m.group(1)) if m else (rhs, "")


def _dims(type_str: str) -> list[int]:
    found = _ARRAY.search(type_str)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _valid_taps(rhs: str, inputs: list[int], outputs: list[int]) -> float:
    """Window taps per output of a convolution that land on input values rather than on padding or between
    dilated inputs, averaged over the outputs: libtpu writes some matmuls as convolutions whose window mostly
    covers padding (a batched matmul's batch dimension as a base-dilated window of 16, a projection as a window
    of 36 over a padded input of 1), and counting every tap would count 16-36x the work."""
    window = re.search(r"window=\{([^}]*)\}", rhs)
    if not window:
        return 1.0
    fields = dict(kv.split("=", 1) for kv in window.group(1).split())
    per_dim = lambda key, default: fields[key].split("x") if key in fields else [default] * len(inputs)
    taps = 1.0
    for n, m, size, stride, pad, lhs_dilate, rhs_dilate in zip(
            inputs, outputs, per_dim("size", "1"), per_dim("stride", "1"), per_dim("pad", "0_0"),
            per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1"), strict=True):
        low, d = int(pad.split("_")[0]), int(lhs_dilate)
        at = [o * int(stride) + k * int(rhs_dilate) - low for o in range(m) for k in range(int(size))]
        hits = sum(x >= 0 and x % d == 0 and x // d < n for x in at)
        taps *= hits / max(m, 1)
    return taps


class _Costs:
    """Walks a module from its entry, as `collectives` does, into OpCost rows."""

    def __init__(self, mod: _Module):
        self.mod, self.rows = mod, []
        self.users = {c: self._users(c) for c in mod.defs}

    def _users(self, comp: str) -> dict[str, list[str]]:
        users = collections.defaultdict(list)
        for name, rhs in self.mod.defs[comp].items():
            for operand in _op(rhs, _opcode(rhs)[1]) or []:
                users[operand].append(name)
        return users

    def _type(self, comp: str, name: str) -> str:
        return _opcode(self.mod.defs[comp].get(name, ""))[0]

    def _flops(self, comp: str, rhs: str) -> float:
        """2 x multiply-adds of a dot or convolution (elementwise work is left out: it is bandwidth-bound)."""
        out, code = _opcode(rhs)
        operands = _op(rhs, code) or []
        if code == "dot" and operands:
            lhs = _dims(self._type(comp, operands[0]))
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rhs)
            k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
            return 2.0 * math.prod(_dims(out)) * k
        if code == "convolution" and len(operands) > 1:
            labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rhs)
            kernel = _dims(self._type(comp, operands[1]))
            if not (kernel and labels and "i" in labels.group(2)):
                return 0.0
            lhs, out_dims = _dims(self._type(comp, operands[0])), _dims(out)
            taps = _valid_taps(rhs, [lhs[labels.group(1).index(str(i))] for i in range(len(labels.group(1)) - 2)],
                               [out_dims[labels.group(3).index(str(i))] for i in range(len(labels.group(3)) - 2)])
            return 2.0 * math.prod(out_dims) * kernel[labels.group(2).index("i")] * taps
        return 0.0

    def _fused(self, comp: str) -> tuple[float, set[str]]:
        """FLOPs and opcodes of a fused computation, nested fusions included."""
        flops, codes = 0.0, set()
        for rhs in self.mod.defs.get(comp, {}).values():
            code = _opcode(rhs)[1]
            codes.add(code)
            flops += self._flops(comp, rhs)
            for callee in re.findall(r"calls=%([\w.\-]+)", rhs):
                f, c = self._fused(callee)
                flops, codes = flops + f, codes | c
        return flops, codes

    def _reads(self, comp: str, name: str, full: int) -> int:
        """Bytes a fused computation reads of its parameter `name`: only the slices it takes when every use
        slices it (a scanned layer's weights or residuals), nothing when it is the buffer a dynamic-update-slice
        writes in place, else the whole operand. Bitcasts are looked through."""
        users = self.users[comp]
        stack, sliced = [(u, name) for u in users.get(name, [])], 0
        if not stack:
            return full
        while stack:
            user, via = stack.pop()
            out, code = _opcode(self.mod.defs[comp][user])
            first = (_op(self.mod.defs[comp][user], code) or [None])[0]
            if code == "bitcast" and users.get(user):
                stack += [(u, user) for u in users[user]]
            elif first == via and code in _SLICES:
                sliced += sum(_hbm_bytes(out))
            elif first != via or code != "dynamic-update-slice":
                return full
        return min(sliced, full)

    def _writes(self, comp: str, name: str) -> int:
        """Bytes an instruction of `comp` writes: a dynamic-update-slice writes its update, in place."""
        out, code = _opcode(self.mod.defs[comp][name])
        operands = _op(self.mod.defs[comp][name], code) or []
        if code == "bitcast" and operands:
            return self._writes(comp, operands[0])
        if code == "tuple":
            return sum(self._writes(comp, o) for o in operands)
        if code == "dynamic-update-slice" and len(operands) > 1:
            return sum(_hbm_bytes(self._type(comp, operands[1])))
        return sum(_hbm_bytes(out))

    def _category(self, code: str, codes: set[str]) -> str:
        if code in _PREFETCH:
            return "prefetch"
        if codes & {"dot", "convolution"}:
            return "matmul"
        if any(c.startswith(k) for c in codes for k in COLLECTIVES):
            return "collective"
        if codes & ({"dynamic-update-slice"} | _SLICES) and codes <= _LAYOUT | _SLICES | {
                "dynamic-update-slice", "parameter", "constant", "convert"}:
            return "slicing"
        if "convert" in codes and codes <= _LAYOUT | {"convert", "parameter", "constant"}:
            return "convert"
        if codes <= _LAYOUT | {"parameter", "constant"}:
            return "copy/transpose"
        if codes & {"reduce", "reduce-window"}:
            return "reduce"
        return "custom-call" if code == "custom-call" else "elementwise"

    def walk(self, comp: str, outer: str, runs: int) -> None:
        for rhs in self.mod.defs.get(comp, {}).values():
            scope, (out, code) = _scope(rhs, outer), _opcode(rhs)
            loop = _WHILE.search(" " + rhs)
            if loop:
                self.walk(loop.group(3), scope, runs * self.mod.trips(comp, *loop.groups()))
                continue
            if code in ("call", "conditional", "async-start"):  # the callee's ops run where it is called
                for single, branches in _CALLS.findall(rhs):
                    for callee in [single] if single else _OPERANDS.findall(branches):
                        self.walk(callee, scope, runs)
                continue
            if code in _STRUCTURAL or code.endswith("-done"):
                continue
            operands = _op(rhs, code) or []
            sizes = [sum(_hbm_bytes(self._type(comp, o))) for o in operands]
            if code == "fusion":
                fused = re.search(r"calls=%([\w.\-]+)", rhs).group(1)
                flops, codes = self._fused(fused)
                params = {int(m.group(1)): n for n, r in self.mod.defs[fused].items()
                          if (m := re.search(r"\sparameter\((\d+)\)", " " + r))}
                read = sum(self._reads(fused, params[i], n) if i in params else n for i, n in enumerate(sizes))
                written = min(self._writes(fused, self.mod.roots[fused]), sum(_hbm_bytes(out)))
            else:
                flops, codes = self._flops(comp, rhs), {code}
                read, written = sum(sizes), sum(_hbm_bytes(out))
                if code in _PREFETCH:  # (source, destination, context): moves the destination's bytes once
                    read, written = 0, (_array_bytes(out) + [0, 0])[1]
                elif code in _SLICES:
                    read = written
                elif code == "dynamic-update-slice" and len(sizes) > 1:
                    read = written = sizes[1]
            self.rows.append(OpCost(scope, self._category(code, codes), flops, float(read + written), runs))


def op_costs(hlo_text: str) -> list[OpCost]:
    """Every op one run of the compiled program executes, with its model call, what it does (matmul, convert,
    copy/transpose, slicing, reduce, elementwise, collective, prefetch, custom-call), its matmul FLOPs, the
    HBM bytes it reads and writes (a fusion: its operands, only the slices it takes of a scanned stack, and its
    result, a dynamic-update-slice counting its update only, as XLA's cost analysis counts; buffers that
    libtpu placed in on-chip memory are not HBM traffic, the prefetches that move them are) and how many
    times it runs (the product of its enclosing loops' trip counts)."""
    mod = _Module(hlo_text)
    costs = _Costs(mod)
    if mod.entry:
        costs.walk(mod.entry, "(no op_name)", 1)
    return costs.rows


def roofline(rows: list[OpCost], peak_flops: float, hbm_bandwidth: float) -> dict:
    """Totals of `op_costs` rows on a chip: FLOPs, bytes and the roofline time (each op at
    max(FLOPs / peak, bytes / bandwidth): no overlap between ops, collectives' link time left out), overall,
    by model call (with its arithmetic intensity, FLOPs per byte, to compare with the chip's ridge point
    peak / bandwidth) and by what the ops do."""
    def add(acc, key, r):
        s = acc.setdefault(key, {"flops": 0.0, "bytes": 0.0, "seconds": 0.0})
        s["flops"] += r.flops * r.runs
        s["bytes"] += r.bytes * r.runs
        s["seconds"] += max(r.flops / peak_flops, r.bytes / hbm_bandwidth) * r.runs

    total, scopes, categories = {}, {}, {}
    for r in rows:
        add(total, "all", r)
        add(scopes, r.scope, r)
        add(categories, r.category, r)
    for s in scopes.values():
        s["intensity"] = s["flops"] / max(s["bytes"], 1.0)
    order = lambda d: dict(sorted(d.items(), key=lambda kv: -kv[1]["seconds"]))
    return {**total.get("all", {"flops": 0.0, "bytes": 0.0, "seconds": 0.0}), "ridge": peak_flops / hbm_bandwidth,
            "by_scope": order(scopes), "by_category": order(categories)}
