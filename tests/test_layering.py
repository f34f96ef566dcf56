"""The package layering, read from the source: imports run one way, codegen < targets < passes < compiler.

Every ``import lowbit.X`` / ``from lowbit.X ...`` and every relative import of the four packages is
resolved to the package it names; an arrow from a lower package to a higher one fails the test,
naming the file and line.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("codegen", "targets", "passes", "compiler")  # each may import only those before it
ALLOWED = {layer: set(LAYERS[:index]) for index, layer in enumerate(LAYERS)}


def _imported_packages(path: Path, package: str):
    """``(line, imported package)`` for every lowbit import in ``path`` (``package`` is its own)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    depth = len(path.relative_to(ROOT / package).parts) - 1  # subpackage depth below the package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "lowbit" and len(parts) > 1:
                    yield node.lineno, parts[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "lowbit":
                    names = parts[1:] or [alias.name for alias in node.names]
                    for name in names[:1] if parts[1:] else names:
                        yield node.lineno, name
            elif node.level > depth + 1:  # a relative import that climbs out of its package
                yield node.lineno, "(outside its package)"


def _sources():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


@pytest.mark.parametrize("package", LAYERS)
def test_imports_run_one_way(package):
    backwards = []
    for owner, path in _sources():
        if owner != package:
            continue
        for line, imported in _imported_packages(path, owner):
            if imported != owner and imported not in ALLOWED[owner]:
                backwards.append(f"{path.relative_to(ROOT)}:{line} imports lowbit.{imported}")
    assert not backwards, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing from lowbit'}:\n" + \
        "\n".join(backwards)


def test_the_check_sees_an_arrow_that_runs_back_up(tmp_path, monkeypatch):
    """The walker itself: a lower package importing a higher one is found, absolute or relative."""
    fake = tmp_path / "codegen"
    fake.mkdir()
    (fake / "bad.py").write_text("from lowbit.compiler import load\nimport lowbit.passes.recipe\nfrom ..x import y\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    found = [imported for _, imported in _imported_packages(fake / "bad.py", "codegen")]
    assert found == ["compiler", "passes", "(outside its package)"]
