"""The ControlNet against diffusers' SanaControlNetModel + SanaTransformer2DModel(controlnet_block_samples),
its two-way conversion, its initialisation and its tangent."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_CONFIGS, inputs, rel_err, tiny

from sprintjax.controlnet import SanaControlNet, check_pair, controlled_apply, controlnet_config
from sprintjax.errors import CheckpointError, ConfigError, ShapeError
from sprintjax.model import SanaTransformer


@pytest.fixture(scope="module")
def controlnets(diffusers_models, tmp_path_factory):
    """name -> (ControlNet config, torch ControlNet, saved folder): n = depth - 1, random values everywhere."""
    from sprintjax.convert import torch_ref

    root = tmp_path_factory.mktemp("controlnets")
    out = {}
    for i, (name, (cfg, _, _, _)) in enumerate(diffusers_models.items()):
        cn_cfg = controlnet_config(cfg, cfg.num_layers - 1)
        model = torch_ref.random_diffusers_controlnet(cn_cfg, seed=100 + i)
        model.save_pretrained(root / name)
        out[name] = (cn_cfg, model, root / name)
    return out


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_controlled_forward_matches_diffusers(name, diffusers_models, controlnets):
    from sprintjax.convert import diffusers_to_controlnet, diffusers_to_params, torch_ref

    cfg, hw, torch_model, folder = diffusers_models[name]
    cn_cfg, torch_cn, cn_folder = controlnets[name]
    params, _ = diffusers_to_params(folder)
    cn_params, read_cfg = diffusers_to_controlnet(cn_folder)
    assert read_cfg == cn_cfg
    x, t, y, mask, g = inputs(cfg, hw)
    control = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    for scale in (1.0, 0.6):
        theirs = torch_ref.diffusers_velocity(torch_model, x, t, y, mask, g, torch_cn, control, scale)
        ours = controlled_apply(SanaTransformer(cfg), params, SanaControlNet(cn_cfg), cn_params, x, t, y, control,
                                mask, g, conditioning_scale=scale)
        assert rel_err(ours, theirs) < 1e-5, (name, scale, rel_err(ours, theirs))
    # the control changes the output (the residuals are not silently dropped)
    plain = torch_ref.diffusers_velocity(torch_model, x, t, y, mask, g)
    assert rel_err(ours, plain) > 1e-2


def test_sprint_class_equals_diffusers_class_without_its_options():
    """sprintjax's PyTorch SanaSprintControlNetModel re-implements the forward; with neither option on it must
    be diffusers' SanaControlNetModel, tensor for tensor and output for output."""
    import torch
    from diffusers import SanaControlNetModel

    from sprintjax.convert import torch_ref
    from sprintjax.convert.torch_controlnet import SanaSprintControlNetModel

    cfg = controlnet_config(tiny(num_layers=3), 2)
    theirs = torch_ref.random_diffusers_controlnet(cfg, seed=3)
    assert type(theirs) is SanaControlNetModel
    fields = {k: v for k, v in cfg.to_diffusers(controlnet=True).items() if not k.startswith("_")}
    ours = SanaSprintControlNetModel(**fields).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, t, y, mask, _ = inputs(cfg, (8, 8))
    c = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    tt = torch.from_numpy
    with torch.no_grad():
        a = ours(tt(x), tt(y), tt(t), tt(c), 0.7, tt(mask), return_dict=False)[0]
        b = theirs(tt(x), tt(y), tt(t), tt(c), 0.7, tt(mask), return_dict=False)[0]
    assert len(a) == 2 and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["plain_p1", "sprint_p2"])
def test_round_trip_is_bit_exact(name, controlnets, tmp_path):
    import safetensors.numpy

    from sprintjax.convert import controlnet_to_diffusers, diffusers_to_controlnet, load_controlnet, save_params

    cn_cfg, torch_cn, folder = controlnets[name]
    params, cfg = diffusers_to_controlnet(folder)
    controlnet_to_diffusers(tmp_path / "back", params, cfg)
    original = {k: v.numpy() for k, v in torch_cn.state_dict().items()}
    written = safetensors.numpy.load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert sorted(written) == sorted(original)
    assert all(np.array_equal(written[k], original[k]) for k in original)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    sprint = cn_cfg.guidance_embeds or cn_cfg.qk_norm is not None
    assert config["_class_name"] == ("SanaSprintControlNetModel" if sprint else "SanaControlNetModel")
    # through a sprintjax ControlNet checkpoint (Orbax) and back
    save_params(tmp_path / "ckpt", params, cfg, controlnet=True)
    again, cfg2 = load_controlnet(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True))
    with pytest.raises(CheckpointError, match="controlnet_config.json found: a ControlNet checkpoint"):
        from sprintjax.convert import load_params

        load_params(tmp_path / "ckpt")


def test_conversion_is_strict_and_writes_nothing(controlnets, tmp_path):
    import safetensors.numpy

    from sprintjax.convert import controlnet_to_diffusers, diffusers_to_controlnet

    _, _, folder = controlnets["plain_p1"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    state = safetensors.numpy.load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state.pop("input_block.weight")
    state["controlnet_blocks.0.bias"] = np.zeros(3, np.float32)
    state["stray.weight"] = np.zeros(2, np.float32)
    safetensors.numpy.save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        diffusers_to_controlnet(bad)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "missing: input_block.weight" in msg and "unexpected: stray.weight" in msg
    assert "misshaped: controlnet_blocks.0.bias" in msg
    params, cfg = diffusers_to_controlnet(folder)
    del params["controlnet_blocks"]["bias"]
    with pytest.raises(CheckpointError, match="missing: controlnet_blocks/bias"):
        controlnet_to_diffusers(tmp_path / "out", params, cfg)
    assert not (tmp_path / "out").exists()


def test_a_transformer_folder_is_not_a_controlnet(diffusers_models, controlnets):
    from sprintjax.convert import diffusers_to_controlnet, diffusers_to_params

    with pytest.raises(CheckpointError, match="expected a SanaControlNetModel or SanaSprintControlNetModel"):
        diffusers_to_controlnet(diffusers_models["plain_p1"][3])
    with pytest.raises(CheckpointError, match="expected a SanaTransformer2DModel config"):
        diffusers_to_params(controlnets["plain_p1"][2])


def test_copied_controlnet_starts_as_the_base_model_and_its_zero_linears_learn():
    """The official initialisation: embedders and first blocks copied, zero linears -> the controlled model is
    the base (up to float32 rounding: the two are separately compiled programs, and the controlled one runs the
    blocks around the ControlNet's additions; a zero linear that is not zero moves the output by O(1));
    the zero linears still get a gradient (else the ControlNet could never train)."""
    cfg = tiny(patch_size=2, guidance_embeds=True, qk_norm="rms_norm_across_heads", num_layers=3)
    model, cn = SanaTransformer(cfg), SanaControlNet(controlnet_config(cfg, 2))
    params = model.init(jax.random.key(0))
    cn_params = cn.from_transformer(params)
    x, t, y, mask, g = inputs(cfg, (8, 8))
    c = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    base = model.apply(params, x, t, y, mask, g)
    assert rel_err(controlled_apply(model, params, cn, cn_params, x, t, y, c, mask, g), base) < 1e-6

    def loss(cp):
        return jnp.sum(controlled_apply(model, params, cn, cp, x, t, y, c, mask, g) ** 2)

    grads = jax.grad(loss)(cn_params)
    assert float(jnp.abs(grads["controlnet_blocks"]["kernel"]).max()) > 0
    # the copied blocks' gradient is zero at init (the output linears are zero), as in the official code
    assert float(jnp.abs(grads["transformer_blocks"]["attn1"]["to_q"]["kernel"]).max()) == 0


def test_jvp_through_the_controlled_model_matches_float64_finite_differences():
    jax.config.update("jax_enable_x64", True)
    try:
        cfg = tiny(guidance_embeds=True, qk_norm="rms_norm_across_heads", num_layers=3, dtype="float64")
        model, cn = SanaTransformer(cfg), SanaControlNet(controlnet_config(cfg, 2))
        f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        params = f64(model.init(jax.random.key(0)))
        cn_params = f64(jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(4), a.shape),
                                     cn.init(jax.random.key(1))))
        x, t, y, mask, g = (None if a is None else jnp.asarray(a, jnp.float64) for a in inputs(cfg, (8, 8)))
        c = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape))
        dx = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape))
        dt = jnp.asarray([0.3, -0.2])

        def f(x, t):
            return controlled_apply(model, params, cn, cn_params, x, t, y, c, mask, g)

        _, tangent = jax.jvp(f, (x, t), (dx, dt))
        eps = 1e-6
        fd = (f(x + eps * dx, t + eps * dt) - f(x - eps * dx, t - eps * dt)) / (2 * eps)
        assert rel_err(tangent, fd) < 1e-6
    finally:
        jax.config.update("jax_enable_x64", False)


def test_mismatched_controlnet_and_control_get_clear_errors():
    cfg = tiny(num_layers=3)
    with pytest.raises(ConfigError, match="does not fit the transformer") as e:
        check_pair(cfg, controlnet_config(tiny(num_layers=3, attention_head_dim=4, cross_attention_dim=8), 2))
    assert "attention_head_dim: transformer 8, ControlNet 4" in str(e.value)
    with pytest.raises(ConfigError, match="needs 1 <= n < the transformer's 3"):
        controlnet_config(cfg, 3)
    model, cn = SanaTransformer(cfg), SanaControlNet(controlnet_config(cfg, 2))
    params, cn_params = model.init(jax.random.key(0)), cn.init(jax.random.key(1))
    x, t, y, mask, _ = inputs(cfg, (8, 8))
    with pytest.raises(ShapeError, match="control latents must have the latents' shape"):
        controlled_apply(model, params, cn, cn_params, x, t, y, x[:, :, :4], mask)
    with pytest.raises(ShapeError, match="ControlNet residuals must be"):
        model.apply(params, x, t, y, mask, control=jnp.zeros((2, 2, 16, 16)))


@pytest.mark.parametrize("name", ["sprint_p2", "plain_p1"])
def test_sample_with_a_controlnet_matches_the_pytorch_loop_at_1_2_and_4_steps(name, diffusers_models, controlnets,
                                                                              tmp_path):
    """`sprintjax sample --controlnet --control` against SanaSprintPipeline's loop (SCMScheduler times) on the
    diffusers transformer driven by the PyTorch ControlNet; a student (guidance) and a teacher-like model."""
    from sprintjax.cli import main
    from sprintjax.convert import torch_ref

    cfg, hw, torch_model, folder = diffusers_models[name]
    _, torch_cn, cn_folder = controlnets[name]
    rng = np.random.default_rng(7)
    caption = rng.standard_normal((2, 5, cfg.caption_channels)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    control = rng.standard_normal((2, cfg.in_channels, *hw)).astype(np.float32)
    for k, v in {"e": caption, "m": mask, "c": control}.items():
        np.save(tmp_path / f"{k}.npy", v)
    guidance = ["--guidance", "4.0"] if cfg.guidance_embeds else []
    for steps in (1, 2, 4):
        noise = rng.standard_normal((steps, 2, cfg.in_channels, *hw)).astype(np.float32)
        np.save(tmp_path / "n.npy", noise)
        argv = ["sample", str(folder), "--caption-embeds", str(tmp_path / "e.npy"), "--caption-mask",
                str(tmp_path / "m.npy"), "--steps", str(steps), "--noise", str(tmp_path / "n.npy"), "--controlnet",
                str(cn_folder), "--control", str(tmp_path / "c.npy"), "--conditioning-scale", "0.8", *guidance,
                "--out", str(tmp_path / "x.npy")]
        assert main(argv) == 0
        theirs = torch_ref.diffusers_sample(torch_model, caption, mask, noise, steps, guidance_scale=4.0,
                                            controlnet=torch_cn, control=control, conditioning_scale=0.8)
        assert rel_err(np.load(tmp_path / "x.npy"), theirs) < 1e-4, (name, steps)


def test_sample_refuses_mismatched_control_inputs_before_loading(diffusers_models, controlnets, tmp_path, capsys):
    from sprintjax.cli import main

    cfg, hw, _, folder = diffusers_models["sprint_p2"]
    np.save(tmp_path / "e.npy", np.zeros((2, 5, cfg.caption_channels), np.float32))
    np.save(tmp_path / "c.npy", np.zeros((2, cfg.in_channels, 4, 4), np.float32))
    np.save(tmp_path / "n.npy", np.zeros((1, 2, cfg.in_channels, *hw), np.float32))
    base = ["sample", str(folder), "--caption-embeds", str(tmp_path / "e.npy"), "--out", str(tmp_path / "x.npy")]
    cases = [
        (["--control", str(tmp_path / "c.npy")], "--control and --controlnet go together"),
        (["--strength", "0.5"], "--strength applies to image-to-image only"),
        (["--noise", str(tmp_path / "n.npy"), "--controlnet", str(controlnets["sprint_p2"][2]), "--control",
          str(tmp_path / "c.npy")], "control latents must be [2, 4, 8, 12]"),
        (["--controlnet", str(controlnets["plain_p1"][2]), "--control", str(tmp_path / "c.npy")],
         "does not fit the transformer"),
        (["--init-latents", str(tmp_path / "c.npy"), "--strength", "0", "--steps", "4"],
         "leaves no step to run"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "x.npy").exists()
