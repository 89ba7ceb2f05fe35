"""The package's import graph, read from the source (imports inside functions included): no module imports itself
through others, and the four packages import one way (DESIGN.md: trainer → rl, models, kernels; models → kernels;
rl and kernels import none of the others)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("trainer", "rl", "models", "kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["tokenwise", *parts])] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the modules of ours it imports anywhere in its file (a package's __init__ counts as the package)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # 'tokenwise.trainer.learner.Learner' → '…learner'
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_cycles_through_function_level_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "tokenwise.trainer.cluster" in graph["tokenwise.trainer.workers"]  # imported inside build_workers: still an edge


def test_packages_import_one_way():
    allowed = {"trainer": {"rl", "models", "kernels"}, "models": {"kernels"}, "rl": set(), "kernels": set()}
    top = lambda module: module.split(".")[1]  # tokenwise.<package>.…
    wrong = [(m, n) for m, deps in import_graph().items() for n in deps
             if top(n) != top(m) and top(n) not in allowed[top(m)]]
    assert not wrong, wrong
