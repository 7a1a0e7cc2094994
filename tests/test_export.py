"""Training checkpoints to a diffusers SanaSprintPipeline folder: loads cleanly, samples like sprintjax."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import STEPS, rel_err

from sprintjax.cli import main

H = W = 16  # latent size; the tiny VAE halves pixels, so 32x32 images (the pipeline wants multiples of 32)


@pytest.fixture(scope="session")  # session: made once per xdist worker, whatever runs in between
def exported(reference, tmp_path_factory):
    from sprintjax.convert import torch_ref

    root = tmp_path_factory.mktemp("export")
    vae, text_encoder = torch_ref.tiny_encoders(root / "encoders", latent_channels=4, hidden=16)
    wd = reference[0]
    assert main(["export-diffusers", str(wd), str(root / "pipe"), "--vae", str(vae), "--text-encoder",
                 str(text_encoder)]) == 0
    return wd, root


def test_pipeline_folder_loads_with_every_component_and_no_stray_keys(exported):
    from diffusers import SanaSprintPipeline, SanaTransformer2DModel

    _, root = exported
    index = json.loads((root / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "SanaSprintPipeline" and index["scheduler"] == ["diffusers", "SCMScheduler"]
    _, info = SanaTransformer2DModel.from_pretrained(root / "pipe" / "transformer", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    pipe = SanaSprintPipeline.from_pretrained(root / "pipe")
    assert pipe.transformer.config.guidance_embeds and pipe.scheduler.config.prediction_type == "trigflow"
    assert pipe.scheduler.config.sigma_data == 0.5
    card = (root / "pipe" / "README.md").read_text()
    assert f"step {STEPS} of {STEPS}" in card and "sCM True, LADD True" in card
    images = pipe(prompt=["a red circle", "two blue squares"], num_inference_steps=2, height=2 * H, width=2 * W,
                  use_resolution_binning=False, max_sequence_length=8, output_type="np").images
    assert images.shape == (2, 2 * H, 2 * W, 3) and np.isfinite(images).all()


def test_diffusers_sampling_matches_sprintjax_at_1_2_and_4_steps(exported):
    import torch
    from diffusers import SanaSprintPipeline

    from sprintjax import trigflow
    from sprintjax.convert import load_model, torch_ref
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents

    wd, root = exported
    pipe = SanaSprintPipeline.from_pretrained(root / "pipe")
    params, cfg = load_model(root / "pipe")
    rng = np.random.default_rng(0)
    caption = rng.standard_normal((2, 8, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((2, 8), np.float32)
    mask[1, 5:] = 0
    noise = rng.standard_normal((4, 2, cfg.in_channels, H, W)).astype(np.float32)
    for steps in (1, 2, 4):
        ours = np.asarray(sample_latents(SanaTransformer(cfg), params, caption, mask, noise[:steps],
                                         trigflow.schedule(steps)))
        theirs = torch_ref.diffusers_sample(pipe.transformer, caption, mask, noise[:steps], steps)
        assert rel_err(ours, theirs) < 1e-4, (steps, rel_err(ours, theirs))
    # the pipeline itself (its own loop and SCMScheduler.step) at one step, where no fresh noise enters
    with torch.no_grad():
        out = pipe(prompt_embeds=torch.from_numpy(caption), prompt_attention_mask=torch.from_numpy(mask),
                   latents=torch.from_numpy(noise[0]), num_inference_steps=1, intermediate_timesteps=None,
                   height=2 * H, width=2 * W, use_resolution_binning=False, output_type="latent").images
    ours = np.asarray(sample_latents(SanaTransformer(cfg), params, caption, mask, noise[:1], trigflow.schedule(1)))
    assert rel_err(ours, out.numpy()) < 1e-4


def test_export_choices_and_refusals(exported, tmp_path, capsys):
    from diffusers import SanaSprintPipeline

    from sprintjax.checkpoints import trained_params
    from sprintjax.convert import load_model

    wd, root = exported
    assert main(["export-diffusers", str(wd), str(tmp_path / "p12"), "--step", "12"]) == 0
    assert "without vae, text_encoder, tokenizer" in capsys.readouterr().out
    params, _ = load_model(tmp_path / "p12")
    want, _, _ = trained_params(wd, "student", 12)
    assert np.array_equal(params["proj_out"]["kernel"], want["proj_out"]["kernel"])
    with pytest.raises(ValueError, match="expected"):  # diffusers wants the absent components passed ...
        SanaSprintPipeline.from_pretrained(tmp_path / "p12")
    pipe = SanaSprintPipeline.from_pretrained(tmp_path / "p12", vae=None, text_encoder=None, tokenizer=None)
    assert pipe.vae is None and pipe.transformer.config.guidance_embeds  # ... as the model card says
    assert main(["export-diffusers", str(wd), str(tmp_path / "p12")]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert main(["export-diffusers", str(wd), str(tmp_path / "x"), "--step", "5"]) == 2
    assert "no checkpoint at step 5" in capsys.readouterr().err
    assert main(["export-diffusers", str(wd), str(tmp_path / "x"), "--part", "ema"]) == 2
    assert "kept no EMA" in capsys.readouterr().err
    assert main(["export-diffusers", str(wd), str(tmp_path / "x"), "--part", "teacher"]) == 2
    assert "randomly initialised teacher" in capsys.readouterr().err
    assert main(["export-diffusers", str(root / "encoders" / "vae"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # a bare params checkpoint and a transformer-only export round trip
    assert main(["import-diffusers", str(tmp_path / "p12"), str(tmp_path / "ckpt")]) == 0
    assert main(["export-diffusers", str(tmp_path / "ckpt"), str(tmp_path / "t"), "--transformer-only"]) == 0
    back, _ = load_model(tmp_path / "t")
    assert np.array_equal(back["proj_out"]["kernel"], want["proj_out"]["kernel"])


def test_export_mobile_runs_in_executorch_and_onnxruntime_like_sprintjax(exported, tmp_path, capsys):
    """ONNX at 2 steps (the in-graph re-noising) and ExecuTorch at 1 step: XNNPACK's lowering is most of this
    test's time (about a minute per graph on 2 cores) and grows with the unrolled graph."""
    wd, _ = exported
    common = ["--batch", "2", "--caption-len", "6", "--weights", "float32,int8"]
    assert main(["export-mobile", str(wd), str(tmp_path / "onnx"), "--steps", "2", "--formats", "onnx", *common]) == 0
    assert main(["export-mobile", str(wd), str(tmp_path / "pte"), "--steps", "1", "--formats", "pte", *common]) == 0
    assert "| sana_sprint_1step_int8.pte |" in capsys.readouterr().out
    arts = {**json.loads((tmp_path / "onnx" / "export.json").read_text())["artifacts"],
            **json.loads((tmp_path / "pte" / "export.json").read_text())["artifacts"]}
    assert sorted(arts) == sorted([f"sana_sprint_2step_{w}.onnx" for w in ("float32", "int8")]
                                  + [f"sana_sprint_1step_{w}.pte" for w in ("float32", "int8")])
    assert arts["sana_sprint_2step_float32.onnx"]["rel_err_vs_sprintjax"] < 1e-5
    # XNNPACK as ONNX: a tanh-GELU lowered to XNNPACK's exact GELU would show here (1e-4; mobile.xnnpack_partitioner)
    assert arts["sana_sprint_1step_float32.pte"]["rel_err_vs_sprintjax"] < 1e-5
    for name in ("sana_sprint_1step_int8.pte", "sana_sprint_2step_int8.onnx"):  # a bounded deviation, not broken
        assert 1e-5 < arts[name]["rel_err_vs_sprintjax"] < 5e-2
    assert main(["export-mobile", str(wd), str(tmp_path / "pte")]) == 2  # exists
    assert main(["export-mobile", str(wd), str(tmp_path / "x"), "--weights", "int4"]) == 2
    assert "unknown weights" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_mobile_refuses_weights_whose_graph_overflows(tmp_path, capsys):
    """Finite weights whose output overflows (float16 storage turns 1e5 into inf): refused, nothing written."""
    import sys

    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
    from tiny import TINY

    from sprintjax.convert import save_params
    from sprintjax.model import SanaTransformer

    cfg = TINY.replace(guidance_embeds=True)
    params = SanaTransformer(cfg).init(jax.random.key(0))
    params["proj_out"]["kernel"] = params["proj_out"]["kernel"] + np.float32(1e5)
    save_params(tmp_path / "ckpt", params, cfg)
    argv = ["export-mobile", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--caption-len", "4", "--formats", "onnx"]
    assert main(argv + ["--weights", "float16"]) == 2
    err = capsys.readouterr().err
    assert "the 1-step generator with float16 weights (PyTorch): sample(s) [0] of 1 came out non-finite" in err
    assert not (tmp_path / "out").exists()


def test_image_to_image_matches_diffusers_img2img_pipeline(exported):
    """`sample --init-latents --strength` against SanaSprintImg2ImgPipeline itself (its get_timesteps, its
    noising of the VAE-encoded image, its SCMScheduler steps), the noise drawn from the pipeline's generator."""
    import torch
    from diffusers import SanaSprintImg2ImgPipeline, SanaSprintPipeline

    from sprintjax.convert import load_model
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents, sampler_times

    _, root = exported
    pipe = SanaSprintImg2ImgPipeline(**SanaSprintPipeline.from_pretrained(root / "pipe").components)
    params, cfg = load_model(root / "pipe")
    rng = np.random.default_rng(1)
    caption = rng.standard_normal((2, 8, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((2, 8), np.float32)
    mask[1, 6:] = 0
    image = torch.from_numpy(rng.uniform(0, 1, (2, 3, 2 * H, 2 * W)).astype(np.float32))
    with torch.no_grad():  # the image latents in the VAE's scale, as `sample --init-latents` takes them
        init = (pipe.vae.encode(2 * image - 1).latent * pipe.vae.config.scaling_factor).numpy()
    for steps, strength, calls in ((1, 0.6, 1), (2, 0.3, 1), (2, 0.6, 2), (4, 0.6, 3), (4, 1.0, 4)):
        times = sampler_times(steps, strength)
        assert times.shape[0] - 1 == calls
        gen = torch.Generator().manual_seed(steps)
        with torch.no_grad():
            theirs = pipe(image=image, strength=strength, prompt_embeds=torch.from_numpy(caption),
                          prompt_attention_mask=torch.from_numpy(mask), num_inference_steps=steps,
                          intermediate_timesteps=1.3 if steps == 2 else None, height=2 * H, width=2 * W,
                          use_resolution_binning=False, generator=gen, output_type="latent").images.numpy()
        gen = torch.Generator().manual_seed(steps)  # the pipeline's draws: the start, then one per step
        noise = np.stack([torch.randn((2, cfg.in_channels, H, W), generator=gen).numpy() for _ in range(calls)])
        ours = np.asarray(sample_latents(SanaTransformer(cfg), params, caption, mask, noise, times, init=init))
        assert rel_err(ours, theirs) < 1e-4, (steps, strength, rel_err(ours, theirs))
