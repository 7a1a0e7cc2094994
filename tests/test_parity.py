"""Numerical parity with diffusers' PyTorch SanaTransformer2DModel, bit-exact round trips, and the JVP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS, inputs, rel_err

from sprintjax import convert
from sprintjax.convert import torch_ref
from sprintjax.convert.diffusers_io import read_state_dict
from sprintjax.model import SanaTransformer


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_forward_matches_diffusers(diffusers_models, name):
    cfg, hw, model_pt, folder = diffusers_models[name]
    params, cfg_read = convert.diffusers_to_params(folder)
    assert cfg_read == cfg
    x, t, y, mask, g = inputs(cfg, hw)
    ref = torch_ref.diffusers_velocity(model_pt, x, t, y, mask, g)
    out = SanaTransformer(cfg).apply(params, x, t, y, mask, g)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    # The mask matters: dropping it changes the padded sample only.
    unmasked = np.asarray(SanaTransformer(cfg).apply(params, x, t, y, None, g))
    np.testing.assert_allclose(unmasked[0], np.asarray(out)[0], rtol=1e-5, atol=1e-6)
    assert rel_err(unmasked[1], out[1]) > 1e-3


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_round_trip_is_bit_exact(diffusers_models, tmp_path, name):
    _, _, _, folder = diffusers_models[name]
    convert.import_diffusers(folder, tmp_path / "ckpt")
    convert.export_diffusers(tmp_path / "ckpt", tmp_path / "back")
    a, b = read_state_dict(folder), read_state_dict(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_export_loads_in_diffusers_without_key_warnings(diffusers_models, tmp_path):
    from diffusers import SanaTransformer2DModel

    cfg, hw, model_pt, folder = diffusers_models["sprint_p2"]
    convert.import_diffusers(folder, tmp_path / "ckpt")
    convert.export_diffusers(tmp_path / "ckpt", tmp_path / "back")
    loaded, info = SanaTransformer2DModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    x, t, y, mask, g = inputs(cfg, hw)
    np.testing.assert_array_equal(torch_ref.diffusers_velocity(loaded.eval(), x, t, y, mask, g),
                                  torch_ref.diffusers_velocity(model_pt, x, t, y, mask, g))


@pytest.mark.parametrize("name", ["sprint_p2", "cross_shape_p2"])
def test_jvp_matches_float64_central_difference(diffusers_models, name):
    """jax.jvp through the whole jitted model (x and t tangents) equals a float64 central difference."""
    cfg, hw, _, folder = diffusers_models[name]
    params, _ = convert.diffusers_to_params(folder)
    x, t, y, mask, g = inputs(cfg, hw, seed=3)
    rng = np.random.default_rng(4)
    dx, dt = rng.standard_normal(x.shape), rng.standard_normal(t.shape)
    with jax.enable_x64(True):
        m64 = SanaTransformer(cfg.replace(dtype="float64"))
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        f64 = jax.jit(lambda x, t: m64.apply(p64, x, t, jnp.asarray(y, jnp.float64), mask, g))
        x64, t64 = jnp.asarray(x, jnp.float64), jnp.asarray(t, jnp.float64)
        h = 1e-5
        fd = (f64(x64 + h * dx, t64 + h * dt) - f64(x64 - h * dx, t64 - h * dt)) / (2 * h)
        _, tangent64 = jax.jvp(f64, (x64, t64), (jnp.asarray(dx), jnp.asarray(dt)))
        fd = np.asarray(fd)
        assert rel_err(tangent64, fd) < 1e-6
    model = SanaTransformer(cfg)
    f32 = jax.jit(lambda x, t: model.apply(params, x, t, y, mask, g))
    _, tangent32 = jax.jvp(f32, (jnp.asarray(x), jnp.asarray(t)),
                           (jnp.asarray(dx, jnp.float32), jnp.asarray(dt, jnp.float32)))
    assert rel_err(tangent32, fd) < 1e-4
