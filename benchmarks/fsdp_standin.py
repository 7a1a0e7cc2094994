"""How libtpu moves FSDP weights, on a stand-in small enough to compile in seconds (no TPU needed).

    python benchmarks/fsdp_standin.py v5p:4x4x4 --per-chip 8 [--data 2] [--remat full]

Four blocks with the 0.6B widths (qkv, out, gated-MLP up and down projections; bf16 matmuls, float32
weights), scanned and rematerialised like sprintjax's model, FSDP-sharded by `sharding.tree_shardings`, one
SGD step compiled for a TPU topology. Prints the collective bytes by kind from the compiled HLO (loop trips
applied) and their wire-byte ratio to ZeRO-3's minimum (each weight gathered in bf16 for the forward and the
backward, its float32 gradient reduce-scattered once). BENCHMARKS.md §3 item 6: over 64 devices libtpu
rewrites the weight all-gathers as all-reduces; over 32 they run as windowed einsums.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from sprintjax import aot  # noqa: E402
from sprintjax.sharding import BATCH_AXES, constrain_batch, make_mesh, tree_shardings  # noqa: E402

LAYERS, TOKENS, D, F = 4, 1024, 1152, 2880


def block(h, w):
    w = jax.tree.map(lambda a: a.astype(jnp.bfloat16), w)
    a = h.astype(jnp.bfloat16) @ w["qkv"]
    h = h + (a[..., :D] * jax.nn.sigmoid(a[..., D:2 * D]) @ w["out"]).astype(jnp.float32)
    u = h.astype(jnp.bfloat16) @ w["up"]
    h = h + (jax.nn.silu(u[..., :F]) * u[..., F:] @ w["down"]).astype(jnp.float32)
    return constrain_batch(h), None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("topology")
    p.add_argument("--per-chip", type=int, default=8, help="samples per chip")
    p.add_argument("--data", type=int, default=1, help="replicas beside the fsdp axis (HSDP)")
    p.add_argument("--remat", choices=("dots", "full"), default="dots")
    a = p.parse_args(argv)
    mesh = make_mesh({"data": a.data, "fsdp": -1}, aot.topology_devices(a.topology))
    shapes = {"qkv": (D, 3 * D), "out": (D, D), "up": (D, 2 * F), "down": (F, D)}
    abstract = {k: jax.ShapeDtypeStruct((LAYERS, *s), jnp.float32) for k, s in shapes.items()}
    sh = tree_shardings({"transformer_blocks": abstract}, mesh, ((".*", "fsdp"),))["transformer_blocks"]
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
    batch = NamedSharding(mesh, PartitionSpec(tuple(x for x in BATCH_AXES if x in mesh.axis_names)))
    x = jax.ShapeDtypeStruct((a.per_chip * mesh.size, TOKENS, D), jnp.float32, sharding=batch)
    policy = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "full": jax.checkpoint_policies.nothing_saveable}[a.remat]

    def loss(w, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jnp.mean(jax.lax.scan(jax.checkpoint(block, policy=policy), x, w)[0] ** 2)

    def step(w, x):
        return jax.tree.map(lambda p, g: p - 1e-3 * g, w, jax.grad(loss)(w, x))

    hlo = jax.jit(step, out_shardings=sh).lower(params, x).compile().as_text()
    kinds = aot.by_kind(aot.collectives(hlo))
    weights = sum(LAYERS * r * c for r, c in shapes.values())
    least = {"all-gather": 2 * 2 * weights, "reduce-scatter": 4 * weights}
    print(f"{a.topology} mesh {dict(mesh.shape)} {a.per_chip} per chip remat {a.remat}: "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in kinds.items() if v)
          + f"; {aot.wire_bytes(kinds) / aot.wire_bytes(least):.2f}x the ZeRO-3 minimum")


if __name__ == "__main__":
    main()
