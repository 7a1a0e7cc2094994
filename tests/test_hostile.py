"""Hostile and careless input, one test per case of the robustness issue: a second writer on a workdir, NaN
inputs and outputs, undecodable images, a diverging run, unparsable overrides, a missing teacher, refused runs.
Each expects one clear error and nothing lost or left behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SPRINTJAX, run

from sprintjax.cli import main
from sprintjax.workdir import LOCK_NAME, WorkdirBusy, WorkdirLock


def _hold_lock(workdir: Path) -> subprocess.Popen:
    """A separate process that takes the workdir lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from sprintjax.workdir import WorkdirLock
        WorkdirLock({str(workdir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    wd = tmp_path / "run"
    wd.mkdir()
    holder = _hold_lock(wd)
    try:
        out = subprocess.run([SPRINTJAX, "train", "--config", "configs/tiny.py", "--workdir", str(wd)], cwd=ROOT,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"is in use by another run: pid {holder.pid} on host {socket.gethostname()}" in out.stderr
        assert sorted(p.name for p in wd.iterdir()) == [LOCK_NAME]  # nothing written by the refused run
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            WorkdirLock(wd).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the record stays, the flock goes with the process
        holder.wait()
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="sprintjax"):
        lock = WorkdirLock(wd).acquire()
    assert f"took over the lock of pid {holder.pid}" in caplog.text
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (wd / LOCK_NAME).exists()


def test_a_lock_recorded_by_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "tpu-vm-7", "pid": 41, "started": time.time()}))
    with pytest.raises(WorkdirBusy, match=f"pid 41 on host tpu-vm-7 .*cannot tell whether that run is still alive. "
                                          f"If it is not, delete {tmp_path / LOCK_NAME}"):
        WorkdirLock(tmp_path).acquire()


@pytest.fixture(scope="module")
def student(diffusers_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "ckpt"
    assert main(["import-diffusers", str(diffusers_models["sprint_p2"][3]), str(out)]) == 0
    return out


def test_sample_refuses_a_nan_input_naming_the_sample(student, tmp_path, capsys):
    caption = np.random.default_rng(0).standard_normal((3, 5, 12)).astype(np.float32)
    caption[1, 2, 7] = np.nan
    np.save(tmp_path / "e.npy", caption)
    assert main(["sample", str(student), "--caption-embeds", str(tmp_path / "e.npy"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "caption embeddings holds 1 non-finite value(s) (NaN/Inf), in sample(s) [1]" in err
    assert "the first at index [1, 2, 7]" in err
    assert not (tmp_path / "x.npy").exists()


def test_sample_refuses_non_finite_output_from_finite_inputs(student, tmp_path, capsys):
    from sprintjax.convert import load_params, save_params

    params, cfg = load_params(student)
    params["proj_out"]["kernel"] = params["proj_out"]["kernel"] * np.float32(3e38)  # finite, overflows the output
    save_params(tmp_path / "huge", params, cfg)
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32))
    assert main(["sample", str(tmp_path / "huge"), "--caption-embeds", str(tmp_path / "e.npy"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "sample(s) [0, 1] of 2 came out non-finite (NaN/Inf); nothing was written" in err
    assert "The inputs were finite" in err
    assert not (tmp_path / "x.npy").exists()


def test_prepare_data_checks_every_image_before_any_encoder_loads(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from sprintjax.data import prepare

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "good.png")
    (folder / "fake.png").write_text("this is not an image")
    for name in ("good", "fake"):
        (folder / f"{name}.txt").write_text("a red circle")

    def no_model(*a, **k):
        raise AssertionError("an encoder loaded before the inputs were checked")

    monkeypatch.setattr(prepare.TextEncoder, "__init__", no_model)
    monkeypatch.setattr(prepare.BuiltinEncoder, "__init__", no_model)
    out = tmp_path / "out"
    assert main(["prepare-data", "--images", str(folder), "--vae", "builtin-ae", "--text-encoder", "minilm",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) cannot be decoded: " + str(folder / "fake.png") in err
    assert not out.exists()


def test_a_diverging_run_stops_at_exactly_max_nonfinite_and_names_the_checkpoint_before(tmp_path):
    """lr 1e30: the first update is finite and huge, every later loss overflows. With max_nonfinite 5 the run
    stops at iteration 6 (non-finite 2-6) although metrics are fetched only every 4 steps; iteration 1's
    checkpoint is the last one before the streak, and nothing is saved inside it."""
    wd = tmp_path / "diverge"
    out = run(wd, "--config.train.lr=1e30", "--config.train.warmup_steps=0", "--config.train.max_nonfinite=5",
              "--config.train.ckpt_every=1", "--config.train.num_steps=40", config="configs/tiny.py:teacher",
              check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("5 consecutive non-finite steps (iterations 2-6, their updates skipped); stopped. the last checkpoint, "
            f"saved before them, is {wd / 'checkpoints' / '1'}") in out.stderr
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(rows[0]["flow_loss"]) and not any(np.isfinite(r["flow_loss"]) for r in rows[1:])
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [1]


@pytest.mark.parametrize("override,message", [
    ("--config.train.num_steps=abc", "--config.train.num_steps='abc': expected int"),
    ("--config.distill.lr_g=fast", "--config.distill.lr_g='fast': expected number"),
    ("--config.train.num_steps=1.5", "--config.train.num_steps='1.5': expected int, got a float"),
    ("--config.distill.use_scm=maybe", "--config.distill.use_scm='maybe': expected bool (true/false)"),
    ("--config.distill.disc_layers=3", "--config.distill.disc_layers='3': expected tuple (e.g. (1, 2)), got a int"),
])
def test_override_errors_name_the_key_the_value_and_the_type(override, message):
    from sprintjax.configlib import load_config, parse_overrides
    from sprintjax.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_overrides(load_config(str(ROOT / "configs/tiny.py")), [override])
    assert str(err.value) == message


def test_a_config_file_value_of_the_wrong_type_names_the_key(tmp_path):
    from sprintjax.configlib import load_config, resolve
    from sprintjax.errors import ConfigError

    (tmp_path / "c.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'configs')!r})
        from tiny import TINY
        from sprintjax.configlib import run_config
        def get_config(arg=None):
            return run_config(TINY, train=dict(log_every="10"), data=dict(synthetic=8))
    """))
    with pytest.raises(ConfigError, match=r"config.train.log_every = '10': expected int, got a str"):
        resolve(load_config(str(tmp_path / "c.py")))


@pytest.mark.parametrize("args,message", [
    (["--config.train.bogus=1"], "unknown config key: train.bogus"),
    (["--config.train.teacher_checkpoint=/does/not/exist"],
     "train.teacher_checkpoint /does/not/exist does not exist; give a training run (checkpoints/ + config.json), a "
     "sprintjax params checkpoint (model_config.json + params/) or a diffusers transformer or pipeline folder"),
    (["--config.mesh.data=3"], "has 3 devices but 1 are available"),
    (["--config.data.dir=/nonexistent/records", "--config.data.synthetic=0"], "no training records under"),
])
def test_a_refused_run_leaves_no_trace(tmp_path, capsys, args, message):
    wd = tmp_path / "new" / "run"
    assert main(["train", "--config", str(ROOT / "configs/tiny.py"), "--workdir", str(wd), *args]) == 2
    assert message in capsys.readouterr().err
    assert not wd.exists()  # no workdir, no config.json, no synthetic dataset


def test_a_batch_that_does_not_divide_over_the_devices_leaves_no_trace(tmp_path):
    wd = tmp_path / "new" / "run"
    out = run(wd, "--config.data.global_batch=3", devices=2, check=False, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "global batch 3 does not divide over the 2 data-parallel devices" in out.stderr
    assert not wd.exists()


def test_exports_check_their_outputs_and_component_folders_before_reading_any_weights(tmp_path, capsys,
                                                                                      monkeypatch):
    from sprintjax.convert import pipeline

    def no_read(*a, **k):
        raise AssertionError("weights were read before the cheap checks")

    monkeypatch.setattr(pipeline, "read_source", no_read)
    (tmp_path / "exists").mkdir()
    (tmp_path / "not_a_vae").mkdir()
    for argv, message in [
        (["export-diffusers", "SRC", str(tmp_path / "exists")], "already exists; pass --force"),
        (["export-mobile", "SRC", str(tmp_path / "exists")], "already exists; pass --force"),
        (["export-diffusers", "SRC", str(tmp_path / "new"), "--vae", str(tmp_path / "not_a_vae")],
         "is not a saved vae folder (no config.json)"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
