"""Every recipe cell runs on its own in a fresh Python process (design.md §2.3)."""
import ast
import subprocess
import sys

import pytest

from notebook_utils import NOTEBOOKS, read, tagged

# A recipe may import the standard library and the course's third-party dependencies, never mvtk.
ALLOWED_THIRD_PARTY = {"torch", "torchvision", "numpy", "sklearn", "safetensors", "onnx", "onnxscript",
                       "onnxruntime", "torchao", "tensorboard", "cryptography", "matplotlib"}
RECIPES = [(path, index, cell.source) for path in NOTEBOOKS
           for index, cell in enumerate(tagged(read(path), "recipe"), start=1)]


@pytest.mark.parametrize("path,index,source", RECIPES,
                         ids=[f"{p.stem}-recipe{i}" for p, i, _ in RECIPES])
def test_recipe_runs_alone(path, index, source, tmp_path):
    assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), (
        f"{path.name} recipe {index}: uses IPython magics or shell escapes")
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    foreign = imported - ALLOWED_THIRD_PARTY - set(sys.stdlib_module_names)
    assert not foreign, f"{path.name} recipe {index}: imports {sorted(foreign)} (only torch, stdlib and course deps)"
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": str(tmp_path)})
    assert result.returncode == 0, f"{path.name} recipe {index} failed:\n{result.stderr[-3000:]}"


def test_there_are_recipes_to_run():
    assert RECIPES, "no recipe cells found: the recipe test would pass without testing anything"
