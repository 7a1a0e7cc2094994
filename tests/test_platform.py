"""The default JAX platform (sprintjax/platform.py): the CPU, without libtpu's start-up errors, only where the
machine shows no accelerator and the user named no platform."""

import os
import subprocess
import sys

import pytest

from sprintjax.platform import default_platform, has_accelerator


def fake_machine(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,accelerator", [
    ({}, False),
    ({"dev/null": "", "dev/vfio/vfio": "", "sys/bus/pci/devices/0000:00:01.0/vendor": "0x8086\n"}, False),
    ({"dev/accel0": ""}, True),  # TPU v2-v5e device nodes
    ({"dev/vfio/vfio": "", "dev/vfio/12": ""}, True),  # TPU v5p / v6e through VFIO
    ({"sys/bus/pci/devices/0000:00:04.0/vendor": "0x1ae0\n"}, True),  # a Google TPU on the PCI bus
    ({"dev/nvidia0": ""}, True),
    ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x10de\n"}, True),
])
def test_accelerators_are_seen_by_their_device_nodes_or_pci_vendor(tmp_path, files, accelerator):
    assert has_accelerator(fake_machine(tmp_path, files)) is accelerator


def test_a_platform_the_user_names_or_a_tpu_variable_is_left_alone(tmp_path):
    assert default_platform({"JAX_PLATFORMS": ""}, tmp_path) is None
    assert default_platform({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, tmp_path) is None
    assert default_platform({}, fake_machine(tmp_path, {"dev/accel0": ""})) is None


@pytest.mark.skipif(has_accelerator(), reason="this machine has an accelerator: JAX chooses as usual")
def test_no_libtpu_errors_on_a_machine_without_an_accelerator():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    out = subprocess.run([sys.executable, "-c", "import sprintjax, jax; print(jax.default_backend())"], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr and "E0000" not in out.stderr, out.stderr
