"""The house layering, checked on the source: a module imports only from its own tier or below, and no
pass imports another pass (shared machinery lives in a module of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from onnxopt.registry import PASSES

PACKAGE = Path(__file__).resolve().parent.parent / "onnxopt"

# Highest first. The package root is allowed everywhere for its version string only.
TIERS = [
    {"cli", "__main__"},
    {"api"},
    {"manager", "benchmark"},
    {"pipeline", "registry"},
    {"passes"},
    {"reconstruction", "smoothing", "embeddings", "blockquant", "synthetic", "sharded", "residual_sum"},
    {"calibration", "validate", "report", "report_html", "executor"},
    {"modelio"},
    {"graph"},
    {"data", "tensors", "errors"},
]
TIER = {name: level for level, names in enumerate(TIERS) for name in names}


def modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(PACKAGE).with_suffix("").parts), p) for p in sorted(PACKAGE.rglob("*.py"))]


def imported(name: str, path: Path) -> set[str]:
    """Dotted names (relative to the package) of the package modules ``name`` imports, lazy ones included."""
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # from . import x, y
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnxopt."):
            found.add(node.module.removeprefix("onnxopt."))
    return found


def tier(name: str) -> int | None:
    return TIER.get(name.split(".")[0])


@pytest.mark.parametrize(("name", "path"), modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_go_down(name: str, path: Path) -> None:
    if name.split(".")[-1] == "__init__" and "." not in name:
        return  # the package root re-exports the API
    own = tier(name)
    assert own is not None, f"onnxopt/{path.relative_to(PACKAGE)} is in no tier of this test: add it"
    upward = [dep for dep in imported(name, path)
              if dep not in ("__version__", "") and tier(dep) is not None and tier(dep) < own]
    assert not upward, f"{name} imports from a higher layer: {upward}"


def test_no_pass_imports_another_pass() -> None:
    pass_modules = {cls.__module__.removeprefix("onnxopt.") for cls in PASSES.values()}
    offenders = {}
    for name, path in modules():
        if name in pass_modules:
            others = (imported(name, path) & pass_modules) - {name}
            if others:
                offenders[name] = sorted(others)
    assert not offenders, f"passes importing other passes (move the shared code to a module of its own): {offenders}"


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The import reader sees relative, nested-relative and absolute imports."""
    source = tmp_path / "probe.py"
    source.write_text("from .fuse_bias import x\nfrom ..graph import y\nfrom onnxopt.api import z\n"
                      "def f():\n    from ..validate import w\n")
    assert imported("passes.probe", source) == {"passes.fuse_bias", "graph", "api", "validate"}
