"""The JAX platform when the user names none: the CPU on a machine with no accelerator (issue 23).

libtpu is installed for TPU pods and for compiling TPU programs ahead of time from any machine (`sprintjax
compile`). With `JAX_PLATFORMS` unset, JAX then probes for a TPU at start-up, and on a machine without one
libtpu prints a screen of `E0000 ... TPU_WORKER_HOSTNAMES` errors before every command. `default_platform` sets
`jax_platforms` to "cpu" only when all of these hold: `JAX_PLATFORMS` is unset, no TPU variable is set
(TPU_NAME, TPU_WORKER_HOSTNAMES, TPU_ACCELERATOR_TYPE, ...), and the machine shows no accelerator — no TPU
device node (/dev/accel*, /dev/vfio/<n>), no Google TPU or NVIDIA PCI device (vendor 0x1ae0 / 0x10de), no
/dev/nvidia*. Anywhere else JAX chooses as it always does. AOT compiles for TPU topologies do not need the TPU
platform (they run under JAX_PLATFORMS=cpu in the tests).
"""

from __future__ import annotations

import os
from pathlib import Path

ACCELERATOR_VENDORS = {"0x1ae0", "0x10de"}  # Google (TPU), NVIDIA


def has_accelerator(root: str | Path = "/") -> bool:
    """Whether this machine shows a TPU or NVIDIA GPU (device nodes or PCI vendors under `root`)."""
    root = Path(root)
    dev = root / "dev"
    if any(dev.glob("accel*")) or any(dev.glob("nvidia[0-9]*")):
        return True
    if any(p.name.isdigit() for p in (dev / "vfio").glob("*")):
        return True
    for vendor in (root / "sys" / "bus" / "pci" / "devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip().lower() in ACCELERATOR_VENDORS:
                return True
        except OSError:
            continue
    return False


def default_platform(environ=os.environ, root: str | Path = "/") -> str | None:
    """Sets jax_platforms to "cpu" where nothing else could run (see the module docstring); returns what it set."""
    if "JAX_PLATFORMS" in environ or any(k.startswith("TPU_") for k in environ) or has_accelerator(root):
        return None
    import jax

    jax.config.update("jax_platforms", "cpu")
    return "cpu"
