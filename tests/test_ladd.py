"""LADD pieces: hinge losses by hand, spectral norm, local batch norm, head equivariance and state handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sprintjax import ladd
from sprintjax.errors import ShapeError


def test_hinge_losses_match_hand_computed_values():
    real = jnp.array([[2.0, 0.5], [-1.0, 0.0]])  # relu(1 - x): 0, 0.5, 2, 1 -> mean 0.875
    fake = jnp.array([[-3.0, 0.25], [1.0, -0.5]])  # relu(1 + x): 0, 1.25, 2, 0.5 -> mean 0.9375
    assert float(ladd.discriminator_hinge_loss(real, fake)) == pytest.approx(0.5 * (0.875 + 0.9375))
    assert float(ladd.generator_adv_loss(fake)) == pytest.approx(-(-3.0 + 0.25 + 1.0 - 0.5) / 4)


def test_spectral_norm_converges_to_the_largest_singular_value():
    params, state = ladd._conv_init(jax.random.key(0), 3, 5, 4)
    x = jax.random.normal(jax.random.key(1), (2, 7, 5))
    step = jax.jit(lambda s: ladd._sn_conv(params, s, x, True)[1])
    for _ in range(50):
        state = step(state)
    w_mat = np.asarray(params["kernel"]).reshape(15, 4).T
    sigma = float(state["u"] @ (w_mat @ state["v"]))
    assert sigma == pytest.approx(np.linalg.svd(w_mat, compute_uv=False)[0], rel=1e-4)
    # Without update the state is returned unchanged.
    _, same = ladd._sn_conv(params, state, x, False)
    assert all(np.array_equal(same[k], state[k]) for k in state)


def test_local_batch_norm_normalises_each_virtual_batch():
    params, state = ladd._bn_init(3)
    x = jax.random.normal(jax.random.key(2), (8, 5, 3)) * 3 + jnp.arange(8.0)[:, None, None]
    y, new = ladd._local_bn(params, state, x, 4, update=True, running=False)
    for g in range(2):
        part = np.asarray(y[4 * g:4 * g + 4])
        np.testing.assert_allclose(part.mean(axis=(0, 1)), 0, atol=1e-5)
        np.testing.assert_allclose(part.var(axis=(0, 1)), 1, atol=1e-3)
    assert not np.array_equal(new["mean"], state["mean"])  # running statistics moved
    y_run, same = ladd._local_bn(params, new, x, 4, update=False, running=True)
    assert same is new and y_run.shape == x.shape
    with pytest.raises(ShapeError, match="virtual batches"):
        ladd._local_bn(params, state, x[:7], 4, update=False, running=False)


def test_head_is_equivariant_to_circular_token_shifts():
    """Every layer is per-token except the circular k=9 conv, and batch statistics ignore token order."""
    params, state = ladd.head_init(jax.random.key(3), 6, 9)
    x = jax.random.normal(jax.random.key(4), (4, 16, 6))
    run = jax.jit(lambda x: ladd.head_apply(params, state, x, virtual_batch=2)[0])
    np.testing.assert_allclose(run(jnp.roll(x, 5, axis=1)), jnp.roll(run(x), 5, axis=1), rtol=1e-5, atol=1e-5)
    assert run(x).shape == (4, 16)


def test_head_state_changes_only_when_updating():
    params, state = ladd.head_init(jax.random.key(5), 6, 9)
    x = jax.random.normal(jax.random.key(6), (4, 16, 6))
    _, same = ladd.head_apply(params, state, x, virtual_batch=4)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state), strict=True))
    _, new = ladd.head_apply(params, state, x, virtual_batch=4, update=True)
    # Every statistic moves, except u of the 1-channel classifier, which is a unit vector of length 1.
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True)
               if a.size > 1]
    assert changed and all(changed)
    assert abs(float(new["cls"]["u"][0])) == 1.0


def test_discriminator_metrics_on_hand_counted_scores():
    # per-sample scores (token means): reals [1, -1, 2], student fakes [0.5, -2, 3], misaligned [-1, 4, -3]
    real = jnp.array([[1.0, 1.0], [0.0, -2.0], [3.0, 1.0]])
    fake = jnp.array([[1.0, 0.0], [-2.0, -2.0], [3.0, 3.0], [-1.0, -1.0], [4.0, 4.0], [-4.0, -2.0]])
    m = ladd.discriminator_metrics(real, fake)
    assert float(m["d_acc_real"]) == pytest.approx(2 / 3)
    assert float(m["d_acc_fake"]) == pytest.approx(1 / 3)  # student fakes only: 0.5 and 3 are called real
    assert float(m["d_acc_misaligned"]) == pytest.approx(2 / 3)
    # ordered (real > fake) pairs: 1 beats 0.5, -2; -1 beats -2; 2 beats 0.5, -2 -> 5 of 9
    assert float(m["d_auc"]) == pytest.approx(5 / 9)
    # a shared offset moves the accuracies, not the ranking
    shifted = ladd.discriminator_metrics(real + 10.0, fake[:3] + 10.0)
    assert float(shifted["d_acc_real"]) == 1.0 and float(shifted["d_acc_fake"]) == 0.0
    assert float(shifted["d_auc"]) == pytest.approx(5 / 9) and "d_acc_misaligned" not in shifted
