"""Which part of titans_scale imports which, and the cycles among them.

    python tools/import_graph.py            # edges, then each cycle with the imports that make it

A part is a subpackage (titans_scale/train/...) or a top-level module (cli.py, config.py). Every
import counts, at module level or inside a function, relative ones resolved. Exit status 1 when
there is a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PKG = "titans_scale"
ROOT = Path(__file__).resolve().parent.parent / PKG


def part_of(module: str) -> str | None:
    """titans_scale.train.checkpoint -> train; titans_scale.cli -> cli; other packages -> None."""
    bits = module.split(".")
    if bits[0] != PKG or len(bits) < 2:
        return None
    return bits[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file."""
    here = list(path.relative_to(ROOT.parent).parts[:-1])      # the package the file is in
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((mod, node.lineno))
            if node.module is None or mod == PKG:          # `from . import x` / `from titans_scale import x`
                out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def main() -> int:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        src = part_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if src is None or src == "__init__":
            continue
        for mod, line in imports_of(path):
            dst = part_of(mod)
            if dst and dst != src and dst != "__init__":
                edges[(src, dst)].append(f"{path.relative_to(ROOT)}:{line}")
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    for a in sorted(graph):
        print(f"{a:>13} -> {', '.join(sorted(graph[a]))}")
    cycles = _cycles(graph)
    print(f"\n{len(cycles)} cycle(s)")
    for cyc in cycles:
        print("  " + " -> ".join(cyc + [cyc[0]]))
        for a, b in zip(cyc, cyc[1:] + cyc[:1]):
            print(f"      {a} -> {b}: {', '.join(edges[(a, b)])}")
    return 1 if cycles else 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles, each once (rotated to start at its smallest node)."""
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


if __name__ == "__main__":
    sys.exit(main())
