"""The token sampler (issue 22): its grid maps against explicit loops, exactness when the half-grid blocks add
nothing, the JVP through it against float64 finite differences, the PyTorch twin (diffusers' blocks + the
samplers written separately) and its ONNX export against sprintjax, recovery's pooled feature targets, and the
refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import inputs, rel_err, tiny

from sprintjax import prune, tokens
from sprintjax.errors import ConfigError, ShapeError
from sprintjax.model import SanaTransformer
from sprintjax.recover import Recoverer


def perturbed(cfg, seed=0, scale=0.2):
    params = jax.tree.map(np.asarray, SanaTransformer(cfg).init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape).astype(np.float32), params)


def silence(params, blocks):
    """The given blocks add nothing to the residual stream (their three output projections zeroed)."""
    p = jax.tree.map(np.array, params)
    for b in blocks:
        for name in ("attn1", "attn2"):
            for v in p["transformer_blocks"][name]["to_out"].values():
                v[b] = 0.0
        p["transformer_blocks"]["ff"]["conv_point"]["kernel"][b] = 0.0
    return p


def test_pool_and_nearest_up_are_the_grid_maps_written_as_loops():
    rng = np.random.default_rng(0)
    b, h, w, d = 2, 4, 6, 3
    x = rng.standard_normal((b, h * w, d)).astype(np.float32)
    grid = x.reshape(b, h, w, d)
    want = np.zeros((b, h // 2, w // 2, d), np.float32)
    for i in range(h // 2):
        for j in range(w // 2):
            want[:, i, j] = (grid[:, 2 * i, 2 * j] + grid[:, 2 * i + 1, 2 * j] + grid[:, 2 * i, 2 * j + 1]
                             + grid[:, 2 * i + 1, 2 * j + 1]) / 4
    np.testing.assert_allclose(tokens.pool(jnp.asarray(x), (h, w)), want.reshape(b, -1, d), rtol=1e-6, atol=1e-7)
    low = rng.standard_normal((b, (h // 2) * (w // 2), d)).astype(np.float32)
    up = np.asarray(tokens.nearest_up(jnp.asarray(low), (h // 2, w // 2))).reshape(b, h, w, d)
    for i in range(h):
        for j in range(w):
            np.testing.assert_array_equal(up[:, i, j], low.reshape(b, h // 2, w // 2, d)[:, i // 2, j // 2])
    with pytest.raises(ShapeError, match="must be even"):
        tokens.pool(jnp.asarray(x), (3, 8))


@pytest.mark.parametrize("down,up", [(1, 3), (0, 2)])
def test_a_fresh_sampler_around_blocks_that_add_nothing_is_exact(down, up):
    """Fresh samplers (zero output convs) around half-grid blocks that add nothing give back the source model
    exactly: the up-sampler adds the half grid's *update* to the full-grid tokens it skipped. (Up-sampling the
    half-grid tokens themselves would lose every detail finer than 2x2 tokens.)"""
    cfg = tiny(num_layers=3, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    params = silence(perturbed(cfg), range(down, up))
    sampled, scfg = tokens.insert(params, cfg, f"{down}:{up}")
    x, t, y, mask, g = inputs(cfg, (8, 12))
    want = SanaTransformer(cfg).apply(params, x, t, y, mask, g)
    got = SanaTransformer(scfg).apply(sampled, x, t, y, mask, g)
    assert rel_err(got, want) < 1e-6
    assert rel_err(SanaTransformer(scfg).apply(perturbed(scfg, seed=1), x, t, y, mask, g), want) > 1e-2


def test_jvp_through_the_token_sampled_model_matches_float64_finite_differences():
    jax.config.update("jax_enable_x64", True)
    try:
        cfg = tiny(guidance_embeds=True, qk_norm="rms_norm_across_heads", num_layers=3, dtype="float64",
                   token_down=1, token_up=2)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), perturbed(cfg))
        x, t, y, mask, g = (None if a is None else jnp.asarray(a, jnp.float64) for a in inputs(cfg, (8, 8)))
        dx = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape))
        dt = jnp.asarray([0.3, -0.2])

        def f(x, t):
            return SanaTransformer(cfg).apply(params, x, t, y, mask, g)

        _, tangent = jax.jvp(f, (x, t), (dx, dt))
        eps = 1e-6
        fd = (f(x + eps * dx, t + eps * dt) - f(x - eps * dx, t - eps * dt)) / (2 * eps)
        assert rel_err(tangent, fd) < 1e-6
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("kw,hw", [(dict(num_layers=3, token_down=1, token_up=3), (8, 12)),
                                   (dict(num_layers=2, token_down=0, token_up=1, patch_size=2), (8, 16))])
def test_pytorch_twin_matches_sprintjax_and_its_onnx_export_runs_like_sprintjax(kw, hw, tmp_path):
    from sprintjax.convert.mobile import export_mobile, torch_generator

    cfg = tiny(guidance_embeds=True, qk_norm="rms_norm_across_heads", **kw)
    params = perturbed(cfg)
    x, t, y, mask, g = inputs(cfg, hw)
    want = SanaTransformer(cfg).apply(params, x, t, y, mask, g)
    twin = torch_generator(params, cfg, 1).transformer
    with torch.no_grad():
        got = twin(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(y), timestep=torch.from_numpy(t),
                   guidance=torch.from_numpy(g), encoder_attention_mask=torch.from_numpy(mask))[0].numpy()
    assert rel_err(got, want) < 1e-5
    report = export_mobile(params, cfg, tmp_path / "m", steps=(2,), batch=2, height=hw[0], width=hw[1],
                           caption_len=6, weights=("float32",), formats=("onnx",), log=lambda m: None)
    assert report["artifacts"]["sana_sprint_2step_float32.onnx"]["rel_err_vs_sprintjax"] < 1e-5


def test_recovery_compares_half_grid_blocks_with_the_source_tokens_pooled():
    """Source blocks 1 and 2 add nothing, so a fresh sampler over them reproduces the source output and, inside
    the half grid, the source's tokens pooled 2x2: both loss terms vanish. A block outside the half grid that
    differs from its source shows in the feature term."""
    cfg = tiny(num_layers=3, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    params = silence(perturbed(cfg), (1, 2))
    student, scfg = tokens.insert(params, cfg, "1:3")
    plan = prune.PrunePlan.full(cfg)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((4, cfg.in_channels, 8, 8)).astype(np.float32),
             "caption": rng.standard_normal((4, 8, cfg.caption_channels)).astype(np.float32),
             "caption_mask": np.ones((4, 8), np.float32)}
    rec = Recoverer(cfg, scfg, plan, 1e-3, 0, (4.5,))
    m = rec.loss(student, params, batch, jax.random.key(0))[1]
    assert float(m["output_loss"]) < 1e-10 and float(m["feature_loss"]) < 1e-10
    changed = jax.tree.map(np.array, student)
    changed["transformer_blocks"]["ff"]["conv_point"]["kernel"][0] += 0.3
    m = rec.loss(changed, params, batch, jax.random.key(0))[1]
    assert float(m["feature_loss"]) > 1e-4


def test_refusals():
    cfg = tiny(num_layers=3, guidance_embeds=True)
    params = perturbed(cfg)
    for spec, match in (("2:2", "token_down < token_up"), ("1:4", "token_up <= num_layers"), ("a:b", "DOWN:UP")):
        with pytest.raises(ConfigError, match=match):
            tokens.insert(params, cfg, spec)
    sampled, scfg = tokens.insert(params, cfg, "0:2")
    with pytest.raises(ConfigError, match="token sampler already"):
        tokens.insert(sampled, scfg, "0:1")
    with pytest.raises(ConfigError, match="exported to mobile formats only"):
        scfg.to_diffusers()
    x, t, y, mask, g = inputs(cfg, (6, 9))
    with pytest.raises(ShapeError, match="must be even"):
        SanaTransformer(scfg).apply(sampled, x, t, y, mask, g)


def test_compress_inserts_a_sampler_that_a_recover_run_accepts_and_diffusers_export_refuses(tmp_path, capsys):
    from pathlib import Path

    from sprintjax import stages
    from sprintjax.cli import main
    from sprintjax.configlib import load_config, model_config, parse_overrides, resolve
    from sprintjax.convert import load_model, save_params

    root = Path(__file__).resolve().parents[1]
    cfg = model_config(load_config(str(root / "configs" / "tiny.py")).model).replace(guidance_embeds=True)
    params = perturbed(cfg)
    save_params(tmp_path / "student", params, cfg)
    assert main(["compress", str(tmp_path / "student"), str(tmp_path / "small"), "--token-sampler", "0:1"]) == 0
    assert "blocks 0..0 on the half token grid" in capsys.readouterr().out
    small, small_cfg = load_model(tmp_path / "small")
    assert (small_cfg.token_down, small_cfg.token_up) == (0, 1)
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in small.items() if k not in tokens.KEYS}, params)
    assert prune.PrunePlan.from_json((tmp_path / "small" / "prune_plan.json").read_text()) == prune.PrunePlan.full(cfg)
    rc = resolve(parse_overrides(load_config(str(root / "configs" / "tiny.py")), [
        "--config.model.guidance_embeds=True", "--config.train.stage=recover",
        f"--config.train.teacher_checkpoint={tmp_path / 'student'}",
        f"--config.train.student_checkpoint={tmp_path / 'small'}"]))
    assert stages.student_config(rc).token_up == 1
    capsys.readouterr()
    for argv, message in (
        (["compress", str(tmp_path / "small"), str(tmp_path / "x"), "--token-sampler", "0:1"], "last rung"),
        (["compress", str(tmp_path / "student"), str(tmp_path / "x"), "--token-sampler", "1:5"], "token_up <="),
        (["export-diffusers", str(tmp_path / "small"), str(tmp_path / "x")], "mobile formats only"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
