"""The package's layers import only downward: no cycle between its subpackages.

Every import in titans_scale/ and kernels/ (module-level and inside functions alike, so a
function-level import that only dodges a cycle is caught too) is mapped to the subpackage or
top-level module it names; the graph of those units must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"titans_scale": ROOT / "titans_scale", "titans_scale.kernels": ROOT / "kernels"}


def _unit(module: str) -> str | None:
    """The layer a dotted module belongs to: titans_scale.<first part> (kernels count as one)."""
    parts = module.split(".")
    if parts[0] != "titans_scale" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _modules():
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path, path.name == "__init__.py"


def _imports(module: str, path: Path, is_package: bool):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path, is_package in _modules():
        src = _unit(module)
        if src is None:
            continue
        edges = graph.setdefault(src, set())
        for target in _imports(module, path, is_package):
            dst = _unit(target)
            if dst is not None and dst != src and dst in {_unit(m) for m, _, _ in _modules()}:
                edges.add(dst)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle reachable by DFS (one representative per back edge)."""
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_between_layers():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between layers:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    for src, dsts in sorted(import_graph().items()):
        print(f"{src} -> {', '.join(sorted(d.split('.')[1] for d in dsts))}")
    for c in find_cycles(import_graph()):
        print("cycle:", " -> ".join(c))
