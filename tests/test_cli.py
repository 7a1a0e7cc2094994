"""The `sprintjax` command line: sampling reproduces diffusers' loop from files; bad files are clear errors."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_err

from sprintjax.cli import main
from sprintjax.convert import torch_ref


@pytest.fixture(scope="module")
def ckpt(diffusers_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    assert main(["import-diffusers", str(diffusers_models["sprint_p2"][3]), str(out)]) == 0
    return out


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    caption = rng.standard_normal((2, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    paths = {"caption": tmp_path / "e.npy", "mask": tmp_path / "m.npy"}
    np.save(paths["caption"], caption)
    np.save(paths["mask"], mask)
    return paths, caption, mask


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_with_noise_file_matches_diffusers_loop(diffusers_models, ckpt, files, tmp_path, steps):
    paths, caption, mask = files
    noise = np.random.default_rng(steps).standard_normal((steps, 2, 4, 8, 12)).astype(np.float32)
    np.save(tmp_path / "n.npy", noise)
    argv = ["sample", str(ckpt), "--caption-embeds", str(paths["caption"]), "--caption-mask", str(paths["mask"]),
            "--guidance", "4.0", "--steps", str(steps), "--noise", str(tmp_path / "n.npy"),
            "--out", str(tmp_path / "x.npy")]
    assert main(argv) == 0
    ours = np.load(tmp_path / "x.npy")
    ref = torch_ref.diffusers_sample(diffusers_models["sprint_p2"][2], caption, mask, noise, steps, guidance_scale=4.0)
    assert ours.shape == (2, 4, 8, 12)
    assert rel_err(ours, ref) < 1e-5


def test_sample_with_seed_is_reproducible(ckpt, files, tmp_path):
    paths, _, _ = files
    base = ["sample", str(ckpt), "--caption-embeds", str(paths["caption"]), "--steps", "2", "--seed", "3",
            "--height", "4", "--width", "6"]
    assert main(base + ["--out", str(tmp_path / "a.npy")]) == 0
    assert main(base + ["--out", str(tmp_path / "b.npy")]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (2, 4, 4, 6) and np.array_equal(a, b) and np.all(np.isfinite(a))


@pytest.mark.parametrize("bad,message", [
    ({"noise": (3, 2, 4, 8, 8)}, "noise must be [2, 2, 4, H, W]"),
    ({"noise": (2, 2, 5, 8, 8)}, "noise must be [2, 2, 4, H, W]"),
    ({"noise": (2, 2, 4, 7, 8)}, "divisible by patch_size 2"),
    ({"caption": (2, 5, 11)}, "caption embeddings must be [B, L, 12]"),
    ({"mask": (2, 4)}, "caption mask must be (2, 5)"),
])
def test_sample_shape_errors_name_the_mismatch(ckpt, tmp_path, capsys, bad, message):
    shapes = {"noise": (2, 2, 4, 8, 8), "caption": (2, 5, 12), "mask": (2, 5)} | bad
    for name, shape in shapes.items():
        np.save(tmp_path / f"{name}.npy", np.ones(shape, np.float32))
    argv = ["sample", str(ckpt), "--caption-embeds", str(tmp_path / "caption.npy"), "--caption-mask",
            str(tmp_path / "mask.npy"), "--noise", str(tmp_path / "noise.npy"), "--steps", "2",
            "--out", str(tmp_path / "x.npy")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_pickled_npy_and_teacher_guidance_are_refused(ckpt, diffusers_models, tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    argv = ["sample", str(ckpt), "--caption-embeds", str(tmp_path / "obj.npy"), "--out", str(tmp_path / "x.npy")]
    assert main(argv) == 2
    assert "not a plain numeric .npy" in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    assert main(["import-diffusers", str(diffusers_models["plain_p1"][3]), str(teacher)]) == 0
    np.save(tmp_path / "e.npy", np.ones((1, 3, 12), np.float32))
    argv = ["sample", str(teacher), "--caption-embeds", str(tmp_path / "e.npy"), "--guidance", "4.5",
            "--out", str(tmp_path / "x.npy")]
    assert main(argv) == 2
    assert "no guidance embedder" in capsys.readouterr().err


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "sprintjax.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("import-diffusers", "export-diffusers", "sample", "info", "demo", "check-parity", "train",
                "train-teacher", "prepare-data", "eval", "compile", "export-mobile", "compress", "distill-text"):
        assert cmd in out


def test_info_prints_the_exact_parameter_count(capsys):
    assert main(["info", "sana_sprint_600m"]) == 0
    assert "parameters: 593,501,216 (593.50M)" in capsys.readouterr().out


def test_info_reads_config_files_and_checkpoints(ckpt, capsys):
    assert main(["info", "configs/models.py:sana_sprint_1600m,dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,610,237,472 (1610.24M)" in out and '"dtype": "bfloat16"' in out
    assert main(["info", str(ckpt)]) == 0
    assert '"guidance_embeds": true' in capsys.readouterr().out
    assert main(["info", "configs/models.py:sana_sprint_600m,bogus=1"]) == 2
    assert main(["info", "no_such_preset"]) == 2
