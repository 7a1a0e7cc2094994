"""The trainer end to end, as users run it: one CPU, 8 fake devices, 2 processes over loopback, kill -9 and
resume, preemption, a different mesh on resume, and bad input. Each run is a real `sprintjax train`."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import COMMON, ROOT, SPRINTJAX, STEPS, run, xla_env


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_close(a, b, rtol=1e-4, steps=None):
    a, b = a[:steps], b[:steps]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert abs(x[k] - y[k]) <= rtol * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def final_state(workdir):
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    tree = ckpt.restore(Path(workdir).absolute() / "checkpoints" / str(STEPS) / "state")
    ckpt.close()
    return tree


def test_reference_run_writes_everything_a_user_expects(reference):
    wd, out = reference
    rows = metrics(wd)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["phase"] for r in rows] == [0, 1] * (STEPS // 2)  # G and D alternate
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert {"g_loss", "scm_loss", "adv_loss", "tangent_norm_raw", "g_grad_norm"} <= rows[0].keys()
    assert {"d_loss", "d_acc_real", "d_acc_fake"} <= rows[1].keys()
    assert not {"d_loss", "ran", "halted", "nonfinite_run"} & rows[0].keys()  # a phase's own metrics, no bookkeeping
    assert json.loads((wd / "config.json").read_text())["model"]["num_layers"] == 3
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [8, 12, 16]  # keep the last 3
    assert "steps/s, ETA" in out.stderr and "training done" in out.stdout
    diag = [json.loads(line) for line in (wd / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag] == [8, 16]
    assert {"diag/g_norm/bin3", "diag/time_norm/max", "diag/grad_norm/bin0", "diag/bf16_rel_err/max"} <= diag[0].keys()
    assert all(np.isfinite(v) for d in diag for v in d.values())


def test_eight_fake_devices_with_fsdp_match_one_device_and_runs_resume_across_meshes(reference, tmp_path):
    run(tmp_path / "fsdp", config="configs/tiny.py:fsdp", devices=8)  # mesh data 4 x fsdp 2
    assert_close(metrics(tmp_path / "fsdp"), metrics(reference[0]))
    # The one-device run resumed on the 8-device FSDP mesh (its programs just compiled: from the cache).
    wd = tmp_path / "remesh"
    shutil.copytree(reference[0], wd)
    out = run(wd, f"--config.train.num_steps={STEPS + 2}", config="configs/tiny.py:fsdp", devices=8)
    assert f"resumed from the checkpoint at iteration {STEPS}" in out.stderr
    assert [r["step"] for r in metrics(wd)] == list(range(1, STEPS + 3))


def test_two_processes_over_loopback_match_one_device(reference, tmp_path):
    ref = metrics(reference[0])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "launch/local.py", "--num-processes", "2", "--", "train", "--config", "configs/tiny.py",
           "--workdir", str(tmp_path / "two"), *COMMON]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    assert_close(metrics(tmp_path / "two"), ref)


def test_kill_and_resume_is_bitwise_identical(reference, tmp_path):
    wd = tmp_path / "killed"
    env = xla_env(1)
    cmd = [SPRINTJAX, "train", "--config", "configs/tiny.py", "--workdir", str(wd), *COMMON]
    kill_after = random.Random().choice([4, 8])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (wd / "checkpoints" / str(kill_after) / "sprintjax_checksums.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(wd)  # the same command again: resumes from the latest complete checkpoint
    assert metrics(wd) == metrics(reference[0])  # bitwise: every logged float
    a, b = final_state(wd), final_state(reference[0])
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


def test_preemption_signal_saves_and_exits_then_resumes(reference, tmp_path):  # after it: compiled programs cached
    wd = tmp_path / "preempt"
    env = xla_env(1)
    cmd = [SPRINTJAX, "train", "--config", "configs/tiny.py", "--workdir", str(wd), *COMMON,
           "--config.train.num_steps=100000", "--config.train.ckpt_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (wd / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "training preempted" in out and "preemption signal" in err
    saved = [int(p.name) for p in (wd / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0] >= 4
    out = run(wd, f"--config.train.num_steps={saved[0] + 2}")
    assert f"resumed from the checkpoint at iteration {saved[0]}" in out.stderr


def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(reference, tmp_path):
    wd = tmp_path / "corrupt"
    shutil.copytree(reference[0], wd)
    # A half-written save (what a crash mid-save leaves: orbax's temporary folder) is never picked up ...
    half = wd / "checkpoints" / f"{STEPS + 4}.orbax-checkpoint-tmp-1234"
    shutil.copytree(wd / "checkpoints" / str(STEPS), half)
    (half / "commit_success.txt").unlink()
    # ... and a sealed checkpoint with a flipped byte is refused.
    victim = sorted((wd / "checkpoints" / str(STEPS) / "state").rglob("d/*"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(data)
    out = run(wd, f"--config.train.num_steps={STEPS}")
    assert f"checkpoint at step {STEPS} is corrupt" in out.stderr and "does not match its checksum" in out.stderr
    assert f"resumed from the checkpoint at iteration {STEPS - 4}" in out.stderr
    assert (wd / "checkpoints_corrupt" / str(STEPS)).is_dir()  # kept aside, nothing deleted
    assert metrics(wd) == metrics(reference[0])  # recomputed the same steps exactly


def test_train_teacher_exports_params_and_diffusers(tmp_path):
    from diffusers import SanaTransformer2DModel

    from sprintjax.checkpoints import trained_params
    from sprintjax.convert import load_params
    from sprintjax.errors import CheckpointError

    wd = tmp_path / "teacher"
    env = xla_env(1)
    out = subprocess.run([SPRINTJAX, "train-teacher", "--config", "configs/tiny.py:teacher", "--workdir", str(wd),
                          "--config.train.num_steps=6", "--config.train.ckpt_every=3", "--config.train.ema_decay=0.5"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exported the teacher at step 6" in out.stdout
    params, cfg = load_params(wd / "teacher")
    assert cfg.num_layers == 3 and not cfg.guidance_embeds
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore((wd / "checkpoints" / "6" / "state").absolute())
    assert np.array_equal(params["proj_out"]["kernel"], state["ema"]["proj_out"]["kernel"])  # EMA is exported
    assert not np.array_equal(state["ema"]["proj_out"]["kernel"], state["params"]["proj_out"]["kernel"])
    SanaTransformer2DModel.from_pretrained(wd / "teacher_diffusers")
    with pytest.raises(CheckpointError, match="not a distillation run"):
        trained_params(wd, "student")
    with pytest.raises(CheckpointError, match="no checkpoint at step 4"):
        trained_params(wd, "params", step=4)
