"""The shipped shapes autoencoder (`--vae builtin-ae`): unit-scale latents, reconstructions the detector still
reads (held-out colour/shape combinations included), and strict loading."""

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from sprintjax.bench import autoencoder, detector, shapes


@pytest.fixture(scope="module")
def codec():
    return shapes.latent_codec("builtin-ae")


def test_latents_are_8x8x8_of_about_unit_scale_on_unseen_scenes(codec):
    encode, _, channels = codec
    images, _ = shapes.sample_images("validation", 256, start=500)
    z = encode(images)
    assert z.shape == (256, channels, 8, 8) == (256, 8, 8, 8) and z.dtype == np.float32
    assert 0.8 < float(z.std()) < 1.25  # the scaling factor was set on training scenes


def test_reconstructions_keep_what_the_detector_reads(codec):
    encode, decode, _ = codec
    images, scenes = shapes.sample_images("validation", 200)
    held_out = [i for i, sc in enumerate(scenes) if any((o.color, o.shape) in shapes.HELD_OUT for o in sc.objects)]
    assert len(held_out) >= 10
    rec = decode(encode(images))
    assert rec.shape == images.shape and rec.dtype == np.uint8
    psnr = 10 * np.log10(255.0**2 / np.mean(np.square(rec.astype(np.float64) - images)))
    assert psnr > 28.0, psnr
    assert detector.compositional_score(rec, scenes)["compositional"] >= 0.95
    assert detector.compositional_score(rec[held_out], [scenes[i] for i in held_out])["compositional"] >= 0.9


def test_loading_is_strict_and_latent_spaces_are_named(tmp_path):
    flat = safetensors.numpy.load_file(str(autoencoder.WEIGHTS))
    flat.pop(sorted(flat)[0])
    safetensors.numpy.save_file(flat, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks autoencoder tensors"):
        autoencoder.load(tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="builtin-s2d, builtin-ae"):
        shapes.latent_codec("builtin-vq")
    with pytest.raises(ValueError, match="48: builtin-s2d, 8: builtin-ae"):
        shapes.codec_of_latents(16)


def test_the_benchmark_configs_match_the_latent_space(codec):
    from sprintjax.bench import demo
    from sprintjax.configlib import load_config, resolve
    from sprintjax.convert import load_model

    for variant in ("", ":teacher"):
        rc = resolve(load_config(str(Path(__file__).parents[1] / "configs" / "shapes.py") + variant))
        assert rc.model.in_channels == rc.model.out_channels == codec[2], variant
        assert rc.data.dir.endswith("shapes_ae_data"), variant
    assert rc.train.stage == "teacher"
    # The shipped teacher the default config distils reads and writes these latents too.
    default = resolve(load_config(str(demo.REPO / "configs" / "shapes.py")))
    _, teacher_cfg = load_model(default.train.teacher_checkpoint)
    assert teacher_cfg.in_channels == teacher_cfg.out_channels == codec[2]
