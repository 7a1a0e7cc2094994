"""`sprintjax check-parity`: this installation against diffusers, end to end, in a minute.

A random-weight diffusers SanaTransformer2DModel (SANA-Sprint layout: guidance embedder, QK-norm, 32 latent
channels) is saved with save_pretrained, imported into sprintjax, sampled in 1, 2 and 4 steps with the same
noise by sprintjax and by diffusers' own loop, exported back and compared, and drawn as a PNG grid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sprintjax import convert
from sprintjax.model import SanaTransformer
from sprintjax.model_config import ModelConfig
from sprintjax.sampling import sample_from_arrays

DEMO_MODEL = ModelConfig(
    in_channels=32, out_channels=32, num_attention_heads=4, attention_head_dim=32, num_layers=4,
    num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
    sample_size=16, guidance_embeds=True, qk_norm="rms_norm_across_heads",
)
STEPS = (1, 2, 4)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_parity_check(workdir: Path, batch: int = 4, seed: int = 0) -> dict:
    from sprintjax.convert import torch_ref
    from sprintjax.convert.diffusers_io import read_state_dict
    from sprintjax.images import save_grid

    workdir.mkdir(parents=True, exist_ok=True)
    src, ckpt, back = workdir / "diffusers_random", workdir / "params", workdir / "diffusers_export"
    print(f"[1/5] random-weight diffusers SanaTransformer2DModel -> {src}", flush=True)
    model_pt = torch_ref.random_diffusers_model(DEMO_MODEL, seed=seed, scale=0.1)
    model_pt.save_pretrained(src)
    print(f"[2/5] sprintjax import-diffusers -> {ckpt}", flush=True)
    convert.import_diffusers(src, ckpt, force=True)
    params, cfg = convert.load_params(ckpt)

    rng = np.random.default_rng(seed)
    caption = rng.standard_normal((batch, 8, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((batch, 8), np.float32)
    mask[1:, 5:] = 0  # padded captions
    print("[3/5] sampling 1, 2 and 4 steps (same noise) in sprintjax and in diffusers", flush=True)
    rows, report = [], {}
    for k in STEPS:
        noise = rng.standard_normal((k, batch, cfg.in_channels, 16, 16)).astype(np.float32)
        t0 = time.perf_counter()
        ours = sample_from_arrays(SanaTransformer(cfg), params, caption, mask, steps=k, noise=noise)
        t1 = time.perf_counter()
        ref = torch_ref.diffusers_sample(model_pt, caption, mask, noise, steps=k)
        report[f"steps_{k}"] = {"max_rel_diff_vs_diffusers": _rel(ours, ref), "sprintjax_s": t1 - t0}
        print(f"      {k} step(s): max |sprintjax - diffusers| / max |diffusers| = {_rel(ours, ref):.2e}")
        rows.append(ours)
    print(f"[4/5] sprintjax export-diffusers -> {back}", flush=True)
    convert.export_diffusers(ckpt, back, force=True)
    a, b = read_state_dict(src), read_state_dict(back)
    exact = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    report["round_trip_bit_exact"] = bool(exact)
    print(f"      round trip diffusers -> sprintjax -> diffusers bit-exact: {exact}")
    grid = workdir / "samples_1_2_4_steps.png"
    save_grid(rows, grid)
    (workdir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[5/5] grid (rows: 1, 2, 4 steps; first 3 latent channels) -> {grid}")
    print(f"      report -> {workdir / 'demo.json'}")
    return report
