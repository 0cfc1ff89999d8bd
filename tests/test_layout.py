"""The import graph: no circle, and lib/ never imports gpt2/ (gpt2 builds on lib)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_imports():
    """{module: {project modules it imports, at any depth of the file}} for gpt2/ and lib/."""
    graph = {}
    for package in ("gpt2", "lib"):
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(alias.name for alias in node.names)
            graph[name] = {d for d in deps if d.split(".")[0] in ("gpt2", "lib") and d != name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = project_imports()
    assert {"gpt2.model", "lib.vcache", "gpt2.calibrate", "lib.kv_pruning"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_lib_never_imports_gpt2_and_the_calibrator_not_the_training_loop():
    graph = project_imports()
    upward = {m: sorted(d for d in deps if d.startswith("gpt2")) for m, deps in graph.items() if m.startswith("lib.")}
    assert not any(upward.values()), upward
    assert "gpt2.train" not in graph["gpt2.calibrate"]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
