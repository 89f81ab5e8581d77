"""The README stays a front door and the docs stay in step with the code.

Checks that fail when someone adds a flag, an environment variable or a docs page without
documenting it, or moves a file a page links to: the README's length, every relative link of
README.md and docs/*.md, every environment variable the code names (outside tests/) in
docs/environment.md, and every flag of the scripts' parsers in docs/reference.md. Parsers are
built in-process from their config classes (no torch, TensorFlow or Flask is imported).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 220
# [text](target) and ![alt](target); a target is split from an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ENV_NAME = re.compile(r"\bFOLDSTACK_[A-Z0-9_]*[A-Z0-9]\b")
ENV_KEY = re.compile(r"""(?:os\.environ(?:\.get|\.setdefault|\.pop)?\s*[\[(]\s*|os\.getenv\(\s*|"""
                     r"""\{\s*\*\*os\.environ\s*,\s*)["']([A-Z][A-Z0-9_]*)["']""")
# a dict literal after **os.environ holds more keys: "NAME": value
DICT_ENV = re.compile(r"""\{\s*\*\*os\.environ\s*,([^}]*)\}""", re.S)
DICT_KEY = re.compile(r"""["']([A-Z][A-Z0-9_]*)["']\s*:""")
SKIP_DIRS = {".venv", "tests", ".git", "runs", "build", "node_modules"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def code_files() -> list[Path]:
    """Every .py file of the project outside tests/ (.venv and hidden folders pruned)."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "__"))]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return out


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (not URLs, not in-page anchors)."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def env_names(text: str) -> set[str]:
    """Environment variable names a Python source reads or sets."""
    names = set(ENV_NAME.findall(text)) | set(ENV_KEY.findall(text))
    for body in DICT_ENV.findall(text):
        names |= set(DICT_KEY.findall(body))
    return names


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--flag``, and every positional argument by its name in ``--help``."""
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    positional = {a.metavar or a.dest for a in parser._actions if not a.option_strings}
    return (flags | positional) - {"--help"}


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t).resolve() for t in relative_links((ROOT / "README.md").read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs pages {missing}"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = [t for t in relative_links(text) if not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files {broken}"
    if page.parent == DOCS:
        assert "../README.md" in relative_links(text), f"{page.name} does not link back"


def test_link_scanner_sees_broken_links() -> None:
    """The scanner itself: a missing target, an image, a URL and an anchor."""
    text = "[a](docs/nope.md#x) ![b](serve_page.png) [c](https://x.org/a.md) [d](#here)"
    assert relative_links(text) == ["docs/nope.md", "serve_page.png"]


def test_every_environment_variable_is_documented() -> None:
    documented = (DOCS / "environment.md").read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for path in code_files():
        for name in env_names(path.read_text(encoding="utf-8")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    assert {"FOLDSTACK_CACHE", "NUMPY_MADVISE_HUGEPAGE", "OMP_NUM_THREADS"} <= set(found)
    missing = {n: where for n, where in found.items() if f"`{n}`" not in documented}
    assert not missing, f"docs/environment.md does not list {missing} (name: first file)"


def test_env_scanner_sees_every_form() -> None:
    src = ('os.environ.get("A_B")\nos.environ["C"] = "1"\nos.environ.setdefault("D_E", "0")\n'
           'os.getenv("F")\nenv = {**os.environ, "G_H": "1", "I": x}\nX = "FOLDSTACK_J_K"\n')
    assert env_names(src) == {"A_B", "C", "D_E", "F", "G_H", "I", "FOLDSTACK_J_K"}


def test_every_flag_is_in_the_reference() -> None:
    from ensemble.stack import StackConfig
    from oof.analyze import AnalyzeConfig
    from oof.config import RunConfig, build_parser
    from runner.plan import ExecutorConfig
    from serve.config import BundleConfig, PredictConfig, ServeConfig

    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    parsers = {
        "run_folds.py": [build_parser(RunConfig, "run_folds.py", ""),
                         build_parser(ExecutorConfig, "run_folds.py", "")],
        "stack.py": [build_parser(StackConfig, "stack.py", "")],
        "python -m oof.analyze": [build_parser(AnalyzeConfig, "python -m oof.analyze", "")],
        "predict.py": [build_parser(PredictConfig, "predict.py", "")],
        "serve.py": [build_parser(ServeConfig, "serve.py", "")],
        "python -m serve.bundle": [build_parser(BundleConfig, "python -m serve.bundle", "")],
    }
    for script, group in parsers.items():
        flags = set().union(*map(flags_of, group))
        assert len(flags) >= 4, f"{script}: found only {sorted(flags)}"
        missing = sorted(f for f in flags if f"`{f}`" not in reference)
        assert not missing, f"docs/reference.md lacks {script} flags {missing}"
