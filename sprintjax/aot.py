"""`sprintjax compile`: lower and compile the training steps for a device topology ahead of time, on this
machine, and report per-device memory and the compiler's cost figures, so a job that would not fit is caught
before a pod is taken.

Topologies: a TPU name such as `v5p:4x4x4` or `v6e:8x8` (libtpu's AOT path: no TPU needed) or `cpu:N` (fake
CPU devices; the CLI sets XLA_FLAGS before JAX starts). Nothing is allocated: every array is abstract.

XLA's cost analysis counts a while-loop body once, so for a model that scans its blocks the compiled program's
`flops` / `bytes_accessed` / `optimal_seconds` cover one block per loop. The report therefore also reads the
whole step from the compiled HLO with every loop's trip count applied (`sprintjax.hlo`): HBM bytes accessed,
matmul FLOPs and a per-op roofline time by model call and by kind of op, the MFU bound that time implies, and
collective bytes next to the FSDP minimum (ZeRO-3 accounting: each sharded weight gathered once per call of
its model and once more per backward through a call, each trained weight's float32 gradient reduce-scattered
once, or all-reduced if replicated). `model_flops` is the step lowered with the blocks unrolled and costed
before compilation: every layer counted, independently of the HLO reading.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sprintjax.configlib import RunConfig, resolve
from sprintjax.errors import ConfigError
from sprintjax.fileio import atomic_write_bytes
from sprintjax.hlo import by_kind, by_scope, collectives, op_costs, roofline, wire_bytes
from sprintjax.sharding import batch_sharding, data_parallel_size, make_mesh, tree_shardings

# Peak dense bf16 FLOP/s, HBM bytes and HBM bandwidth (bytes/s) per chip (Cloud TPU product pages).
CHIPS = {"v4": (275e12, 32 << 30, 1200e9), "v5e": (197e12, 16 << 30, 819e9), "v5p": (459e12, 95 << 30, 2765e9),
         "v6e": (918e12, 32 << 30, 1640e9)}


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
    from sprintjax.stages import teacher_shapes
    from sprintjax.train import compiled_step, plan

    rc: RunConfig = resolve(config)
    mesh = make_mesh(rc.mesh, topology_devices(topology), rc.sharding.fsdp_group)
    gb, dp = rc.data.global_batch, data_parallel_size(mesh)
    if gb % dp:
        raise ConfigError(f"global batch {gb} does not divide over the {dp} data-parallel devices of mesh "
                          f"{dict(mesh.shape)}")
    m = rc.model
    frozen = teacher_shapes(rc)
    teacher_sh = tree_shardings(frozen, mesh, rc.sharding.teacher_rules, rc.sharding.min_fsdp_size)
    rep = NamedSharding(mesh, PartitionSpec())
    null = jax.ShapeDtypeStruct((rc.data.caption_len, m.caption_channels), jnp.float32, sharding=rep)
    teacher = _abstract(frozen, teacher_sh)
    p = plan(rc, mesh, teacher, null, teacher_sh)
    bsh = batch_sharding(mesh)
    batch = {"latents": jax.ShapeDtypeStruct((gb, m.in_channels, m.sample_size, m.sample_size), jnp.float32,
                                             sharding=bsh),
             "caption": jax.ShapeDtypeStruct((gb, rc.data.caption_len, m.caption_channels), jnp.float32,
                                             sharding=bsh),
             "caption_mask": jax.ShapeDtypeStruct((gb, rc.data.caption_len), jnp.float32, sharding=bsh)}
    if rc.control.num_layers:  # a ControlNet's control latents
        batch["control"] = batch["latents"]
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
        report[name].update(whole_step(text, topology.partition(":")[0], float(model_flops)))
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


def whole_step(hlo_text: str, chip: str, model_flops: float) -> dict:
    """One step read from its compiled HLO with loop trip counts applied (`hlo.roofline`): matmul FLOPs, HBM
    bytes accessed and, on a known chip, the roofline time (each op at max(FLOPs / peak, bytes / bandwidth)),
    by model call and by kind of op, and the MFU bound model_flops / (roofline time x peak): the utilisation
    the step could reach if every op ran at its roofline and collectives overlapped (1.0 = compute-bound)."""
    peak, hbm, bandwidth = CHIPS.get(chip, (0.0, 0, 0.0))
    r = roofline(op_costs(hlo_text), peak or 1.0, bandwidth or 1.0)
    out = {"hlo_flops": r["flops"], "hlo_bytes": r["bytes"],
           "bytes_by_scope": {k: v["bytes"] for k, v in r["by_scope"].items()},
           "bytes_by_category": {k: v["bytes"] for k, v in r["by_category"].items()}}
    if peak and r["seconds"] > 0:
        out.update(peak_flops=peak, hbm_bytes=hbm, hbm_bandwidth=bandwidth, ridge=r["ridge"],
                   roofline_seconds=r["seconds"], mfu_bound=model_flops / (r["seconds"] * peak),
                   roofline_by_scope=r["by_scope"], roofline_by_category=r["by_category"])
    return out


def _cost(stage) -> dict:
    cost = stage.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


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


def _top(by: dict, n: int = 6) -> str:
    return ", ".join(f"{k} {_size(v)}" for k, v in list(by.items())[:n])


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
        lines.append(f"  {'':14s} whole step (loop trip counts applied): {r['hlo_flops'] / 1e12:.4g} TFLOP in "
                     f"matmuls, {_size(r['hlo_bytes'])} accessed; by kind of op: " + _top(r["bytes_by_category"]))
        if "roofline_seconds" in r:
            lines.append(f"  {'':14s} roofline {r['roofline_seconds'] * 1e3:.4g} ms, arithmetic intensity "
                         f"{r['hlo_flops'] / max(r['hlo_bytes'], 1):.0f} FLOP/B (ridge {r['ridge']:.0f}): MFU bound "
                         f"{r['mfu_bound']:.2f}; peak ~{_size(r['peak_bytes_estimate'])} of "
                         f"{_size(r['hbm_bytes'])} HBM")
            lines.append(f"  {'':14s} roofline by model call: " + ", ".join(
                f"{k} {v['seconds'] * 1e3:.3g} ms ({v['intensity']:.0f} FLOP/B)"
                for k, v in list(r["roofline_by_scope"].items())[:8]))
    return "\n".join(lines)
