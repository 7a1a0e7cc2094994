"""Device mesh and shardings, declared by the config.

The mesh has named axes (e.g. data, fsdp, tensor; one size may be -1 to take the remaining devices). With both
`data` and `fsdp` at -1 the mesh picks itself from the device count: FSDP within groups of up to
`fsdp_group` devices (the largest divisor of the count not above it; 32 measured best on v5p and v6e, where
libtpu rewrites each all-gather over 64 devices as an all-reduce: BENCHMARKS.md §3 item 6), data-parallel
replicas above it (HSDP). Batches shard their leading axis over every data-parallel axis (data and fsdp).
Parameters, optimiser states and discriminator heads follow rules: an ordered list of (regex over the leaf
path, kind) where kind is `fsdp` (the largest dimension divisible by the fsdp axis, never the stacked layer
axis, on the fsdp axis) or `replicate`. Leaves smaller than `min_fsdp_size` elements stay replicated.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sprintjax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
KINDS = ("fsdp", "replicate")


def mesh_shape(axes: dict[str, int], n_devices: int, fsdp_group: int = 32) -> dict[str, int]:
    """Resolves one -1 axis, or `data` and `fsdp` both -1 (FSDP within up to `fsdp_group` devices, replicas
    above); the product must equal the device count (a clear error otherwise)."""
    axes = dict(axes)
    if axes.get("data") == -1 and axes.get("fsdp") == -1:
        rest = math.prod(v for k, v in axes.items() if k not in ("data", "fsdp"))
        if rest < 1 or n_devices % rest:
            raise ConfigError(f"mesh {axes} does not fit {n_devices} devices ({n_devices} % {rest} != 0)")
        if fsdp_group < 1:
            raise ConfigError(f"sharding.fsdp_group must be >= 1, got {fsdp_group}")
        n = n_devices // rest
        axes["fsdp"] = max(d for d in range(1, min(n, fsdp_group) + 1) if n % d == 0)
        axes["data"] = n // axes["fsdp"]
    free = [k for k, v in axes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {axes}")
    fixed = math.prod(v for v in axes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh {axes} does not fit {n_devices} devices ({n_devices} % {fixed} != 0)")
        axes[free[0]] = n_devices // fixed
    if math.prod(axes.values()) != n_devices:
        raise ConfigError(f"mesh {axes} has {math.prod(axes.values())} devices but {n_devices} are available")
    return axes


def make_mesh(axes: dict[str, int], devices=None, fsdp_group: int = 32) -> Mesh:
    """A Mesh (Auto axes) over `devices` (default: all), ordered by process so each host's rows are contiguous
    (and, the last axis varying fastest, each FSDP group within as few hosts as possible)."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = mesh_shape(axes, len(devices), fsdp_group)
    return Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


def constrain_batch(x):
    """Shards x's leading (batch) axis over the data-parallel axes of the mesh in context; a no-op outside one.

    Model activations carry it at block boundaries: without it the SPMD partitioner follows the FSDP-sharded
    weights, shards activations on their feature axis and all-reduces them, instead of gathering each weight.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axes)))


def block_specs(stacked_shardings) -> tuple:
    """The per-block PartitionSpecs (stacked layer axis dropped) of a model's `transformer_blocks` shardings,
    flat in leaf order: hashable, so a model holding them stays a static argument of `jax.jit`."""
    return tuple(PartitionSpec(*s.spec[1:]) for s in jax.tree.leaves(stacked_shardings))


def fsdp_block(fn, specs, policy, before_gather=lambda p: p):
    """`fn(h, block_params, *per_sample)` rematerialised with `policy` and run as ZeRO-3 under the mesh in
    context: in a `shard_map` each device takes its batch shard and all-gathers the block's weights (laid
    out as `specs`, from `block_specs`; `before_gather` maps the local shards first: the model casts its
    kernels to the compute dtype, so they travel in bf16) right before use. The gather sits inside
    `jax.checkpoint`, so a rematerialised block's recomputed forward and its backward share one gather, and
    the gather's transpose reduce-scatters the weight gradient. (Left to the SPMD partitioner, each matmul of
    a recomputed block moves its own copy of the weight as a windowed einsum, twice per backward; a sharding
    constraint instead all-reduces the gradient.) Without specs, outside a mesh, or for a batch that does
    not divide over its data-parallel axes, fn is only rematerialised. Every op here is forward-
    differentiable (the sCM JVP).
    """
    plain = jax.checkpoint(fn, policy=policy)
    mesh = jax.sharding.get_abstract_mesh()
    if specs is None or mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return plain
    batch = PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names))

    def gather(a, spec):
        axis = next((i for i, ax in enumerate(spec) if ax == "fsdp"), None)
        if axis is None:
            return a
        # Untiled: the devices' shards on a new axis, then merged. Its transpose reduce-scatters over that
        # leading axis, which libtpu lays out in whole (8, 128) tiles; the tiled form padded each device's
        # share of the sharded axis to the tile (36 of 1152 rows became 48) and all-reduced minor-axis shards.
        shards = jax.lax.all_gather(a, "fsdp", axis=axis)
        return shards.reshape(*a.shape[:axis], -1, *a.shape[axis + 1:])

    def run(h, p, *per_sample):
        if h.shape[0] % data_parallel_size(mesh):
            return plain(h, p, *per_sample)
        p_specs = jax.tree.unflatten(jax.tree.structure(p), specs)

        @functools.partial(jax.checkpoint, policy=policy)
        def local(h, p, *per_sample):
            return fn(h, jax.tree.map(gather, before_gather(p), p_specs), *per_sample)

        return jax.shard_map(local, in_specs=(batch, p_specs) + (batch,) * len(per_sample),
                             out_specs=batch)(h, p, *per_sample)

    return run


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _fsdp_spec(shape, fsdp: int, stacked: bool) -> PartitionSpec:
    dims = [i for i in range(1 if stacked else 0, len(shape)) if shape[i] % fsdp == 0]
    if not dims:
        return PartitionSpec()
    best = max(dims, key=lambda i: shape[i])
    return PartitionSpec(*[("fsdp" if i == best else None) for i in range(len(shape))])


def tree_shardings(tree, mesh: Mesh, rules, min_fsdp_size: int = 1 << 14):
    """NamedShardings for every leaf of an (abstract) pytree, by the first matching rule."""
    compiled = [(re.compile(rx), kind) for rx, kind in rules]
    for _, kind in rules:
        if kind not in KINDS:
            raise ConfigError(f"sharding rule kind must be one of {KINDS}, got {kind!r}")
    fsdp = mesh.shape.get("fsdp", 1)

    def spec(path, leaf):
        name = _path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        kind = next((k for rx, k in compiled if rx.fullmatch(name)), "replicate")
        if kind == "replicate" or fsdp == 1 or np.prod(shape, dtype=np.int64) < min_fsdp_size:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, _fsdp_spec(shape, fsdp, "transformer_blocks" in name))

    return jax.tree_util.tree_map_with_path(spec, tree)
