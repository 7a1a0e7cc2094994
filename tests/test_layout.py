"""The package's layout shows its architecture: the core and the trainer never import the embedded benchmark
(sprintjax/bench) or the PyTorch reference (convert/torch_ref, convert/parity_demo); only the tools (the CLI,
prepare-data's built-in datasets, the mobile exports' built-in autoencoder) reach them. No module is long."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sprintjax"
TOOLS = {"cli.py", "commands.py", "data/prepare.py", "convert/mobile_pipeline.py", "convert/parity_demo.py"}
OUTSIDE_CORE = ("sprintjax.bench", "sprintjax.convert.torch_ref", "sprintjax.convert.parity_demo")


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_core_and_the_trainer_import_neither_the_benchmark_nor_the_pytorch_reference():
    offenders = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("bench/") or rel in TOOLS:
            continue
        bad = sorted(n for n in imported(path) if n.startswith(OUTSIDE_CORE))
        if bad:
            offenders[rel] = bad
    assert not offenders, offenders


def test_no_module_is_over_about_400_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
