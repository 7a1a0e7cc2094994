"""The model itself: preset sizes (without allocating), compute dtypes, remat, features, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import inputs, rel_err, tiny, xla_env

import sprintjax
from sprintjax.errors import ConfigError, ShapeError
from sprintjax.model import SanaTransformer, count_params
from sprintjax.model_config import ModelConfig, preset


@pytest.mark.parametrize("name,millions", [("sana_sprint_600m", 593.50), ("sana_sprint_1600m", 1610.24)])
def test_preset_parameter_counts_equal_diffusers(name, millions):
    import torch
    from diffusers import SanaTransformer2DModel

    cfg = preset(name)
    ours = count_params(SanaTransformer(cfg).param_shapes())  # jax.eval_shape: nothing allocated
    fields = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        theirs = sum(p.numel() for p in SanaTransformer2DModel(**fields).parameters())
    assert ours == theirs
    assert round(ours / 1e6, 2) == millions


def test_teacher_presets_lack_only_the_guidance_embedder():
    for size in ("600m", "1600m"):
        student = SanaTransformer(preset(f"sana_sprint_{size}")).param_shapes()
        teacher = SanaTransformer(preset(f"sana_{size}_teacher")).param_shapes()
        guidance = count_params(student["time_embed"]["guidance_embedder"])
        assert count_params(student) - count_params(teacher) == guidance


def test_import_sprintjax_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sprintjax, sprintjax.convert, sprintjax.sampling, sprintjax.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny(patch_size=2, guidance_embeds=True, qk_norm="rms_norm_across_heads", num_layers=4)
    model = SanaTransformer(cfg)
    return model, model.init(jax.random.key(0))


def test_params_are_float32_and_stacked(model_and_params):
    model, params = model_and_params
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    assert all(a.shape[0] == 4 for a in jax.tree.leaves(params["transformer_blocks"]))
    assert sorted(params) == ["caption_norm", "caption_projection", "patch_embed", "proj_out", "scale_shift_table",
                              "time_embed", "transformer_blocks"]


def test_bfloat16_compute_stays_close_and_returns_float32(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = inputs(model.config, (8, 8))
    ref = model.apply(params, x, t, y, mask, g)
    out = SanaTransformer(model.config.replace(dtype="bfloat16")).apply(params, x, t, y, mask, g)
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, ref) < 5e-2


@pytest.mark.parametrize("compute", [{"remat": "full"}, {"remat": "dots"}, {"scan_layers": False},
                                     {"scan_layers": False, "remat": "dots"}])
def test_remat_and_unrolling_change_nothing_but_cost(model_and_params, compute):
    model, params = model_and_params
    x, t, y, mask, g = inputs(model.config, (8, 8))
    loss = lambda m: lambda p: jnp.sum(m.apply(p, x, t, y, mask, g) ** 2)  # noqa: E731
    g_ref = jax.jit(jax.grad(loss(model)))(params)
    g_other = jax.jit(jax.grad(loss(SanaTransformer(model.config.replace(**compute)))))(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_other), strict=True):
        assert rel_err(b, a) < 1e-5
    feats = model.forward(params, x, t, y, mask, g, features_after=(0, 2))[1]["features"]
    other = SanaTransformer(model.config.replace(**compute)).forward(params, x, t, y, mask, g,
                                                                      features_after=(0, 2))[1]["features"]
    for a, b in zip(feats, other, strict=True):
        assert rel_err(b, a) < 1e-5


def test_features_after_blocks_match_a_truncated_model(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = inputs(model.config, (8, 8))
    out, aux = model.forward(params, x, t, y, mask, g, features_after=(2, 0))
    np.testing.assert_array_equal(out, model.apply(params, x, t, y, mask, g))
    # The feature after block 2 is the last hidden state of the same model cut to 3 layers.
    short = SanaTransformer(model.config.replace(num_layers=3))
    p3 = dict(params, transformer_blocks=jax.tree.map(lambda a: a[:3], params["transformer_blocks"]))
    _, aux3 = short.forward(p3, x, t, y, mask, g, features_after=(2,))
    np.testing.assert_allclose(aux["features"][0], aux3["features"][0], rtol=1e-6)
    assert aux["features"][1].shape == (2, 16, model.config.hidden_size)
    with pytest.raises(ShapeError, match="feature layer 4"):
        model.forward(params, x, t, y, mask, g, features_after=(4,))


def test_any_aspect_ratio_and_bad_shapes(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = inputs(model.config, (4, 12))
    assert model.apply(params, x, t, y, mask, g).shape == (2, 4, 4, 12)
    with pytest.raises(ShapeError, match="divisible by patch_size"):
        model.apply(params, np.zeros((2, 4, 5, 8), np.float32), t, y, mask, g)
    with pytest.raises(ShapeError, match="caption embeddings"):
        model.apply(params, x, t, y[..., :3], mask, g)
    with pytest.raises(ShapeError, match="caption mask"):
        model.apply(params, x, t, y, mask[:, :2], g)
    with pytest.raises(ShapeError, match="pass guidance"):
        model.apply(params, x, t, y, mask, None)


def test_config_validation_and_diffusers_keys():
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        tiny(cross_attention_dim=24)
    with pytest.raises(ConfigError, match="qk_norm"):
        tiny(qk_norm="layer_norm")
    with pytest.raises(ConfigError, match="zero3_blocks must be one of"):
        tiny(zero3_blocks="always")
    with pytest.raises(ConfigError, match="unknown SanaTransformer2DModel config keys: \\['bogus'\\]"):
        ModelConfig.from_diffusers({**tiny().to_diffusers(), "bogus": 1})
    cfg = tiny(guidance_embeds=True)
    assert ModelConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert sprintjax.preset("sana_sprint_600m").hidden_size == 1152


ZERO3_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.sharding import batch_sharding, block_specs, make_mesh, tree_shardings

cfg = ModelConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                  caption_channels=12, sample_size=8)
plain = SanaTransformer(cfg)
params = plain.init(jax.random.key(0))
x, cap = jax.random.normal(jax.random.key(1), (8, 4, 8, 8)), jax.random.normal(jax.random.key(2), (8, 5, 12))
t = jax.random.uniform(jax.random.key(3), (8,))

def both(m, p, x):  # a loss with its gradient, and the sCM-style JVP tangent of the output in (x, t)
    out, tangent = jax.jvp(lambda x, t: m.apply(p, x, t, cap), (x, t), (jnp.ones_like(x), jnp.ones_like(t)))
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(m.apply(p, x, t, cap) ** 2))(p)
    return loss, grads, out, tangent

want = both(plain, params, x)
flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
for kind, remat, zero3_blocks, data in (("fsdp", "full", "auto", 2), ("replicate", "full", "auto", 2),
                                        ("fsdp", "dots", "on", 1), ("fsdp", "full", "off", 2),
                                        ("fsdp", "dots", "auto", 2), ("fsdp", "dots", "auto", 1)):
    mesh = make_mesh({"data": data, "fsdp": 8 // data})
    sh = tree_shardings(params, mesh, ((".*", kind),), min_fsdp_size=256)
    zero3 = SanaTransformer(cfg.replace(remat=remat, zero3_blocks=zero3_blocks),
                            block_specs=block_specs(sh["transformer_blocks"]))

    def sharded(p, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return both(zero3, p, x)

    step = jax.jit(sharded, in_shardings=(sh, batch_sharding(mesh)))
    got = step(jax.device_put(params, sh), jax.device_put(x, batch_sharding(mesh)))
    err = max(float(np.max(np.abs(flat(a) - flat(b))) / np.max(np.abs(flat(b)))) for a, b in zip(got, want))
    # explicit gathers in the lowered program are ZeRO-3's own (the partitioner's appear only when compiled)
    gathers = step.lower(params, x).as_text().count("stablehlo.all_gather")
    print(f"{kind},{remat},{zero3_blocks},data={data}", err, gathers)
"""


def test_zero3_blocks_on_eight_devices_match_the_plain_model():
    """Rematerialised blocks under an FSDP mesh gather their weights in a shard_map (sharding.fsdp_block; by
    default and with `zero3_blocks='on'` under any FSDP mesh, never when 'off'): value, weight gradients and
    the forward-mode tangent equal the plain model's; the lowered program gathers explicitly only as ZeRO-3
    (the SPMD partitioner's own gathers appear only after compilation); replicated weights are not gathered."""
    import subprocess
    import sys

    env = xla_env(8)
    out = subprocess.run([sys.executable, "-c", ZERO3_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {case: (float(err), int(n)) for case, err, n in (line.split() for line in out.stdout.splitlines()[-6:])}
    assert len(got) == 6 and all(err < 1e-5 for err, _ in got.values()), out.stdout
    gathers = {case: n > 0 for case, (_, n) in got.items()}
    assert gathers == {"fsdp,full,auto,data=2": True, "replicate,full,auto,data=2": False,
                       "fsdp,dots,on,data=1": True, "fsdp,full,off,data=2": False,
                       "fsdp,dots,auto,data=2": True, "fsdp,dots,auto,data=1": True}, got


@pytest.mark.parametrize("axes,devices,group,want", [
    ({"data": -1, "fsdp": -1}, 64, 32, {"data": 2, "fsdp": 32}),  # v5p-64: HSDP 2 x 32
    ({"data": -1, "fsdp": -1}, 8, 32, {"data": 1, "fsdp": 8}),  # one group: plain FSDP
    ({"data": -1, "fsdp": -1}, 48, 32, {"data": 2, "fsdp": 24}),  # 32 does not divide 48: the largest that does
    ({"data": -1, "fsdp": -1}, 7, 4, {"data": 7, "fsdp": 1}),  # a prime count above the group: replicas only
    ({"data": -1, "fsdp": -1, "tensor": 2}, 64, 32, {"data": 1, "fsdp": 32, "tensor": 2}),
    ({"data": 4, "fsdp": -1}, 64, 32, {"data": 4, "fsdp": 16}),  # an explicit axis wins
    ({"data": 1, "fsdp": -1}, 64, 32, {"data": 1, "fsdp": 64}),
])
def test_a_mesh_picks_itself_from_the_device_count(axes, devices, group, want):
    from sprintjax.sharding import mesh_shape

    assert mesh_shape(axes, devices, group) == want


def test_an_explicit_mesh_is_still_checked_and_the_pod_recipes_pick_theirs():
    from sprintjax.configlib import load_config, resolve
    from sprintjax.sharding import mesh_shape

    with pytest.raises(ConfigError, match="does not fit 64 devices"):
        mesh_shape({"data": 3, "fsdp": -1}, 64)
    with pytest.raises(ConfigError, match="has 6 devices but 8"):
        mesh_shape({"data": 3, "fsdp": 2}, 8)
    for path in ("configs/sana_sprint_600m_1024.py", "configs/sana_sprint_1600m_1024.py"):
        rc = resolve(load_config(path))
        assert mesh_shape(rc.mesh, 64, rc.sharding.fsdp_group) == {"data": 2, "fsdp": 32}
        assert mesh_shape(rc.mesh, 16, rc.sharding.fsdp_group) == {"data": 1, "fsdp": 16}


def test_both_depthwise_formulations_equal_a_float64_reference():
    """The depthwise 3x3 conv runs as shifted multiply-adds on CPU and as one grouped convolution elsewhere
    (layers.DepthwiseConv3x3, by lax.platform_dependent): both equal a direct float64 loop over the nine taps
    with zero padding, in value, forward-mode tangent (the sCM JVP) and kernel gradient."""
    from sprintjax.layers import _depthwise_grouped, _depthwise_row_sums

    rng = np.random.default_rng(0)
    x, k = rng.normal(size=(2, 5, 7, 6)), rng.normal(size=(3, 3, 1, 6))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(padded[:, dy:dy + 5, dx:dx + 7] * k[dy, dx, 0] for dy in range(3) for dx in range(3))
    dx_, dk = rng.normal(size=x.shape), rng.normal(size=k.shape)
    with jax.enable_x64():
        for f in (_depthwise_row_sums, _depthwise_grouped):
            y, tangent = jax.jvp(f, (jnp.asarray(x), jnp.asarray(k)), (jnp.asarray(dx_), jnp.asarray(dk)))
            np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
            # bilinear: the tangent is f(dx, k) + f(x, dk)
            np.testing.assert_allclose(tangent, f(jnp.asarray(dx_), jnp.asarray(k)) + f(jnp.asarray(x),
                                                                                         jnp.asarray(dk)), rtol=1e-12)
            grad = jax.grad(lambda k, f=f: jnp.sum(f(jnp.asarray(x), k) * want))(jnp.asarray(k))
            # d/dk[dy, dx] of sum(y * want) = sum over pixels of the shifted input times want
            expect = np.array([[[(padded[:, dy:dy + 5, dx:dx + 7] * want).sum((0, 1, 2))] for dx in range(3)]
                               for dy in range(3)])
            np.testing.assert_allclose(grad, expect, rtol=1e-10)
