"""`sprintjax compile`: lower and compile the training steps for a device topology ahead of time, on this
machine, and report per-device memory and the compiler's cost figures, so a job that would not fit is caught
before a pod is taken.

Topologies: a TPU name such as `v5p:4x4x4` or `v6e:8x8` (libtpu's AOT path: no TPU needed) or `cpu:N` (fake
CPU devices; the CLI sets XLA_FLAGS before JAX starts). Nothing is allocated: every array is abstract.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from sprintjax.configlib import RunConfig, resolve
from sprintjax.errors import ConfigError
from sprintjax.model import SanaTransformer
from sprintjax.sharding import batch_sharding, data_parallel_size, make_mesh, tree_shardings


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
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # libtpu raises plain RuntimeErrors for unknown names
        raise ConfigError(f"cannot build TPU topology {topology!r}: {str(e).splitlines()[0]}") from None


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_steps(config, topology: str) -> dict:
    """{step name: {memory and cost figures per device}} for each training step of the config's stage."""
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
    p = plan(rc, mesh, _abstract(teacher_shapes, teacher_sh), null, teacher_sh)
    bsh = batch_sharding(mesh)
    batch = {"latents": jax.ShapeDtypeStruct((gb, m.in_channels, m.sample_size, m.sample_size), jnp.float32,
                                             sharding=bsh),
             "caption": jax.ShapeDtypeStruct((gb, rc.data.caption_len, m.caption_channels), jnp.float32,
                                             sharding=bsh),
             "caption_mask": jax.ShapeDtypeStruct((gb, rc.data.caption_len), jnp.float32, sharding=bsh)}
    state = _abstract(p.abstract, p.state_sh)
    names = [n for n in p.steps if n != "train"] or ["train"]
    report = {}
    for name in names:
        fn = compiled_step(p.steps[name], rc.train.seed, p.state_sh, bsh, rep)
        compiled = fn.lower(state, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)).compile()
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
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
        }
    return report


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_report(report: dict, topology: str) -> str:
    lines = [f"topology {topology}: figures per device"]
    for name, r in report.items():
        lines.append(
            f"  {name:14s} mesh {r['mesh']} global batch {r['global_batch']}: arguments {_size(r['argument_bytes'])}, "
            f"temporaries {_size(r['temp_bytes'])}, outputs {_size(r['output_bytes'])} "
            f"(aliased {_size(r['alias_bytes'])}), peak ~{_size(r['peak_bytes_estimate'])}; "
            f"{r['flops'] / 1e12:.4g} TFLOP, {_size(r['bytes_accessed'])} accessed, "
            f"optimal {r['optimal_seconds'] * 1e3:.3g} ms")
    return "\n".join(lines)
