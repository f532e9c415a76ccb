"""The package's shape: no import circle, and no function-level import but those that keep a heavy
library off the fast path, each saying so in a comment on its line."""

from __future__ import annotations

import ast
from pathlib import Path

from phi3mlflow import PACKAGE_DIR

PACKAGE = "phi3mlflow"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported(node: ast.Import | ast.ImportFrom, here: str, known: set[str]) -> set[str]:
    """The package's modules an import statement loads (``from a import b`` loads a.b if it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    if node.level:
        base = ".".join(here.split(".")[: -node.level] + ([base] if base else []))
    found = {base} if base in known else set()
    found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        edges[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges[name] |= imported(node, name, known) - {name}
    return edges


def test_no_module_of_the_package_imports_itself_through_others():
    edges = graph()
    cycles = []

    def visit(node, stack, on_stack, done):
        on_stack.add(node)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done: set[str] = set()
    for node in sorted(edges):
        if node not in done:
            visit(node, [], set(), done)
    # A package's __init__ importing nothing of its own is no edge back; any other cycle is a circle.
    assert cycles == [], " -> ".join(cycles[0])


def test_function_level_imports_are_heavy_libraries_with_a_comment():
    bare = []
    for path in modules().values():
        where = path.relative_to(PACKAGE_DIR.parent)
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and "#" not in lines[node.lineno - 1]:
                    bare.append(f"{where}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert bare == [], "\n".join(bare)
