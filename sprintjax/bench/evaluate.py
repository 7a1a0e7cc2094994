"""`sprintjax eval`: the benchmark's numbers for a teacher or a student on the shapes validation prompts.

Methods: `teacher_N` samples the flow-matching teacher with N Euler steps and classifier-free guidance (scale
4.5, null caption from the dataset; 2 network evaluations per step), `student_N` runs the few-step consistency
sampler of a distilled student (guidance through its embedder; 1 evaluation per step). Every method sees the
same prompts and the same initial noise. Reported: FD (Fréchet distance in the shipped feature space against
the renders of the same validation scenes), the compositional score (detector), latency (batch 1, median) and
throughput (batch `throughput_batch`), and NFE. With ControlNets (`--teacher-controlnet`, `--student-controlnet`;
records with control latents), every method is controlled by the validation scene's Canny edges and the
edge-agreement score (sprintjax.data.edges: F1 of the generated image's Canny edges against the control's, 1 px
tolerance) is added; the grid then starts with a row of the control maps.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sprintjax import trigflow
from sprintjax.bench import detector, features, shapes
from sprintjax.checks import finite_output, nonfinite_samples
from sprintjax.data import edges, pipeline
from sprintjax.errors import CheckpointError
from sprintjax.fileio import atomic_write_bytes
from sprintjax.model import SanaTransformer

GUIDANCE = 4.5


def prompts(data_dir, n: int):
    """The first n validation scenes, their caption embeddings and masks (from the prepared records)."""
    src = pipeline.open_split(data_dir, "validation")
    n = min(n, len(src))
    ex = [src[i] for i in range(n)]
    caption = np.stack([e["caption"] for e in ex]).astype(np.float32)
    mask = np.stack([e["caption_mask"] for e in ex]).astype(np.float32)
    _, scenes = shapes.sample_images("validation", n)
    return caption, mask, scenes


def control_latents(data_dir, n: int) -> np.ndarray | None:
    """The control latents of the first n validation records, or None if the records hold none."""
    src = pipeline.open_split(data_dir, "validation")
    if "control" not in src[0]:
        return None
    return np.stack([src[i]["control"] for i in range(min(n, len(src)))]).astype(np.float32)


def teacher_sampler(model: SanaTransformer, params, null_caption, steps: int, guidance: float = GUIDANCE,
                    solver: str = "flow", controlnet=None):
    """Euler with CFG, v = v_u + w (v_c - v_u) (both branches in one batched call), on the flow ODE in t_FM
    (`solver="flow"`) or on the TrigFlow PF-ODE of the same model through Prop. 3.1 (`"trigflow"`, Table 1).
    controlnet: (SanaControlNet, its params) — the sampler then takes control latents as a fourth input, fed
    to both CFG branches."""
    from sprintjax.controlnet import controlled_apply

    if solver not in ("flow", "trigflow"):
        raise ValueError(f"solver must be 'flow' or 'trigflow', got {solver!r}")
    cn, cn_params = controlnet if controlnet is not None else (None, None)

    @jax.jit
    def run(params, null_caption, cn_params, noise, caption, mask, control=None):  # weights are arguments
        b = caption.shape[0]
        null = jnp.broadcast_to(null_caption[None], caption.shape)
        two = lambda a, c: jnp.concatenate([a, c])  # noqa: E731

        def v(x, t):
            args = (two(x, x), two(t, t), two(null, caption))
            if cn is None:
                out = model.apply(params, *args, two(mask, mask))
            else:
                out = controlled_apply(model, params, cn, cn_params, *args, two(control, control), two(mask, mask))
            return out[:b] + guidance * (out[b:] - out[:b])

        if solver == "flow":
            return trigflow.euler_flow(v, noise[0], steps)
        return trigflow.euler_trigflow(trigflow.flow_to_trigflow(v), noise[0], steps)
    return functools.partial(run, params, null_caption, cn_params), 2 * steps


def student_sampler(model: SanaTransformer, params, steps: int, guidance: float = GUIDANCE, controlnet=None):
    """The few-step TrigFlow consistency sampler (facts §8) with the guidance embedding (and a ControlNet:
    (SanaControlNet, its params); the sampler then takes control latents as a fourth input)."""
    from sprintjax.sampling import trigflow_model

    times = trigflow.schedule(steps)
    cn, cn_params = controlnet if controlnet is not None else (None, None)

    @jax.jit
    def run(params, cn_params, noise, caption, mask, control=None):
        bound = None if cn is None else (cn, cn_params, control, 1.0)
        return trigflow.sample(trigflow_model(model, params, caption, mask, guidance, bound), noise, times)
    return functools.partial(run, params, cn_params), steps


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def evaluate(run, nfe: int, caption, mask, scenes, noise, ref_feats, feat_params, batch: int = 100,
             throughput_batch: int = 10, name: str = "model", control=None,
             control_edges=None) -> tuple[dict, np.ndarray]:
    """Samples every prompt (in batches), scores them, times batch 1 and `throughput_batch`. Non-finite
    latents are an error naming the method, the samples and their prompts (a NaN would poison the FD).
    control: control latents [N, C, H, W] fed to `run`; control_edges: their edge maps [N, H, W] (the
    edge-agreement score is added)."""
    inputs = lambda sl: (caption[sl], mask[sl]) + (() if control is None else (control[sl],))  # noqa: E731
    outs = [np.asarray(run(noise[:, i:i + batch], *inputs(slice(i, i + batch))))
            for i in range(0, len(caption), batch)]
    latents = np.concatenate(outs)
    bad = nonfinite_samples(latents)
    if bad:
        finite_output(latents, f"eval of {name}", "Their prompts: " + "; ".join(
            f"{i}: {scenes[i].caption!r}" for i in bad[:3]) + ". Inputs (embeddings, shared noise) are finite.")
    images = shapes.codec_of_latents(latents.shape[1])[1](latents)
    result = {"fd": features.frechet_distance(features.features(feat_params, images), ref_feats),
              **detector.compositional_score(images, scenes), "nfe": nfe}
    if control_edges is not None:
        result["edge_f1"] = float(np.mean(edges.edge_f1(edges.canny(images), control_edges)))
    result["latency_s"] = median_seconds(run, noise[:, :1], *inputs(slice(0, 1)))
    tb = min(throughput_batch, len(caption))
    result["throughput_per_s"] = tb / median_seconds(run, noise[:, :tb], *inputs(slice(0, tb)))
    return result, images


def reference_features(scenes, feat_params):
    return features.features(feat_params, np.stack([shapes.render(s) for s in scenes]))


def noise_for(n: int, max_steps: int, channels: int, seed: int = 0) -> np.ndarray:
    """The same initial noise (and per-step noise) for every method: [K, N, channels, 8, 8] (channels: the
    latent space's, 8 for `builtin-ae`, 48 for `builtin-s2d`)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (max_steps, n, channels, 8, 8)))


def write_results(out_dir: Path, results: dict, grids: dict[str, np.ndarray], cols: int = 8) -> None:
    """results.json, results.md (a Markdown table) and, given images, one PNG grid (a row per method, same
    prompts; a "control" grid first when given)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    keys = ["fd", "compositional", *(["edge_f1"] if all("edge_f1" in r for r in results.values()) and results
                                     else []), "latency_s", "throughput_per_s", "nfe"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    atomic_write_bytes(out_dir / "results.md", ("\n".join(lines) + "\n").encode())
    if not grids:
        return
    rows = [shapes.tile(imgs[:cols], cols) for imgs in grids.values()]
    canvas = np.concatenate(rows, axis=0).repeat(4, 0).repeat(4, 1)
    Image.fromarray(canvas).save(out_dir / "grid.png")


def run_benchmark(data_dir, out_dir: Path, models: dict, steps: dict, num: int = 500, seed: int = 0,
                  controlnets: dict | None = None) -> dict:
    """Evaluates {"teacher": path, "student": path} at the step counts of `steps` (keys "teacher" (Flow-Euler),
    "teacher_trigflow" (TrigFlow-Euler of the same teacher) and "student"); writes the results folder.
    controlnets: {"teacher": path, "student": path} of their ControlNets (records with control latents)."""
    from sprintjax.controlnet import SanaControlNet, check_pair
    from sprintjax.convert import load_controlnet, load_model, model_config_of

    controlnets = {k: v for k, v in (controlnets or {}).items() if v}
    caption, mask, scenes = prompts(data_dir, num)
    control = control_edges = None
    if controlnets:
        control = control_latents(data_dir, num)
        if control is None:
            raise CheckpointError(f"ControlNets need control latents: {data_dir} has none (prepare-data --control)")
        missing = sorted(k for k in controlnets if not models.get(k))
        if missing:
            raise CheckpointError(f"a ControlNet was given for the {', '.join(missing)} but no model to drive")
        control_edges = edges.canny(np.stack([shapes.render(sc) for sc in scenes]))
    channels = pipeline.open_split(data_dir, "validation")[0]["latents"].shape[0]
    for role, path in models.items():  # every model checked (cheaply) before the first is loaded
        if path and model_config_of(path, f"--{role}").in_channels != channels:
            raise CheckpointError(f"--{role} {path} takes {model_config_of(path).in_channels}-channel latents; the "
                                  f"records of {data_dir} have {channels}")
    feat = features.load()
    ref = reference_features(scenes, feat)
    noise = noise_for(len(caption), max(k for ks in steps.values() for k in ks), channels, seed)
    null = pipeline.load_null_caption(data_dir)[0]
    results, grids = {}, {}
    if control_edges is not None:
        grids["control"] = edges.control_images(control_edges, edges.SHAPES_COLORS)
    for kind in ("teacher", "teacher_trigflow", "student"):
        role = kind.split("_")[0]
        if not steps.get(kind) or not models.get(role):
            continue
        params, cfg = load_model(models[role])
        model, cn = SanaTransformer(cfg), None
        if role in controlnets:
            cn_params, cn_cfg = load_controlnet(controlnets[role])
            check_pair(cfg, cn_cfg)
            cn = (SanaControlNet(cn_cfg), cn_params)
        for k in steps[kind]:
            run, nfe = (student_sampler(model, params, k, controlnet=cn) if kind == "student"
                        else teacher_sampler(model, params, null, k, solver="trigflow" if "trig" in kind else "flow",
                                             controlnet=cn))
            print(f"evaluating {kind}_{k} on {len(caption)} prompts ...", flush=True)
            results[f"{kind}_{k}"], grids[f"{kind}_{k}"] = evaluate(
                run, nfe, caption, mask, scenes, noise[:k], ref, feat, name=f"{kind}_{k}",
                control=control if cn else None, control_edges=control_edges if cn else None)
    write_results(out_dir, results, grids)
    return results
