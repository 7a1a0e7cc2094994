"""The notebooks are committed with the outputs their current code produced (notebooks/run.py records the
code's hash); the test suite also executes them (nbmake), so their code still runs."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

HERE = Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("run_notebooks", HERE / "run.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


@pytest.mark.parametrize("name", runner.NAMES)
def test_committed_outputs_come_from_the_committed_code(name):
    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    recorded = nb.metadata.get("sprintjax", {}).get("code_sha256")
    assert recorded == runner.code_hash(nb), (
        f"{name}.ipynb's code changed since its outputs were made: run `.venv/bin/python notebooks/run.py {name}`")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    figures = sum(c.source.count("savefig(") for c in code)
    shown = sum(1 for c in code for o in c.outputs
                if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {}))
    assert shown >= figures, f"{figures} figures saved, {shown} shown in the notebook"
    assert all(runner.output_bytes(o) <= runner.MAX_OUTPUT_BYTES for c in code for o in c.outputs)


def test_the_hash_sees_a_code_change():
    nb = nbformat.read(HERE / f"{runner.NAMES[0]}.ipynb", as_version=4)
    before = runner.code_hash(nb)
    next(c for c in nb.cells if c.cell_type == "code").source += "\n# edited"
    assert runner.code_hash(nb) != before
