"""Structured pruning (issue 22): a pruned model computes what the source computes with the removed units
zeroed by hand, stays a diffusers SanaTransformer2DModel, and the sensitivities rank units by what they cost."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import inputs, rel_err, tiny

from sprintjax import convert, prune
from sprintjax.convert import torch_ref
from sprintjax.errors import ConfigError
from sprintjax.model import SanaTransformer

# no QK-norm: a zeroed head then is a removed head (with QK-norm across heads its RMS statistic also changes)
CFG = tiny(num_layers=3, num_cross_attention_heads=4, cross_attention_head_dim=4, guidance_embeds=True,
           attention_bias=True)
PLAN = prune.PrunePlan(blocks=(0, 2), cross_heads=((3, 1), (0, 2)),
                       ffn_channels=((0, 5, 7, 11, 30, 39), (1, 2, 3, 20, 21, 38)))


def random_params(cfg, seed=0):
    """Init params with every bias and table drawn too (init leaves biases at zero)."""
    params = jax.tree.map(np.asarray, SanaTransformer(cfg).init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), params)


def zeroed_by_hand(params, cfg, plan):
    """The source params with every unit the plan drops zeroed where it enters the residual stream."""
    p = copy.deepcopy(jax.tree.map(np.array, params))
    blocks, hd = p["transformer_blocks"], cfg.cross_attention_head_dim
    for b in range(cfg.num_layers):
        if b not in plan.blocks:  # the block adds nothing: its three output projections are zero
            for path in (("attn1", "to_out", "kernel"), ("attn1", "to_out", "bias"), ("attn2", "to_out", "kernel"),
                         ("attn2", "to_out", "bias"), ("ff", "conv_point", "kernel")):
                node = blocks
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]][b] = 0.0
            continue
        i = plan.blocks.index(b)
        for h in set(range(cfg.num_cross_attention_heads)) - set(plan.cross_heads[i]):
            blocks["attn2"]["to_out"]["kernel"][b, h * hd:(h + 1) * hd] = 0.0
        for c in set(range(cfg.mlp_hidden)) - set(plan.ffn_channels[i]):
            blocks["ff"]["conv_point"]["kernel"][b, c] = 0.0
    return p


def test_pruned_model_equals_source_with_dropped_units_zeroed():
    params = random_params(CFG)
    small, small_cfg = prune.prune(params, CFG, PLAN)
    assert (small_cfg.num_layers, small_cfg.num_cross_attention_heads, small_cfg.mlp_hidden) == (2, 2, 6)
    assert small["transformer_blocks"]["ff"]["conv_inverted"]["kernel"].shape == (2, 16, 12)
    x, t, y, mask, g = inputs(CFG, (8, 8))
    want = SanaTransformer(CFG).apply(zeroed_by_hand(params, CFG, PLAN), x, t, y, mask, g)
    got = SanaTransformer(small_cfg).apply(small, x, t, y, mask, g)
    assert rel_err(got, want) < 1e-5
    # and the zeroing matters: the intact source differs
    assert rel_err(SanaTransformer(CFG).apply(params, x, t, y, mask, g), want) > 1e-2


def test_ablate_masks_equal_zeroing_by_hand():
    params = random_params(CFG, seed=1)
    block = np.array([1.0, 0.0, 1.0])
    head = np.ones((3, 4))
    head[0, [0, 2]] = head[2, [1, 3]] = 0
    channel = np.ones((3, CFG.mlp_hidden))
    keep = [tuple(np.flatnonzero(head[b])) for b in (0, 2)]
    chans = [(0, 5, 7, 11, 30, 39), (1, 2, 3, 20, 21, 38)]
    for b, c in zip((0, 2), chans, strict=True):
        channel[b] = 0
        channel[b, list(c)] = 1
    plan = prune.PrunePlan((0, 2), tuple(keep), tuple(chans))
    x, t, y, mask, g = inputs(CFG, (8, 8), seed=2)
    want = SanaTransformer(CFG).apply(zeroed_by_hand(params, CFG, plan), x, t, y, mask, g)
    got = SanaTransformer(CFG).apply(prune.ablate(params, CFG, jnp.asarray(block), jnp.asarray(head),
                                                  jnp.asarray(channel)), x, t, y, mask, g)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pruned_qk_norm_model_loads_in_diffusers_and_matches(diffusers_models, tmp_path):
    from diffusers import SanaTransformer2DModel

    cfg, hw, _, folder = diffusers_models["cross_shape_p2"]  # QK-norm, 4 cross heads, 3 blocks, mlp_ratio 2
    params, _ = convert.diffusers_to_params(folder)
    plan = prune.PrunePlan((0, 1), ((0, 1, 3), (1, 2, 3)), (tuple(range(0, 32, 2))[:13], tuple(range(19))[6:]))
    small, small_cfg = prune.prune(params, cfg, plan)
    assert small_cfg.mlp_hidden == 13
    convert.params_to_diffusers(tmp_path / "small", small, small_cfg)
    loaded, info = SanaTransformer2DModel.from_pretrained(tmp_path / "small", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert loaded.config.num_layers == 2 and loaded.config.num_cross_attention_heads == 3
    x, t, y, mask, g = inputs(cfg, hw, seed=5)
    ref = torch_ref.diffusers_velocity(loaded.eval(), x, t, y, mask, g)
    assert rel_err(SanaTransformer(small_cfg).apply(small, x, t, y, mask, g), ref) < 1e-5


def test_mlp_ratio_represents_every_channel_count():
    # at hidden 2240 (the 1.6B model) c / d * d rounds below c for 167 counts, e.g. 47
    for d in (16, 96, 1152, 2240):
        for c in (1, 47, d, 2 * d + 3):
            assert int(prune.mlp_ratio_for(c, d) * d) == c


def test_sensitivity_is_the_ablated_models_denoiser_error_and_select_drops_the_cheapest():
    cfg = CFG
    params = random_params(cfg, seed=3)
    blocks = params["transformer_blocks"]
    blocks["attn2"]["to_out"]["kernel"][0, 8:12] *= 1e-3  # head 2 of block 0 barely contributes
    for path in (("attn1", "to_out"), ("attn2", "to_out")):  # block 1 barely contributes
        for k in ("kernel", "bias"):
            blocks[path[0]][path[1]][k][1] *= 1e-3
    blocks["ff"]["conv_point"]["kernel"][1] *= 1e-3
    blocks["ff"]["conv_point"]["kernel"][2, 17] *= 1e-3  # channel 17 of block 2 barely contributes
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, cfg.in_channels, 8, 8)).astype(np.float32)
    caption = rng.standard_normal((3, 5, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((3, 5), np.float32)
    times = np.array([1.5708, 0.7], np.float32)
    sens = prune.sensitivities(params, cfg, latents, caption, mask, times, chunk=7)
    assert sens["block"].shape == (3,) and sens["head"].shape == (3, 4) and sens["channel"].shape == (3, 40)

    # independently: Eq. 1 noising, Eq. 4 denoiser in closed form around the velocity, head (2, 3) zeroed by hand
    x_t, t, cap, m = prune.heldout_inputs(latents, caption, mask, times)
    g = np.full(len(t), 4.5 * cfg.guidance_embeds_scale, np.float32)

    def denoised(p):
        t_fm = np.sin(t) / (np.sin(t) + np.cos(t))
        scale = np.sqrt(t_fm**2 + (1 - t_fm) ** 2)[:, None, None, None]
        v = np.asarray(SanaTransformer(cfg).apply(p, x_t / 0.5 * scale, t_fm, cap, m, g))
        x_fm = x_t / 0.5 * scale
        tf = t_fm[:, None, None, None]
        F = ((1 - 2 * tf) * x_fm + (1 - 2 * tf + 2 * tf**2) * v) / scale
        tb = t[:, None, None, None]
        return np.cos(tb) * x_t - np.sin(tb) * 0.5 * F

    hand = copy.deepcopy(params)
    hand["transformer_blocks"]["attn2"]["to_out"]["kernel"][2, 12:16] = 0
    expect = np.mean((denoised(hand) - denoised(params)) ** 2)
    np.testing.assert_allclose(sens["head"][2, 3], expect, rtol=1e-4)

    plan = prune.select(cfg, sens, num_layers=2, cross_heads=3, ffn_channels=39)
    assert plan.blocks == (0, 2)
    assert plan.cross_heads[0] == (0, 1, 3)
    assert 17 not in plan.ffn_channels[1] and len(plan.ffn_channels[1]) == 39

    grouped = prune.sensitivities(params, cfg, latents, caption, mask, times, channel_group=8)
    assert grouped["channel"].shape == (3, 5)
    with pytest.raises(ConfigError, match="multiple of the sensitivities' channel group 8"):
        prune.select(cfg, grouped, 2, 3, 20)


def test_bad_plans_get_one_error_naming_every_problem():
    bad = prune.PrunePlan(blocks=(2, 0, 5), cross_heads=((0,), (0, 1), (0,)), ffn_channels=((0, 40), (1,)))
    with pytest.raises(ConfigError) as err:
        prune.prune(random_params(CFG), CFG, bad)
    msg = str(err.value)
    for part in ("blocks [5] do not exist", "distinct and in order", "every block must keep the same number",
                 "ffn_channels lists 2 blocks, the plan keeps 3"):
        assert part in msg, msg
    with pytest.raises(ConfigError, match="cross_heads must be in 1..4"):
        prune.select(CFG, None, num_layers=2, cross_heads=5, ffn_channels=8)
    with pytest.raises(ConfigError, match="needs the keys"):
        prune.PrunePlan.from_json('{"blocks": [0]}')
    plan = prune.select(CFG, None, num_layers=2, cross_heads=2, ffn_channels=8)
    assert prune.PrunePlan.from_json(plan.to_json()) == plan and plan.blocks == (0, 2)


def test_compress_command_measures_selects_writes_and_refuses_bad_input(tmp_path, capsys):
    import functools
    import json

    from sprintjax.cli import main
    from sprintjax.data import pipeline

    cfg = CFG.replace(in_channels=4, out_channels=4)
    shapes = {"latents": (4, 8, 8), "caption": (5, cfg.caption_channels), "caption_mask": (5,)}
    make = functools.partial(pipeline.synthetic_examples, 6, shapes, 0)
    data = pipeline.write_records(tmp_path / "rec", {"train": make, "validation": make}, shapes,
                                  np.zeros((5, cfg.caption_channels)), np.ones(5))
    params = random_params(cfg, seed=4)
    params["transformer_blocks"]["ff"]["conv_point"]["kernel"][1] *= 1e-3  # block 1 is the cheapest to lose
    for name in ("attn1", "attn2"):
        for k in ("kernel", "bias"):
            params["transformer_blocks"][name]["to_out"][k][1] *= 1e-3
    convert.save_params(tmp_path / "student", params, cfg)

    args = ["compress", str(tmp_path / "student"), str(tmp_path / "small"), "--data", str(data), "--held-out", "4",
            "--num-layers", "2", "--cross-heads", "3", "--ffn-channels", "24", "--channel-group", "8"]
    assert main(args) == 0
    assert "blocks 3 -> 2, cross-attention heads 4 -> 3, Mix-FFN channels 40 -> 24" in capsys.readouterr().out
    small, small_cfg = convert.load_model(tmp_path / "small")
    plan = prune.PrunePlan.from_json((tmp_path / "small" / "prune_plan.json").read_text())
    assert plan.blocks == (0, 2) and small_cfg.num_layers == 2
    sens = json.loads((tmp_path / "small" / "sensitivities.json").read_text())
    assert np.asarray(sens["channel"]).shape == (3, 5)
    want, _ = prune.prune(params, cfg, plan)  # the written weights are the plan applied to the source
    jax.tree.map(np.testing.assert_array_equal, small, want)

    # the same plan applied by --plan needs no data
    assert main(["compress", str(tmp_path / "student"), str(tmp_path / "again"), "--plan",
                 str(tmp_path / "small" / "prune_plan.json")]) == 0
    # a second rung cut from the first records its plan relative to the uncompressed student
    second = prune.select(small_cfg, None, 1, 2, 8)
    (tmp_path / "second.json").write_text(second.to_json())
    rung2 = tmp_path / "rung2"
    assert main(["compress", str(tmp_path / "small"), str(rung2), "--plan", str(tmp_path / "second.json")]) == 0
    assert prune.PrunePlan.from_json((rung2 / "prune_plan.json").read_text()) == prune.compose(plan, second)
    capsys.readouterr()
    for bad, message in (
        (["--data", str(data), "--cross-heads", "5"], "cross_heads must be in 1..4"),
        (["--data", str(data), "--ffn-channels", "20", "--channel-group", "8"], "multiple of the sensitivities'"),
        (["--data", str(data), "--channel-group", "7"], "channel_group 7 must divide the 40"),
        (["--plan", str(tmp_path / "student" / "model_config.json")], "needs the keys"),
        ([], "give --data"),
    ):
        assert main(["compress", str(tmp_path / "student"), str(tmp_path / "x"), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_progressive_pruning_composes_to_one_plan_relative_to_the_source():
    params = random_params(CFG, seed=5)
    first, first_cfg = prune.prune(params, CFG, PLAN)
    second = prune.PrunePlan((1,), ((1,),), ((0, 2, 5),))  # of what PLAN kept: block 2, head 2, channels 1, 3, 38
    twice, twice_cfg = prune.prune(first, first_cfg, second)
    composed = prune.compose(PLAN, second)
    assert composed == prune.PrunePlan((2,), ((2,),), ((1, 3, 38),))
    once, once_cfg = prune.prune(params, CFG, composed)
    assert once_cfg == twice_cfg
    jax.tree.map(np.testing.assert_array_equal, once, twice)
    with pytest.raises(ConfigError, match="blocks \\[2\\] do not exist"):
        prune.compose(PLAN, prune.PrunePlan((2,), ((0,),), ((0,),)))
