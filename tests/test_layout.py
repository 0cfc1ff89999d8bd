"""The import graph: no circle, lib/ imports torch alone and never gpt2/ (gpt2 builds on lib),
and scripts/ holds entry points: no script imports another, nothing imports an entry point
(train_ra_mla.py, scripts/), and each script is a few lines that call a gpt2 module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path):
    """The modules a file imports, at any depth of the file."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return deps


def project_imports():
    """{module: {project modules it imports}} for gpt2/ and lib/, sub-packages included."""
    graph = {}
    for package in ("gpt2", "lib"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            graph[name] = {d for d in imports(path) if d.split(".")[0] in ("gpt2", "lib") and d != name}
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


def test_sub_packages_are_in_the_graph():
    graph = project_imports()
    assert {"gpt2.bench", "gpt2.bench.kv_measure", "gpt2.bench.gpu_cost"} <= set(graph)
    assert "gpt2.bench.kv_report" in graph["gpt2.bench.kv_measure"]


def test_no_script_imports_scripts():
    """What two scripts share lives in a module (gpt2/bench/), not in a script."""
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) > 5
    offenders = {p.name: sorted(d for d in imports(p) if d.split(".")[0] == "scripts") for p in scripts}
    assert not any(offenders.values()), {name: deps for name, deps in offenders.items() if deps}


ENTRY_POINTS = ("train_ra_mla", "scripts")
SCRIPT_MAX_LINES = 40


def test_nothing_imports_an_entry_point():
    """The CLI's parser is gpt2/cli.py and each script's logic a gpt2 module: library code
    and tests import those, never train_ra_mla.py or a script (tests run scripts as
    subprocesses)."""
    paths = [p for folder in ("gpt2", "lib", "tests", "scripts") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(paths) > 50
    offenders = {str(p.relative_to(ROOT)): sorted(d for d in imports(p) if d.split(".")[0] in ENTRY_POINTS)
                 for p in paths}
    assert not any(offenders.values()), {path: deps for path, deps in offenders.items() if deps}


def test_every_script_is_an_entry_point_only():
    """A script is its usage, the sys.path line that runs it from the repository root,
    an import of a gpt2 module's main and the call: its logic lives in gpt2/."""
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    too_long = {p.name: n for p in scripts if (n := len(p.read_text().splitlines())) > SCRIPT_MAX_LINES}
    assert not too_long, f"scripts over {SCRIPT_MAX_LINES} lines (move the logic into gpt2/): {too_long}"
    for p in scripts:
        tree = ast.parse(p.read_text())
        defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defined, f"{p.name} defines {defined}: an entry point imports its main from gpt2/"
        assert ast.get_docstring(tree), f"{p.name} has no docstring (its usage)"
        assert any(d.startswith("gpt2.") for d in imports(p)), f"{p.name} calls no gpt2 module"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_method_library_imports_torch_and_nothing_else_of_outside():
    """lib/ is the V-cache method library that any attention can call: the
    standard library, torch and lib itself, no model, training, data or
    third-party package."""
    import sys

    for path in sorted((ROOT / "lib").rglob("*.py")):
        outside = {d for d in imports(path) if d.split(".")[0] not in ("torch", "lib")
                   and d.split(".")[0] not in sys.stdlib_module_names}
        assert not outside, (path.name, outside)
