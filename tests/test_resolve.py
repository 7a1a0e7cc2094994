"""One way to name a model (convert.source): a training run, a params checkpoint and a diffusers folder of the
same weights read the same everywhere, and a folder that is none of them gets one error from every command."""

import numpy as np
import pytest

from sprintjax.cli import main
from sprintjax.convert import load_model, model_config_of
from sprintjax.errors import CheckpointError


def test_a_run_a_params_checkpoint_and_a_diffusers_folder_sample_alike(reference, tmp_path, capsys):
    run = reference[0]
    assert main(["export-diffusers", str(run), str(tmp_path / "diffusers"), "--transformer-only"]) == 0
    assert main(["import-diffusers", str(tmp_path / "diffusers"), str(tmp_path / "ckpt")]) == 0
    params, cfg = load_model(run)
    caption = np.random.default_rng(0).standard_normal((2, 5, cfg.caption_channels)).astype(np.float32)
    np.save(tmp_path / "caption.npy", caption)
    outs = []
    for i, path in enumerate((run, tmp_path / "ckpt", tmp_path / "diffusers")):
        assert model_config_of(path).replace(**cfg.compute_settings()) == cfg
        got, _ = load_model(path)
        np.testing.assert_array_equal(got["proj_out"]["kernel"], params["proj_out"]["kernel"])
        assert main(["sample", str(path), "--caption-embeds", str(tmp_path / "caption.npy"), "--steps", "2",
                     "--out", str(tmp_path / f"out{i}.npy")]) == 0
        outs.append(np.load(tmp_path / f"out{i}.npy"))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    assert "parameters:" in capsys.readouterr().out
    # --step picks a checkpoint of the run; one it does not have is named
    assert main(["sample", str(run), "--step", "8", "--caption-embeds", str(tmp_path / "caption.npy"), "--out",
                 str(tmp_path / "early.npy")]) == 0
    assert not np.array_equal(np.load(tmp_path / "early.npy"), outs[0])
    assert main(["sample", str(run), "--step", "5", "--caption-embeds", str(tmp_path / "caption.npy"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert "no checkpoint at step 5" in capsys.readouterr().err
    # --part teacher reads a run's frozen teacher: this one started from random weights
    with pytest.raises(CheckpointError, match="randomly initialised teacher"):
        load_model(run, part="teacher")


@pytest.mark.parametrize("layout", ["empty", "notes", "controlnet"])
def test_a_folder_that_is_no_model_gets_one_error_from_every_command(tmp_path, capsys, layout):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    if layout == "notes":
        (bogus / "notes.txt").write_text("hello")
    if layout == "controlnet":
        (bogus / "controlnet_config.json").write_text("{}")
    np.save(tmp_path / "caption.npy", np.zeros((1, 5, 12), np.float32))
    (tmp_path / "plan.json").write_text('{"blocks": [0], "cross_heads": [[0]], "ffn_channels": [[0]]}')
    out = str(tmp_path / "out")
    for argv in (["sample", str(bogus), "--caption-embeds", str(tmp_path / "caption.npy"), "--out", out + ".npy"],
                 ["info", str(bogus)], ["export-diffusers", str(bogus), out], ["export-mobile", str(bogus), out],
                 ["compress", str(bogus), out, "--plan", str(tmp_path / "plan.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{bogus} is not a model: looked for a training run" in err, (argv, err)
        assert {"empty": "found nothing", "notes": "found notes.txt",
                "controlnet": "a ControlNet checkpoint"}[layout] in err
        assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        model_config_of(tmp_path / "missing")
