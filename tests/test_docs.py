"""The commands the README and docs/ show still exist with the flags they show: every `sprintjax ...` line of a
bash block parses with the CLI's own parser, every `python benchmarks/...` or `notebooks/...` script, config
file and `make` target it names exists. (Running them is what the other tests and `make demo` do.)"""

import re
import shlex
from pathlib import Path

import pytest

from sprintjax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path):
    """The shell lines of the page's bash blocks: continuations joined, comments and [optional parts] dropped."""
    text = page.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            while re.search(r"\[[^\[\]]*\]", line):  # usage brackets, innermost first
                line = re.sub(r"\[[^\[\]]*\]", "", line)
            if line:
                yield line


def test_the_pages_show_commands():
    assert sum(1 for p in PAGES for _ in commands(p)) > 30


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_a_page_shows_parses_and_names_files_that_exist(page):
    parser = build_parser()
    for line in commands(page):
        words = shlex.split(line.replace("|", "_OR_"))
        if words[0].startswith("XLA_FLAGS=") or words[0].startswith("JAX_PLATFORMS="):
            words = words[1:]
        if words[0] == "sprintjax":
            try:
                args, extra = parser.parse_known_args(words[1:])
            except SystemExit:
                raise AssertionError(f"{page.name}: `{line}` does not parse") from None
            assert not extra or getattr(args, "takes_overrides", False), f"{page.name}: `{line}`: unknown {extra}"
            assert all(e.startswith("--config.") for e in extra), f"{page.name}: `{line}`: unknown {extra}"
        if words[0] in ("python", ".venv/bin/python") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{page.name}: `{line}`: no {words[1]}"
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), flags=re.M), f"no make {words[1]}"
        for w in words:
            config = re.match(r"(?:--config=)?(configs/[\w/]+\.py)", w)
            if config:
                assert (ROOT / config.group(1)).is_file(), f"{page.name}: `{line}`: no {config.group(1)}"
