"""CAME checked against its update equations (numpy, written from the paper's Algorithm 1), per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sprintjax.came import scale_by_came

B1, B2, B3, E1, E2 = 0.9, 0.999, 0.9999, 1e-30, 1e-16


def reference(grads, clip=1.0):
    """Equations for one parameter: factored second moment and confidence for matrices, plain for vectors."""
    g0 = grads[0]
    m = np.zeros_like(g0)
    if g0.ndim == 2:
        r, c, R, C = np.zeros(g0.shape[0]), np.zeros(g0.shape[1]), np.zeros(g0.shape[0]), np.zeros(g0.shape[1])
    else:
        v = np.zeros_like(g0)
    outs = []
    for g in grads:
        U = g**2 + E1
        if g.ndim == 2:
            r = B2 * r + (1 - B2) * U.mean(1)
            c = B2 * c + (1 - B2) * U.mean(0)
            u = g / np.sqrt(np.outer(r, c) / r.mean())
        else:
            v = B2 * v + (1 - B2) * U
            u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / clip)
        m = B1 * m + (1 - B1) * u
        if g.ndim == 2:
            S = (u - m) ** 2 + E2
            R = B3 * R + (1 - B3) * S.mean(1)
            C = B3 * C + (1 - B3) * S.mean(0)
            outs.append(m / np.sqrt(np.outer(R, C) / R.mean()))
        else:
            outs.append(m.copy())
    return outs


def test_came_matches_its_equations_for_matrices_vectors_and_stacked_layers():
    rng = np.random.default_rng(0)
    steps = 4
    mats = [rng.standard_normal((3, 5, 4)) for _ in range(steps)]  # 3 stacked layers of a 5x4 matrix
    vecs = [rng.standard_normal((6,)) * 10 for _ in range(steps)]  # large: exercises the update clipping
    params = {"blocks": {"w": jnp.zeros((3, 5, 4))}, "bias": jnp.zeros((6,))}
    tx = scale_by_came(B1, B2, B3, E1, E2, stacked={"blocks": {"w": True}, "bias": False})
    state = tx.init(params)
    ours = []
    for i in range(steps):
        upd, state = jax.jit(tx.update)({"blocks": {"w": jnp.asarray(mats[i], jnp.float32)},
                                         "bias": jnp.asarray(vecs[i], jnp.float32)}, state)
        ours.append(upd)
    ref_vec = reference(vecs)
    ref_layers = [reference([m[layer] for m in mats]) for layer in range(3)]
    for i in range(steps):
        np.testing.assert_allclose(ours[i]["bias"], ref_vec[i], rtol=2e-5)
        for layer in range(3):
            np.testing.assert_allclose(ours[i]["blocks"]["w"][layer], ref_layers[layer][i], rtol=2e-4, atol=1e-6)
    assert int(state.count) == steps


def test_came_in_a_chain_descends_a_quadratic():
    target = jnp.arange(12.0).reshape(3, 4)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
    tx = optax.chain(scale_by_came(), optax.scale_by_learning_rate(0.1))
    p = {"w": jnp.zeros((3, 4))}
    s = tx.init(p)
    first = float(loss(p))
    for _ in range(100):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        p = optax.apply_updates(p, u)
    assert float(loss(p)) < 0.05 * first
