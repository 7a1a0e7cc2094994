"""Recovery of a pruned student (train stage `recover`): the loss pairs each pruned block with the source block
it was cut from, and the trainer runs it end to end (train, checkpoint, export) with clear errors first."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from sprintjax import prune
from sprintjax.configlib import load_config, parse_overrides
from sprintjax.convert import params_to_diffusers, save_params
from sprintjax.errors import CheckpointError, ConfigError
from sprintjax.model import SanaTransformer
from sprintjax.recover import Recoverer

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(str(ROOT / "configs" / "tiny.py")).model


def source_student(seed=0):
    from sprintjax.configlib import model_config

    cfg = model_config(TINY).replace(guidance_embeds=True)
    params = jax.tree.map(np.asarray, SanaTransformer(cfg).init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return cfg, jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)


def batch(cfg, b=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((b, cfg.in_channels, 8, 8)).astype(np.float32),
            "caption": rng.standard_normal((b, 8, cfg.caption_channels)).astype(np.float32),
            "caption_mask": np.ones((b, 8), np.float32)}


def test_each_pruned_block_is_compared_with_the_source_block_it_was_cut_from():
    cfg, params = source_student()
    blocks = params["transformer_blocks"]
    for name in ("attn1", "attn2"):  # source block 1 adds nothing: dropping it changes no output or feature
        for k in ("kernel", "bias"):
            blocks[name]["to_out"][k][1] = 0.0
    blocks["ff"]["conv_point"]["kernel"][1] = 0.0
    full = prune.PrunePlan.full(cfg)
    plan = prune.PrunePlan((0, 2), full.cross_heads[:2], full.ffn_channels[:2])
    small, small_cfg = prune.prune(params, cfg, plan)
    rec = Recoverer(cfg, small_cfg, plan, 1e-3, 0, (4.5,))
    loss, m = rec.loss(small, params, batch(cfg), jax.random.key(0))
    assert float(m["output_loss"]) < 1e-10 and float(m["feature_loss"]) < 1e-10
    # pairing pruned block i with source block i instead would compare block 2's tokens with block 1's
    wrong = Recoverer(cfg, small_cfg, prune.PrunePlan((0, 1), plan.cross_heads, plan.ffn_channels), 1e-3, 0, (4.5,))
    assert float(wrong.loss(small, params, batch(cfg), jax.random.key(0))[1]["feature_loss"]) > 1e-3
    # a pruned unit that mattered shows in both terms
    cut, cut_cfg = prune.prune(params, cfg, prune.PrunePlan((0, 2), full.cross_heads[:2],
                                                           (full.ffn_channels[0][:40],) * 2))
    m = Recoverer(cfg, cut_cfg, plan, 1e-3, 0, (4.5,)).loss(cut, params, batch(cfg), jax.random.key(0))[1]
    assert float(m["output_loss"]) > 1e-6 and float(m["feature_loss"]) > 1e-6


def run_config(tmp_path, student, **train):
    overrides = [f"--config.train.{k}={v}" for k, v in dict(
        stage="recover", teacher_checkpoint=tmp_path / "source", student_checkpoint=student, num_steps=30, lr=3e-3,
        ckpt_every=15, sample_every=15, log_every=5, **train).items()]
    return parse_overrides(load_config(str(ROOT / "configs" / "tiny.py")),
                           ["--config.model.guidance_embeds=True", "--config.data.synthetic=64", *overrides])


def test_recover_stage_trains_the_pruned_student_and_exports_it(tmp_path):
    from sprintjax.checkpoints import trained_params
    from sprintjax.train import train

    cfg, params = source_student()
    save_params(tmp_path / "source", params, cfg)
    plan = prune.select(cfg, None, num_layers=2, cross_heads=1, ffn_channels=40)
    small, small_cfg = prune.prune(params, cfg, plan)
    save_params(tmp_path / "small", small, small_cfg, extra={"prune_plan.json": plan.to_json()})
    save_params(tmp_path / "no_plan", small, small_cfg)

    with pytest.raises(CheckpointError, match="no prune_plan.json"):
        train(run_config(tmp_path, tmp_path / "no_plan"), tmp_path / "bad")
    other = prune.select(cfg, None, num_layers=2, cross_heads=2, ffn_channels=40)
    save_params(tmp_path / "mismatch", small, small_cfg, extra={"prune_plan.json": other.to_json()})
    with pytest.raises(CheckpointError, match="is not its prune_plan.json applied"):
        train(run_config(tmp_path, tmp_path / "mismatch"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="set both"):
        train(run_config(tmp_path, ""), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    wd = tmp_path / "recover"
    assert train(run_config(tmp_path, tmp_path / "small"), wd) == "done"
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["recover_loss"] for r in rows if "recover_loss" in r]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    got, got_cfg, step = trained_params(wd, "params")
    assert step == 30 and got_cfg == small_cfg.replace(**got_cfg.compute_settings())
    assert not np.array_equal(got["proj_out"]["kernel"], small["proj_out"]["kernel"])
    assert list((wd / "samples").glob("*.png"))

    # then sCM + LADD from the recovered pruned student (train.student_checkpoint in a distillation run)
    params_to_diffusers(tmp_path / "recovered", got, got_cfg)  # a diffusers folder, as export-diffusers writes
    overrides = ["--config.model.guidance_embeds=False", "--config.train.num_steps=4", "--config.train.ckpt_every=2",
                 f"--config.train.teacher_checkpoint={tmp_path / 'teacher'}",
                 f"--config.train.student_checkpoint={tmp_path / 'recovered'}", "--config.data.synthetic=64"]
    teacher_cfg = cfg.replace(guidance_embeds=False)
    save_params(tmp_path / "teacher", SanaTransformer(teacher_cfg).init(jax.random.key(1)), teacher_cfg)
    distill = lambda *extra: parse_overrides(load_config(str(ROOT / "configs" / "tiny.py")),  # noqa: E731
                                             [*overrides, *extra])
    save_params(tmp_path / "no_guidance", small, small_cfg.replace(guidance_embeds=False))
    with pytest.raises(CheckpointError, match="no guidance embedder"):
        train(distill(f"--config.train.student_checkpoint={tmp_path / 'no_guidance'}"), tmp_path / "bad")
    wd2 = tmp_path / "distill"
    assert train(distill(), wd2) == "done"
    (tmp_path / "recovered").rename(tmp_path / "moved")  # the run keeps the student's shape itself
    student, student_cfg, _ = trained_params(wd2, "student")
    assert student_cfg.num_layers == 2 and student_cfg.num_cross_attention_heads == 1
    assert not np.array_equal(student["proj_out"]["kernel"], got["proj_out"]["kernel"])
