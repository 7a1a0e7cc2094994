"""Re-executes the notebooks in place so they are committed with their outputs (figures and printed tables),
and records in each notebook's metadata the hash of the code that produced them; the tests check that hash
(tests/test_notebooks.py), so a notebook whose code changed without a re-run fails.

    .venv/bin/python notebooks/run.py                      # all three, ~8 minutes on 2 cores
    .venv/bin/python notebooks/run.py jvp_stability        # one
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("trigflow_transform", "distill_step_walkthrough", "jvp_stability")
MAX_OUTPUT_BYTES = 200_000  # per output: figures are small PNGs; anything larger is a dumped array


def code_hash(nb) -> str:
    """sha256 of the code cells' sources, in order (what the outputs were produced by)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode() + b"\0")
    return h.hexdigest()


def output_bytes(output) -> int:
    data = output.get("data", {}) or {}
    return sum(len(v) if isinstance(v, str) else len("".join(v)) for v in data.values()) + len(output.get("text", ""))


def run(name: str) -> None:
    import nbformat
    from nbclient import NotebookClient

    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_bytes(out) > MAX_OUTPUT_BYTES:
                raise SystemExit(f"{name}: an output of {output_bytes(out):,} bytes (limit {MAX_OUTPUT_BYTES:,}): "
                                 "print a summary, not the array")
    nb.metadata["sprintjax"] = {"code_sha256": code_hash(nb)}
    tmp = path.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    print(f"{name}: executed in {time.time() - t0:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for n in sys.argv[1:] or NAMES:
        run(n)
