"""`sprintjax compile`: lower and compile the training steps for a device topology ahead of time, on this
machine, and report per-device memory and the compiler's cost figures, so a job that would not fit is caught
before a pod is taken.

Topologies: a TPU name such as `v5p:4x4x4` or `v6e:8x8` (libtpu's AOT path: no TPU needed) or `cpu:N` (fake
CPU devices; the CLI sets XLA_FLAGS before JAX starts). Nothing is allocated: every array is abstract.

XLA's cost analysis counts a while-loop body once, so for a model that scans its blocks the compiled program's
`flops` / `optimal_seconds` cover one block per loop. The report therefore also gives `model_flops`: the
step's FLOPs per device from the same step lowered with the blocks unrolled (no compilation needed), and
collective bytes read from the compiled HLO with every loop's trip count applied, next to the FSDP minimum
(ZeRO-3 accounting: each sharded weight gathered once per call of its model and once more per backward
through a call, each trained weight's float32 gradient reduce-scattered once, or all-reduced if replicated).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sprintjax.configlib import RunConfig, resolve
from sprintjax.errors import ConfigError
from sprintjax.fileio import atomic_write_bytes
from sprintjax.model import SanaTransformer
from sprintjax.sharding import batch_sharding, data_parallel_size, make_mesh, tree_shardings

# Peak dense bf16 FLOP/s and HBM bytes per chip (Cloud TPU product pages) for the utilisation bound.
CHIPS = {"v4": (275e12, 32 << 30), "v5e": (197e12, 16 << 30), "v5p": (459e12, 95 << 30),
         "v6e": (918e12, 32 << 30)}


def topology_devices(topology: str):
    kind, _, spec = topology.partition(":")
    if kind == "cpu":
        n = int(spec or 1)
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(f"{topology}: only {len(devices)} CPU devices (set XLA_FLAGS="
                              f"--xla_force_host_platform_device_count={n} before JAX starts)")
        return devices[:n]
    from jax.experimental import topologies

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", kind + "-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU is opened, no lock needed
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu raises plain RuntimeErrors for unknown names
        raise ConfigError(f"cannot build TPU topology {topology!r}: {str(e).splitlines()[0]}") from None


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_steps(config, topology: str, hlo_dir: str | None = None) -> dict:
    """{step name: {memory and cost figures per device}} for each training step of the config's stage;
    with `hlo_dir`, each compiled program's HLO text is also written there as `STEP.hlo.txt`."""
    from sprintjax.train import compiled_step, plan

    rc: RunConfig = resolve(config)
    mesh = make_mesh(rc.mesh, topology_devices(topology))
    gb, dp = rc.data.global_batch, data_parallel_size(mesh)
    if gb % dp:
        raise ConfigError(f"global batch {gb} does not divide over the {dp} data-parallel devices of mesh "
                          f"{dict(mesh.shape)}")
    m = rc.model
    teacher_shapes = SanaTransformer(m).param_shapes()
    teacher_sh = tree_shardings(teacher_shapes, mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
    rep = NamedSharding(mesh, PartitionSpec())
    null = jax.ShapeDtypeStruct((rc.data.caption_len, m.caption_channels), jnp.float32, sharding=rep)
    teacher = _abstract(teacher_shapes, teacher_sh)
    p = plan(rc, mesh, teacher, null, teacher_sh)
    bsh = batch_sharding(mesh)
    batch = {"latents": jax.ShapeDtypeStruct((gb, m.in_channels, m.sample_size, m.sample_size), jnp.float32,
                                             sharding=bsh),
             "caption": jax.ShapeDtypeStruct((gb, rc.data.caption_len, m.caption_channels), jnp.float32,
                                             sharding=bsh),
             "caption_mask": jax.ShapeDtypeStruct((gb, rc.data.caption_len), jnp.float32, sharding=bsh)}
    state = _abstract(p.abstract, p.state_sh)
    it = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    names = [n for n in p.steps if n != "train"] or ["train"]
    unrolled = plan(dataclasses.replace(rc, model=m.replace(scan_layers=False)), mesh, teacher, null, teacher_sh)
    report = {}
    for name in names:
        fn = compiled_step(p.steps[name], rc.train.seed, p.state_sh, bsh, rep)
        try:
            compiled = fn.lower(state, batch, it).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that exceeds HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            report[name] = {"devices": mesh.size, "mesh": dict(mesh.shape), "global_batch": gb,
                            "does_not_fit": str(e).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]}
            continue
        mem, cost, text = compiled.memory_analysis(), _cost(compiled), compiled.as_text()
        found = collectives(text)
        if hlo_dir:
            atomic_write_bytes(os.path.join(hlo_dir, f"{name}.hlo.txt"), text.encode())
        model_flops = _global_flops(unrolled.steps[name], rc.train.seed, (state, batch, it)) / mesh.size
        report[name] = {
            "devices": mesh.size, "mesh": dict(mesh.shape), "global_batch": gb,
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "code_bytes": mem.generated_code_size_in_bytes,
            "peak_bytes_estimate": mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes,
            "flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
            "model_flops": float(model_flops),
            "collective_bytes": by_kind(found), "collective_bytes_by_scope": by_scope(found),
            "fsdp_minimum_bytes": fsdp_minimum(p.abstract, p.state_sh, name, m.dtype, rc.distill),
        }
        report[name].update(_bound(report[name], topology.partition(":")[0]))
    return report


def _global_flops(step_fn, seed: int, args) -> float:
    """FLOPs of one step over the whole mesh: the unpartitioned program lowered for one CPU device and
    costed before compilation (a TPU topology's lowering offers no cost analysis)."""
    def run(state, batch, iteration):
        return step_fn(state, batch, jax.random.fold_in(jax.random.key(seed), iteration))

    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
        lowered = jax.jit(run).lower(*plain)
    return float(_cost(lowered).get("flops", float("nan")))


def _bound(r: dict, chip: str) -> dict:
    """The chip's HBM and peak FLOP/s; the compiler's optimal time scaled from the compiled program's FLOPs
    (loop bodies once) to the model's, and the model-FLOP utilisation that time would give: an upper bound on
    MFU (1.0 = compute-bound). libtpu's cost model sometimes reports a negative time: then no bound."""
    if chip not in CHIPS:
        return {}
    out = {"peak_flops": CHIPS[chip][0], "hbm_bytes": CHIPS[chip][1]}
    if r["flops"] > 0 and r["optimal_seconds"] > 0:
        seconds = r["optimal_seconds"] * r["model_flops"] / r["flops"]
        out.update(optimal_seconds_scaled=seconds, mfu_bound=r["model_flops"] / (seconds * CHIPS[chip][0]))
    return out


def _cost(stage) -> dict:
    cost = stage.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


# ---------------------------------------------------------------- collectives
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEAD = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_COLL = re.compile(r" (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r" while\(%([\w.\-]+)\).*condition=%([\w.\-]+), body=%([\w.\-]+)")
_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPERANDS = re.compile(r"%([\w.\-]+)")
_CONST = re.compile(r"[su]32\[\](?:\{[^}]*\})? constant\((-?\d+)\)")  # TPU HLO adds a layout
_INDEX = re.compile(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|true_computation|false_computation)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")


def _array_bytes(type_str: str) -> list[int]:
    return [int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _DTYPE_BYTES[dt]
            for dt, dims in _ARRAY.findall(type_str)]


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


def _gathers(step: str, d) -> dict[str, int]:
    """How often FSDP gathers each model in one step: once per call, once more per backward through a call."""
    if step == "train":
        return {"params": 2}
    scm, ladd = int(d.use_scm), int(d.use_ladd)
    if step == "generator":
        # student: the sCM JVP (and a plain forward when two-pass) and the LADD denoise, each with a backward;
        # teacher: the CFG tangent and the LADD features, with the features' backward; heads: forward, backward
        forwards = scm * (2 if d.scm_form == "two_pass" else 1) + ladd
        return {"student": forwards + scm + ladd, "teacher": scm + 2 * ladd, "heads": 2 * ladd}
    return {"student": 1, "teacher": 2, "heads": 4}  # teacher on fakes and on reals; heads forward + backward each


def fsdp_minimum(abstract_state, state_sh, step: str, compute_dtype: str, distill) -> dict[str, int]:
    """What FSDP must move per device in one step (ZeRO-3 accounting, as PyTorch FSDP moves it): every sharded
    weight gathered once per call of its model and once more per backward through a call (transformers in the
    compute dtype, heads in float32); every trained sharded weight's float32 gradient reduce-scattered once,
    every trained replicated one's all-reduced once, and with replicas beside the fsdp axis (HSDP: a `data`
    axis > 1) each sharded gradient's shard all-reduced over them."""
    def nbytes(name, itemsize, sharded=True):
        tree, shardings = getattr(abstract_state, name), getattr(state_sh, name)
        leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: hasattr(x, "spec")),
                     strict=True)
        return int(sum(np.prod(a.shape, dtype=np.int64) * itemsize for a, s in leaves
                       if any(ax is not None for ax in s.spec) == sharded))

    item = jnp.dtype(compute_dtype).itemsize
    read = sum(n * nbytes(name, 4 if name == "heads" else item) for name, n in _gathers(step, distill).items())
    trained = {"generator": "student", "discriminator": "heads", "train": "params"}[step]
    mesh = jax.tree.leaves(getattr(state_sh, trained))[0].mesh
    fsdp = mesh.shape.get("fsdp", 1)
    replicated = nbytes(trained, 4, sharded=False) if mesh.size > 1 else 0
    shards = nbytes(trained, 4) // fsdp if mesh.size > fsdp else 0
    return {"all-gather": read, "reduce-scatter": nbytes(trained, 4), "all-reduce": replicated + shards}


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict, topology: str) -> str:
    lines = [f"topology {topology}: figures per device"]
    for name, r in report.items():
        if "does_not_fit" in r:
            lines.append(f"  {name:14s} mesh {r['mesh']} global batch {r['global_batch']}: DOES NOT FIT: "
                         f"{r['does_not_fit']}")
            continue
        lines.append(
            f"  {name:14s} mesh {r['mesh']} global batch {r['global_batch']}: arguments {_size(r['argument_bytes'])}, "
            f"temporaries {_size(r['temp_bytes'])}, outputs {_size(r['output_bytes'])} "
            f"(aliased {_size(r['alias_bytes'])}), peak ~{_size(r['peak_bytes_estimate'])}; "
            f"{r['flops'] / 1e12:.4g} TFLOP, {_size(r['bytes_accessed'])} accessed, "
            f"optimal {r['optimal_seconds'] * 1e3:.3g} ms (loop bodies counted once)")
        moved, least = wire_bytes(r["collective_bytes"]), wire_bytes(r["fsdp_minimum_bytes"])
        kinds = ", ".join(f"{k} {_size(v)}" for k, v in r["collective_bytes"].items() if v)
        lines.append(f"  {'':14s} model {r['model_flops'] / 1e12:.4g} TFLOP per device (blocks unrolled); "
                     f"collectives {_size(moved)} ({kinds or 'none'}) = {moved / max(least, 1):.2f}x the FSDP "
                     f"minimum {_size(least)}")
        scopes = ", ".join(f"{k} {_size(v)}" for k, v in r["collective_bytes_by_scope"].items() if v)
        lines.append(f"  {'':14s} collectives by model call: {scopes or 'none'}")
        if "hbm_bytes" in r:
            bound = (f"optimal time scaled to the model FLOPs {r['optimal_seconds_scaled'] * 1e3:.3g} ms: MFU bound "
                     f"{r['mfu_bound']:.2f}" if "mfu_bound" in r else "no MFU bound (negative optimal time)")
            lines.append(f"  {'':14s} {bound}; peak ~{_size(r['peak_bytes_estimate'])} of {_size(r['hbm_bytes'])} HBM")
    return "\n".join(lines)
