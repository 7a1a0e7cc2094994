"""The whole on-device pipeline (issue 22): one ExecuTorch program with encode_text / generate / decode, the
tokenizer files and ONNX models, against sprintjax's own pipeline recomputed here from its parts."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny

from sprintjax.cli import main

PROMPTS = ["a red circle to the left of a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A random student shaped for MiniLM captions (384) and the shapes autoencoder's latents (8 channels)."""
    from sprintjax.convert import save_params
    from sprintjax.model import SanaTransformer

    cfg = tiny(in_channels=8, out_channels=8, caption_channels=384, guidance_embeds=True,
               qk_norm="rms_norm_across_heads")
    params = SanaTransformer(cfg).init(jax.random.key(3))
    path = tmp_path_factory.mktemp("mobile") / "student"
    save_params(path, params, cfg)
    return path, params, cfg


def test_pipeline_program_runs_token_ids_to_image_like_sprintjax(student, tmp_path, capsys):
    """An instruction makes the encoder's token selection non-trivial (first token + last L-1 of T)."""
    import torch
    from executorch.runtime import Runtime
    from transformers import AutoTokenizer

    from sprintjax import trigflow
    from sprintjax.bench import autoencoder
    from sprintjax.data.prepare import TextEncoder, resolve_text_encoder
    from sprintjax.model import SanaTransformer
    from sprintjax.sampling import sample_latents

    path, params, cfg = student
    (tmp_path / "instruction.txt").write_text("Describe the scene: ")
    out = tmp_path / "out"
    argv = ["export-mobile", str(path), str(out), "--text-encoder", "minilm", "--vae", "builtin-ae",
            "--caption-len", "6", "--instruction-file", str(tmp_path / "instruction.txt"), "--batch", "2",
            "--weights", "float32", *sum((["--prompt", p] for p in PROMPTS), [])]
    assert main(argv) == 0
    assert "sana_sprint_pipeline_1step_float32.pte" in capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert report["tokens"] > 6  # the instruction's tokens come before the caption's
    pte, onnx = (report["programs"][f"sana_sprint_pipeline_1step_float32.{f}"] for f in ("pte", "onnx"))
    assert onnx["rel_err"]["end_to_end"] < 1e-5 and pte["rel_err"]["end_to_end"] < 1e-5
    assert pte["rel_err"]["caption_mask_equal"] and onnx["rel_err"]["caption_mask_equal"]
    assert onnx["rel_err_vs_torch"]["end_to_end"] < 1e-5 and pte["rel_err_vs_torch"]["end_to_end"] < 1e-5

    # independently of the report: the shipped tokenizer and the program, chained here, against sprintjax
    texts = ["Describe the scene: " + p for p in PROMPTS]
    tok = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)(
        texts, padding="max_length", max_length=report["tokens"], truncation=True, return_tensors="pt")
    program = Runtime.get().load_program(str(out / "sana_sprint_pipeline_1step_float32.pte"))
    assert set(program.method_names) == {"encode_text", "generate", "decode"}
    caption, cmask = program.load_method("encode_text").execute([tok["input_ids"], tok["attention_mask"]])
    noise = np.random.default_rng(1).standard_normal((1, 2, 8, 8, 8)).astype(np.float32)
    latents = program.load_method("generate").execute([torch.from_numpy(noise), caption, cmask])[0]
    image = program.load_method("decode").execute([latents])[0].numpy()

    want_caption, want_mask = TextEncoder(resolve_text_encoder("minilm"), 6, "Describe the scene: ")(PROMPTS)
    assert want_caption.shape == (2, 6, 384) and np.array_equal(cmask.numpy(), want_mask)
    np.testing.assert_allclose(caption.numpy(), want_caption, atol=1e-4 * np.abs(want_caption).max())
    want_latents = sample_latents(SanaTransformer(cfg), params, want_caption, want_mask.astype(np.float32), noise,
                                  trigflow.schedule(1), 4.5)
    want_image = autoencoder.decode_unit(autoencoder.load(), np.asarray(want_latents))
    assert image.shape == (2, 32, 32, 3) and want_image.std() > 0.05
    assert np.max(np.abs(image - want_image)) < 1e-5


def test_pipeline_refusals_write_nothing(student, tmp_path, capsys):
    path, _, _ = student
    out = tmp_path / "out"
    base = ["export-mobile", str(path), str(out), "--caption-len", "6", "--weights", "float32"]
    cases = [
        (["--vae", "builtin-ae"], "needs both --text-encoder and --vae"),
        (["--text-encoder", "minilm", "--vae", "builtin-s2d"], "neither builtin-ae nor a diffusers AutoencoderDC"),
        (["--text-encoder", "minilm", "--vae", "builtin-ae", "--max-bytes", "1000000"], "over the limit --max-bytes"),
        (["--prompt", "x"], "apply to the whole pipeline"),
        (["--max-bytes", "100000", "--formats", "onnx"], "the 1-step generator with float32 weights would hold"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists()


def test_pipeline_refuses_an_encoder_the_model_was_not_trained_with(tmp_path, capsys):
    from sprintjax.convert import save_params
    from sprintjax.model import SanaTransformer

    cfg = tiny(in_channels=8, out_channels=8)  # caption_channels 12, not MiniLM's 384
    save_params(tmp_path / "ckpt", SanaTransformer(cfg).init(jax.random.key(0)), cfg)
    argv = ["export-mobile", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--text-encoder", "minilm", "--vae",
            "builtin-ae"]
    assert main(argv) == 2
    assert "384-wide embeddings" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_dc_ae_decode_method_matches_diffusers_own_decoding(tmp_path):
    """The decode method for a DC-AE folder: latents at the VAE's scale -> what SanaSprintPipeline returns as
    numpy (latents / scaling_factor, AutoencoderDC.decode, VaeImageProcessor's postprocessing)."""
    import torch
    from diffusers import AutoencoderDC
    from diffusers.image_processor import VaeImageProcessor

    from sprintjax.convert import torch_ref
    from sprintjax.convert.mobile_pipeline import decoder

    torch_ref.tiny_encoders(tmp_path, latent_channels=4, hidden=16)
    module, channels, factor, reference = decoder(str(tmp_path / "vae"))
    assert (channels, factor) == (4, 2)
    z = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vae = AutoencoderDC.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor, return_dict=False)[0]
        got = module(torch.from_numpy(z)).numpy()
    want = VaeImageProcessor(vae_scale_factor=factor).postprocess(decoded, output_type="np")
    assert got.shape == want.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(reference(z), want, atol=1e-6)


def test_xnnpack_partitioner_keeps_tanh_gelu_exact(tmp_path):
    """executorch 1.4.0 lowers every GELU to XNNPACK's exact (erf) GELU, dropping approximate="tanh" (up to ~5e-4
    apart); the exporter's partitioner keeps tanh GELUs off XNNPACK and exact GELUs on it."""
    import torch
    from executorch.exir import to_edge_transform_and_lower

    from sprintjax.convert.mobile import pte_runner, xnnpack_partitioner

    class Both(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate="tanh"), torch.nn.functional.gelu(x)

    x = np.linspace(-4, 4, 4096, dtype=np.float32).reshape(64, 64)
    with torch.no_grad():
        program = torch.export.export(Both(), (torch.from_numpy(x),))
        tanh, erf = (t.numpy() for t in Both()(torch.from_numpy(x)))
    assert np.max(np.abs(tanh - erf)) > 1e-4  # the two forms differ enough to tell apart
    lowered = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
    delegated = [n for n in lowered.exported_program().graph.nodes if "gelu" in str(n.target)]
    assert len(delegated) == 1  # the tanh GELU stays a portable op; the exact one went to XNNPACK
    (tmp_path / "g.pte").write_bytes(lowered.to_executorch().buffer)
    got_tanh, got_erf = pte_runner(tmp_path / "g.pte", first=False)([x])
    np.testing.assert_allclose(got_tanh, tanh, atol=1e-6)
    np.testing.assert_allclose(got_erf, erf, atol=1e-6)
