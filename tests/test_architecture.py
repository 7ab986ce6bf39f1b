"""The shape of the code, measured: stage packages import only the core library, the product never imports the
demo, and functions stay small. Each test names the file and line that breaks the rule."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ROOT / "components"
CORE = "common"            # the core library every stage may import
DEMO = "demo_corpus"       # the embedded default input: may import the product, never the reverse
MAX_FUNCTION_LINES = 60


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _stage_of(module: str) -> str | None:
    """The stage package a module name belongs to (``clipmill.components.train.x`` -> ``train``), else None."""
    parts = module.split(".")
    if parts[0] == "clipmill":
        parts = parts[1:]
    return parts[1] if len(parts) > 1 and parts[0] == "components" else None


def _stage_edges() -> list[str]:
    edges = []
    for path in _sources("components"):
        src = path.relative_to(COMPONENTS).parts[0]
        for line, module in _imported_modules(path):
            dst = _stage_of(module)
            if dst and dst not in (src, CORE):
                edges.append(f"{path.relative_to(ROOT)}:{line}: {src} -> {dst}")
    return edges


def test_stage_packages_import_only_the_core_library():
    assert _stage_edges() == []


def test_no_product_module_imports_the_demo():
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p in _sources("components", "pipelines", "clipmill")
                 if DEMO not in p.relative_to(ROOT).parts
                 for line, module in _imported_modules(p) if _stage_of(module) == DEMO]
    assert offenders == [], "product code imports the demo crawl"


@pytest.mark.parametrize("tree", ["components", "pipelines", "clipmill", "benchmarks"])
def test_functions_fit_on_a_screen(tree):
    long = []
    for path in _sources(tree):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines"


def test_the_code_imports_itself_through_the_clipmill_namespace():
    """components/ and pipelines/ install as clipmill.components and clipmill.pipelines: a bare ``components`` would
    be another copy of the modules (or another project's package of that name)."""
    bare = [f"{p.relative_to(ROOT)}:{line}: {module}"
            for p in _sources("components", "pipelines", "clipmill", "tests", "benchmarks")
            for line, module in _imported_modules(p) if module.split(".")[0] in ("components", "pipelines")]
    assert bare == []
