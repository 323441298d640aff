"""Imports flow downward (docs/design.md): no import cycle among the project's top-level modules, and no module
that is not a command imports a command module (a command: a module with top-level `add_arguments` and `run`,
what main.py dispatches to). Every `import X` / `from X import ...` counts, also the lazy ones inside
functions; tests/ and bench/ are not modules of the project."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path) -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in sorted(root.glob("*.py"))}


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """{module: the project modules it imports anywhere in its code}."""
    graph = {}
    for name, tree in trees.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = (found & set(trees)) - {name}
    return graph


def commands(trees: dict[str, ast.Module]) -> set[str]:
    out = set()
    for name, tree in trees.items():
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if {"add_arguments", "run"} <= defined:
            out.add(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: groups of modules that reach each other (strongly connected, more than one), found by
    reachability (the project is small)."""
    reach = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        reach[start] = seen
    groups = {frozenset([m] + [o for o in reach[m] if m in reach[o]]) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def test_the_checks_catch_a_cycle_and_a_command_import(tmp_path):
    """The checks themselves, on a made-up project: a lazy import inside a function closes a cycle; a library
    module importing a command is found."""
    (tmp_path / "cmd.py").write_text("import lib\ndef add_arguments(p):\n    pass\ndef run(a):\n    return 0\n")
    (tmp_path / "lib.py").write_text("import low\ndef f():\n    from cmd import run\n    return run\n")
    (tmp_path / "low.py").write_text("def g():\n    import lib.sub\n")
    (tmp_path / "alone.py").write_text("import os\n")
    trees = _modules(tmp_path)
    graph = import_graph(trees)
    assert graph == {"alone": set(), "cmd": {"lib"}, "lib": {"low", "cmd"}, "low": {"lib"}}
    assert cycles(graph) == [["cmd", "lib", "low"]]
    assert commands(trees) == {"cmd"}


def test_no_import_cycle():
    graph = import_graph(_modules(ROOT))
    assert "inference" in graph and graph["inference"] <= {"dataset", "image_io", "nuclei_model", "postprocess",
                                                          "utils"}, graph["inference"]
    assert cycles(graph) == []


def test_only_commands_import_commands():
    trees = _modules(ROOT)
    graph = import_graph(trees)
    cmds = commands(trees)
    assert {"predict", "train", "evaluate", "demo"} <= cmds
    bad = sorted(f"{m} imports {c}" for m in graph if m not in cmds for c in graph[m] & cmds)
    assert bad == []
    # the engine's callers get it from inference.py, never from the command
    for caller in ("wsi", "dask_predict", "prompts", "evaluate", "demo", "train"):
        assert "predict" not in graph[caller], caller
