"""The jitted generator and discriminator steps on a tiny config: they train, skip bad batches bit-exactly,
and every switch of the official recipe is a config field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny

from sprintjax.distill import Distiller
from sprintjax.distill_config import DistillConfig
from sprintjax.errors import ConfigError
from sprintjax.model import SanaTransformer

TEACHER = tiny(qk_norm="rms_norm_across_heads", num_layers=3)
FAST = dict(disc_layers=(0, 2, 14), lr_g=1e-3, lr_d=1e-3, warmup_steps_g=0, disc_virtual_batch=4)


def _batch(seed=0, b=4):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, 5), np.float32)
    mask[1:, 3:] = 0
    return {"latents": rng.standard_normal((b, 4, 8, 8)).astype(np.float32),
            "caption": rng.standard_normal((b, 5, 12)).astype(np.float32), "caption_mask": mask}


def _init(cfg):
    teacher_params = SanaTransformer(TEACHER).init(jax.random.key(0))
    d = Distiller(TEACHER, cfg)
    return d, d.init(teacher_params, np.zeros((5, 12), np.float32), jax.random.key(1))


@pytest.fixture(scope="module")
def distiller():
    return _init(DistillConfig(**FAST))[0]


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_generator_and_discriminator_steps_train(distiller):
    d, state = distiller, _init(DistillConfig(**FAST))[1]
    assert d.blocks == (0, 2)  # 14 clipped to the depth, duplicates removed
    before = _host(state)
    g_step, d_step = d.jitted
    state, gm = g_step(state, _batch(0), jax.random.key(10))
    after_g = _host(state)
    assert not _same(after_g.student["net"], before.student["net"])
    assert not _same(after_g.student["logvar"], before.student["logvar"])
    assert _same(after_g.heads, before.heads) and _same(after_g.heads_state, before.heads_state)
    state, dm = d_step(state, _batch(1), jax.random.key(11))
    after_d = _host(state)
    assert not _same(after_d.heads, after_g.heads) and not _same(after_d.heads_state, after_g.heads_state)
    assert _same(after_d.student, after_g.student)
    assert _same(after_d.teacher, before.teacher)  # frozen
    for _ in range(2):
        state, gm = g_step(state, _batch(2), jax.random.key(12))
        state, dm = d_step(state, _batch(3), jax.random.key(13))
    assert int(state.step) == 6 and int(state.g_skipped) == 0 and int(state.d_skipped) == 0
    assert set(gm) >= {"g_loss", "scm_loss", "scm_loss_no_logvar", "adv_loss", "tangent_norm_raw", "tangent_norm",
                       "logvar", "g_grad_norm", "g_skipped", "tangent_warmup"}
    assert set(dm) >= {"d_loss", "d_acc_real", "d_acc_fake", "d_acc_misaligned", "d_auc", "d_grad_norm", "d_skipped"}
    assert all(np.isfinite(float(v)) for v in list(gm.values()) + list(dm.values()))
    assert float(gm["tangent_warmup"]) == pytest.approx(5 / 4000)  # r = min(1, global step / 4000), G and D count
    assert float(gm["tangent_norm"]) < 1.0 < float(gm["tangent_norm_raw"])


def test_non_finite_batch_leaves_the_state_bit_identical(distiller):
    d, state = distiller, _init(DistillConfig(**FAST))[1]
    g_step, d_step = d.jitted
    bad = _batch(0)
    bad["latents"][0, 0, 0, 0] = np.nan
    before = _host(state)
    state, gm = g_step(state, bad, jax.random.key(3))
    after = _host(state)
    assert int(after.g_skipped) == 1 and int(gm["g_skipped"]) == 1 and not np.isfinite(float(gm["g_grad_norm"]))
    assert _same(after.replace(g_skipped=before.g_skipped), before)
    state, dm = d_step(state, bad, jax.random.key(4))
    after_d = _host(state)
    assert int(after_d.d_skipped) == 1
    assert _same(after_d.replace(d_skipped=after.d_skipped), after)


@pytest.mark.parametrize("switch,present,absent", [
    (dict(use_ladd=False), "scm_loss", "adv_loss"),
    (dict(use_scm=False), "adv_loss", "scm_loss"),
])
def test_scm_only_and_ladd_only_are_one_switch_each(switch, present, absent):
    d, state = _init(DistillConfig(**FAST, **switch))
    _, metrics = jax.eval_shape(d.generator_step, state, _batch(), jax.random.key(0))
    assert present in metrics and absent not in metrics


def test_ema_and_config_errors():
    d, state = _init(DistillConfig(**FAST, ema_decay=0.99))
    new, _ = jax.eval_shape(d.generator_step, state, _batch(), jax.random.key(0))
    assert jax.tree.structure(new.ema) == jax.tree.structure(state.student)
    assert _init(DistillConfig(**FAST))[1].ema is None  # off by default, like the official recipe
    with pytest.raises(ConfigError, match="use_scm / use_ladd"):
        DistillConfig(use_scm=False, use_ladd=False)
    with pytest.raises(ConfigError, match="unknown distillation config keys"):
        DistillConfig().replace(bogus=1)


def test_official_defaults():
    cfg = DistillConfig()
    assert (cfg.sigma_d, cfg.p_mean, cfg.p_std, cfg.d_p_mean, cfg.d_p_std) == (0.5, 0.2, 1.6, -0.6, 1.0)
    assert cfg.cfg_scales == (4.0, 4.5, 5.0) and cfg.tangent_warmup_steps == 4000 and cfg.tangent_norm_c == 0.1
    assert (cfg.scm_weight, cfg.adv_weight, cfg.max_time_prob, cfg.disc_layers) == (1.0, 0.5, 0.5, (2, 8, 14, 19))
    assert (cfg.optimizer, cfg.lr_g, cfg.grad_clip, cfg.warmup_steps_g, cfg.ema_decay) == ("came", 2e-6, 0.1, 5000,
                                                                                           None)
    assert jnp.isclose(cfg.max_time, 1.5708)
