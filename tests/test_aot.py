"""`sprintjax compile`: the training steps compile ahead of time for TPU topologies (libtpu, no TPU here) and
for fake CPU devices, and the report gives per-device memory and cost figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPRINTJAX = str(Path(sys.executable).parent / "sprintjax")


def compile_cli(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([SPRINTJAX, "compile", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_report(out, path, names):
    assert out.returncode == 0, out.stderr[-3000:]
    assert "figures per device" in out.stdout
    report = json.loads(Path(path).read_text())
    assert sorted(report) == sorted(names)
    for r in report.values():
        assert r["temp_bytes"] > 0 and r["argument_bytes"] > 0 and r["flops"] > 0
    return report


def test_tiny_distillation_compiles_for_a_v5p_topology(tmp_path):
    out = compile_cli("--config", "configs/tiny.py", "--topology", "v5p:2x2x1", "--config.mesh.fsdp=2",
                      "--json", str(tmp_path / "r.json"))
    report = check_report(out, tmp_path / "r.json", ["generator", "discriminator"])
    assert report["generator"]["mesh"] == {"data": 2, "fsdp": 2}
    assert report["generator"]["optimal_seconds"] > 0  # a TPU cost model figure
    assert "arguments" in out.stdout and "temporaries" in out.stdout


def test_teacher_stage_compiles_for_fake_cpu_devices(tmp_path):
    out = compile_cli("--config", "configs/tiny.py:teacher", "--topology", "cpu:4", "--json", str(tmp_path / "r.json"))
    check_report(out, tmp_path / "r.json", ["train"])


def test_unknown_topology_and_indivisible_batch_are_clear_errors():
    out = compile_cli("--config", "configs/tiny.py", "--topology", "v5p:banana")
    assert out.returncode == 2 and "cannot build TPU topology 'v5p:banana'" in out.stderr
    out = compile_cli("--config", "configs/tiny.py", "--topology", "cpu:3")
    assert out.returncode == 2 and "global batch 8 does not divide over the 3" in out.stderr


@pytest.mark.slow
def test_sana_sprint_600m_compiles_for_v5p_64_chips_and_fits(tmp_path):
    out = compile_cli("--config", "configs/sana_sprint_600m_1024.py", "--topology", "v5p:4x4x4",
                      "--json", str(tmp_path / "r.json"), timeout=1800)
    report = check_report(out, tmp_path / "r.json", ["generator", "discriminator"])
    for r in report.values():
        assert r["devices"] == 64 and r["peak_bytes_estimate"] < 95 * 2**30  # v5p HBM
