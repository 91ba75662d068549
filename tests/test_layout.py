"""mvtk's package layout (issue 13): imports go one way, no circles, no private name crosses a file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from notebook_utils import ROOT

PACKAGE = ROOT / "mvtk"

# Each module's place in the course; a module may import only modules of a lower or equal rank
# (equal: inside one package, whose files have their own fixed order below).
RANK = {
    "errors": 0, "files": 0, "timing": 0, "classroom": 0, "grading": 0,
    "env": 1, "models": 2, "data": 3, "train": 4, "checkpoint": 5, "registry": 6,
    "parallel": 7, "compress": 8, "export": 9, "monitor": 10, "serve": 11, "distributed": 12,
}
# Inside a package: a file may import only files earlier in this list.
PACKAGE_ORDER = {
    "checkpoint": ["_io", "crypto", "signing", "core", "program", "weights", "periodic"],
    "distributed": ["scale", "sharded", "launch", "elastic", "fsdp"],
    "serve": ["config", "model", "watcher", "batching", "metrics", "payload", "app", "bootstrap", "process", "load"],
    "registry": ["recipe", "records", "text", "index", "blobs", "diff", "bundle", "registry", "mlflow_backend",
                 "cli"],
}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of mvtk."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def top(name: str) -> str:
    """The course module a dotted name belongs to: mvtk.registry.index -> registry."""
    return name.split(".")[1] if name.count(".") >= 1 else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {name: set() for name in mods}
    for name, path in mods.items():
        for target, names in imports(path, name):
            if not target.startswith("mvtk"):
                continue
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in mods and candidate != name:
                    edges[name].add(candidate)
                    break
    return edges


def test_every_module_has_a_place_in_the_course_order():
    unknown = sorted({top(name) for name in modules() if name != "mvtk"} - set(RANK))
    assert not unknown, f"give these modules a rank in RANK: {unknown}"


def test_the_import_graph_has_no_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_no_module_imports_a_later_lessons_module():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            here, there = top(name), top(target)
            if here and there and here != there and RANK[there] > RANK[here]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_inside_a_package_files_import_only_earlier_files():
    wrong = []
    for name, targets in graph().items():
        parts = name.split(".")
        if len(parts) != 3 or parts[1] not in PACKAGE_ORDER:
            continue
        order = PACKAGE_ORDER[parts[1]]
        assert parts[2] in order + ["__main__"], f"give {name} a place in PACKAGE_ORDER"
        for target in targets:
            tparts = target.split(".")
            if tparts[:2] == parts[:2] and len(tparts) == 3 and parts[2] != "__main__":
                if order.index(tparts[2]) >= order.index(parts[2]):
                    wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_a_private_name_from_another_module():
    mods = modules()
    wrong = []
    for name, path in mods.items():
        for target, names in imports(path, name):
            if target.startswith("mvtk") and target != name:
                wrong += [f"{name}: from {target} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not wrong, wrong


def test_every_module_declares_all_and_it_names_what_exists():
    import importlib

    missing, dangling = [], []
    for name in modules():
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        if "__all__" not in vars(module):
            missing.append(name)
            continue
        dangling += [f"{name}.{n}" for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"modules without __all__: {missing}"
    assert not dangling, f"__all__ names that do not exist: {dangling}"


def test_models_does_not_import_the_data_module():
    assert "mvtk.data" not in graph()["mvtk.models"]


def test_models_and_data_agree_on_the_number_of_classes():
    from mvtk import data, models

    assert models.NUM_CLASSES == data.NUM_CLASSES
