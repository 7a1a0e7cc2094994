"""CAME checked against the reference's update equations (`CAMEWrapper`, NVlabs/Sana), transcribed in numpy on
PyTorch layouts, for every tensor shape the models have: 1-D, 2-D, 3-D (Conv1d, k = 1 and 9), 4-D (1x1 and
depthwise 3x3), and stacked layers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sprintjax.came import scale_by_came

B1, B2, B3, E1, E2 = 0.9, 0.999, 0.9999, 1e-30, 1e-16


def reference(grads_torch, clip=1.0):
    """One parameter in PyTorch layout. Factored iff 2-D, or 4-D with a 1x1 kernel (the wrapper's rule)."""
    g0 = grads_torch[0]
    fac = g0.ndim == 2 or (g0.ndim == 4 and g0.shape[2:] == (1, 1))
    m = np.zeros_like(g0)
    n_out, n_in = (g0.shape + (1,))[:2]
    r, c, R, C = np.zeros(n_out), np.zeros(n_in), np.zeros(n_out), np.zeros(n_in)
    v = np.zeros_like(g0)
    outs = []
    for g in grads_torch:
        U = g**2 + E1
        if fac:
            U2 = U.reshape(n_out, n_in)
            r = B2 * r + (1 - B2) * U2.mean(1)
            c = B2 * c + (1 - B2) * U2.mean(0)
            u = g / np.sqrt(np.outer(r / r.mean(), c)).reshape(g.shape)
        else:
            v = B2 * v + (1 - B2) * U
            u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / clip)
        m = B1 * m + (1 - B1) * u
        if fac:
            S = ((u - m) ** 2 + E2).reshape(n_out, n_in)
            R = B3 * R + (1 - B3) * S.mean(1)
            C = B3 * C + (1 - B3) * S.mean(0)
            outs.append(m / np.sqrt(np.outer(R / R.mean(), C)).reshape(g.shape))
        else:
            outs.append(m.copy())
    return outs


# name: (our shape, our layout -> PyTorch layout, expected factored)
LEAVES = {
    "bias": ((6,), lambda a: a),
    "linear": ((5, 4), lambda a: a.T),  # Dense (in, out) -> Linear (out, in)
    "conv1d_k1": ((1, 4, 3), lambda a: a.transpose(2, 1, 0)),  # (k, in, out) -> Conv1d (out, in, k)
    "conv1d_k9": ((9, 4, 3), lambda a: a.transpose(2, 1, 0)),
    "conv_1x1": ((1, 1, 3, 5), lambda a: a.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
    "depthwise": ((3, 3, 1, 6), lambda a: a.transpose(3, 2, 0, 1)),
}


def test_came_matches_the_reference_for_every_tensor_shape():
    rng = np.random.default_rng(0)
    steps = 5
    # Gradients of very different scales per step: the confidence step and the clipping both matter.
    grads = [{k: rng.standard_normal(s) * (10.0 if i % 2 else 0.1) for k, (s, _) in LEAVES.items()}
             for i in range(steps)]
    for g in grads:
        g["stacked"] = rng.standard_normal((3, 5, 4))  # 3 scanned layers of a 5x4 Dense kernel
    params = jax.tree.map(jnp.zeros_like, {k: jnp.asarray(v, jnp.float32) for k, v in grads[0].items()})
    mask = {k: k == "stacked" for k in params}
    tx = scale_by_came(B1, B2, B3, E1, E2, stacked=mask)
    state = tx.init(params)
    ours = []
    for g in grads:
        upd, state = jax.jit(tx.update)({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state)
        ours.append(jax.tree.map(np.asarray, upd))
    for name, (_, to_torch) in LEAVES.items():
        ref = reference([to_torch(g[name]) for g in grads])
        for i in range(steps):
            np.testing.assert_allclose(to_torch(ours[i][name]), ref[i], rtol=2e-4, atol=1e-6, err_msg=f"{name} {i}")
    for layer in range(3):
        ref = reference([g["stacked"][layer].T for g in grads])
        for i in range(steps):
            np.testing.assert_allclose(ours[i]["stacked"][layer].T, ref[i], rtol=2e-4, atol=1e-6)
    assert int(state.count) == steps


def test_unfactored_tensors_get_no_confidence_step():
    """For an unfactored tensor the update is the clipped moment m; at the first step m = 0.1 u with
    |u| ~ 1 / sqrt(1 - b2) ~ 31.6 before clipping to RMS 1, so the update's RMS is exactly 0.1."""
    g = {"depthwise": jnp.ones((3, 3, 1, 4)), "conv1d": jnp.ones((9, 4, 4))}
    tx = scale_by_came()
    upd, _ = tx.update(g, tx.init(g))
    for v in upd.values():
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(v))), 0.1, rtol=1e-5)


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
