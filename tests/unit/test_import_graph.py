"""The flow of the tree: probes -> events -> tracker -> sinks, with no import circle between
tracer's modules (counting imports inside functions and under TYPE_CHECKING too), and bcc
imported in exactly one module."""

from __future__ import annotations

import ast
from pathlib import Path

TRACER = Path(__file__).resolve().parents[2] / "tracer"


def _module_name(path: Path) -> str:
    rel = path.relative_to(TRACER.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in TRACER.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_circle_between_tracer_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep] if dep in path else [node, dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_config_and_daemon_are_one_way() -> None:
    graph = _graph()
    assert "tracer.daemon" in graph["tracer.config"]
    assert "tracer.config" not in graph["tracer.daemon"]
    assert "tracer.reload" not in graph["tracer.daemon"]


def test_bcc_is_imported_in_exactly_one_module() -> None:
    users = sorted(_module_name(p) for p in TRACER.rglob("*.py")
                   if any(m == "bcc" or m.startswith("bcc.") for m in _imports(p)))
    assert users == ["tracer.probes"]
