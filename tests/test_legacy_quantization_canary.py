"""A canary for the deprecated `torch.ao.quantization` (issue 17): the course keeps exactly one legacy cell on it.

Lesson 06 §6 compares torchao's int8 with `torch.ao.quantization.quantize_dynamic` in one labelled legacy
cell, and benchmarks/compress.py measures it as a legacy row. The first test fails, naming those places,
the day a torch release removes or breaks that call; the second keeps every other lesson and mvtk module off it
(an mvtk function may use it only if its name says *legacy*, as a measured map's legacy column does).
"""
import ast
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LEGACY_MARK = "# LEGACY: torch.ao.quantization"  # the first comment line of Lesson 06's one legacy cell
LEGACY_NOTEBOOK = "06_compress.ipynb"
TO_UPDATE = ("notebooks/06_compress.ipynb §6 (the cell marked '# LEGACY: torch.ao.quantization', the prose "
             "around it and the summary's int8 line), benchmarks/compress.py (legacy_int8 and its row), "
             "mvtk/export.py (_legacy_int8, the map's 'torch.ao legacy' path) with notebooks/07_onnx_export.ipynb §8's "
             "legacy row and benchmarks/export.py, and this test")
USES = re.compile(r"torch\.(ao\.)?(quantization|nn\.quantized)\b")  # a dotted name that starts so


def test_torch_ao_quantize_dynamic_still_runs_or_the_legacy_sections_must_go():
    try:
        quantize_dynamic = torch.ao.quantization.quantize_dynamic
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        with warnings.catch_warnings():  # the deprecation is expected: it is what this canary watches
            warnings.simplefilter("ignore")
            int8 = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        x = torch.rand(8, 16)
        with torch.no_grad():
            close = (int8(x) - model(x)).abs().max().item() < 0.05
        quantized = type(int8[0]).__module__.startswith("torch.ao.nn.quantized")
    except Exception as exc:  # removed (AttributeError, ImportError) or broken (anything else)
        pytest.fail(f"torch {torch.__version__} no longer runs torch.ao.quantization.quantize_dynamic "
                    f"({type(exc).__name__}: {exc}). The deprecated path is gone: delete or rewrite {TO_UPDATE}.")
    assert quantized and close, (
        f"torch {torch.__version__}: torch.ao.quantization.quantize_dynamic ran but no longer returns int8 Linear "
        f"layers close to float32 (int8 layer: {quantized}, within 0.05: {close}); update {TO_UPDATE}.")


def dotted(node: ast.AST) -> str:
    """'torch.ao.quantization.quantize_dynamic' for that attribute chain; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def legacy_uses(source: str) -> list[str]:
    """Uses of torch.ao's quantization in `source` (code, not prose), outside functions named *legacy*."""
    found = []

    def visit(node: ast.AST, labelled: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            labelled = labelled or "legacy" in node.name
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else
                 [dotted(node)] if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "parent", None),
                                                                                       ast.Attribute) else [])
        found.extend(f"{name} (line {node.lineno})" for name in names if USES.match(name) and not labelled)
        for child in ast.iter_child_nodes(node):
            child.parent = node
            visit(child, labelled)

    visit(ast.parse(source), False)
    return found


def code_cells(path: Path) -> list[str]:
    """Each code cell's source, IPython magics and shell lines blanked so that ast can parse it."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    return ["\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in "".join(c["source"]).splitlines())
            for c in cells]


def test_only_the_labelled_legacy_cell_uses_torch_ao_quantization():
    users = [f"{p.relative_to(ROOT)}: {use}" for p in sorted((ROOT / "mvtk").rglob("*.py"))
             for use in legacy_uses(p.read_text())]
    legacy = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for index, source in enumerate(code_cells(notebook)):
            uses = legacy_uses(source)
            head = [line for line in source.splitlines() if line.strip() and line != "# NBVAL_IGNORE_OUTPUT"][:1]
            if uses and notebook.name == LEGACY_NOTEBOOK and head and head[0].startswith(LEGACY_MARK):
                legacy.append(index)
            else:
                users.extend(f"notebooks/{notebook.name}, code cell {index + 1}: {use}" for use in uses)
    assert not users, ("torch.ao.quantization is deprecated; the course uses torchao (Lesson 06 §6) and shows "
                       "torch.ao only in Lesson 06's one legacy cell (and, in mvtk, inside functions named *legacy*). "
                       f"Also used in: {users}")
    assert len(legacy) == 1, (f"Lesson 06 should hold exactly one code cell starting {LEGACY_MARK!r} (after an "
                              f"optional '# NBVAL_IGNORE_OUTPUT' line) that uses torch.ao; found {len(legacy)}")
