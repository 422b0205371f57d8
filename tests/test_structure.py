"""The shape of the package, read from its code (issue 17): no import circle, rooms that
do not import one another, and no class much over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "addons" / "cassette_proxy"
MAX_CLASS_LINES = 440  # "no class much over 400 lines" (issue 17)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules a module imports (relative or absolute), at any place in it."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("cassette_proxy"):
                continue
            for alias in node.names:  # `from . import keys` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cassette_proxy")}
    return {m for m in found if _exists(m) and m != name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_no_room_imports_another():
    graph = _graph()
    rooms = {m for m in graph if m.startswith("cassette_proxy.rooms.")}
    assert len(rooms) >= 5, rooms
    for room in rooms:
        assert not graph[room] & rooms, f"{room} imports {graph[room] & rooms}"
        # Nor the root that composes them: rooms get services handed in.
        assert "cassette_proxy.addon" not in graph[room], room


def test_no_module_but_the_root_imports_a_room():
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith("cassette_proxy.rooms") or module == "cassette_proxy.addon":
            continue
        rooms = {m for m in imported if m.startswith("cassette_proxy.rooms")}
        assert not rooms, f"{module} imports {rooms}"


def test_no_class_is_much_over_400_lines():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    too_long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert too_long == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
