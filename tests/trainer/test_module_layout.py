"""The trainer's module layout (docs/architecture.md): the façade sits above its rooms, no cycles.

Reads every import statement of ``kubetune_trainer`` (module level, function level and
TYPE_CHECKING alike) with ``ast``, so a lazy import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "trainer-image" / "kubetune_trainer"
PACKAGE = "kubetune_trainer"

# What may import the façade: the package's lazy exports, the pod's job and the guide's entry points.
FACADE_IMPORTERS = {
    "kubetune_trainer",
    "kubetune_trainer.job",
    "kubetune_trainer.pod",  # TrainingResult, for type checking only
    "kubetune_trainer.quickstart",
    "kubetune_trainer.search.local",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _import_graph()


def test_the_graph_sees_lazy_imports(graph: dict[str, set[str]]) -> None:
    # cli.py imports run_training inside a function: the walk must see it.
    assert "kubetune_trainer.job" in graph["kubetune_trainer.cli"]
    assert "kubetune_trainer.models" in graph["kubetune_trainer.finetuner"]


def test_only_entry_points_import_the_facade(graph: dict[str, set[str]]) -> None:
    importers = {m for m, targets in graph.items() if "kubetune_trainer.finetuner" in targets}
    assert importers <= FACADE_IMPORTERS, f"{sorted(importers - FACADE_IMPORTERS)} import finetuner.py"


def test_serve_cli_does_not_import_the_main_cli(graph: dict[str, set[str]]) -> None:
    # cli.py registers serve/cli.py's commands; the way back (exit_code_for) is exit_codes.py.
    assert "kubetune_trainer.serve.cli" in graph["kubetune_trainer.cli"]
    assert "kubetune_trainer.cli" not in graph["kubetune_trainer.serve.cli"]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert _cycles(graph) == []


def test_serve_layers_point_down(graph: dict[str, set[str]]) -> None:
    # server.py builds the app; the router and the serving class see the server only as
    # backend.ServingBackend (as vLLM's OpenAIServing sees an EngineClient).
    assert "kubetune_trainer.serve.app" in graph["kubetune_trainer.serve.server"]
    for layer in ("kubetune_trainer.serve.app", "kubetune_trainer.serve.serving"):
        assert "kubetune_trainer.serve.server" not in graph[layer], f"{layer} imports server.py"
