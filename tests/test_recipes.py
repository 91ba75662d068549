"""Every recipe cell runs on its own in a fresh Python process (design.md §2.3)."""
import ast
import base64
import os
import subprocess
import sys

import pytest

from notebook_utils import NOTEBOOK_DIR, NOTEBOOKS, read, tagged

# A recipe may import the standard library and the course's third-party dependencies, never mvtk.
ALLOWED_THIRD_PARTY = {"torch", "torchvision", "numpy", "sklearn", "safetensors", "onnx", "onnxscript",
                       "onnxruntime", "torchao", "tensorboard", "cryptography", "matplotlib",
                       "fastapi", "uvicorn", "httpx", "mlflow"}
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
    result = run_alone(source, tmp_path, MODEL_KEY=base64.b64encode(os.urandom(32)).decode())  # the AES recipe's key
    assert result.returncode == 0, f"{path.name} recipe {index} failed:\n{result.stderr[-3000:]}"


def run_alone(source, folder, **env):
    return subprocess.run([sys.executable, "-c", source], cwd=folder, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "HOME": str(folder), **env})


def recipe(notebook, marker):
    """The one recipe cell of `notebook` whose source contains `marker`."""
    cells = [cell.source for cell in tagged(read(NOTEBOOK_DIR / notebook), "recipe") if marker in cell.source]
    assert len(cells) == 1, f"{notebook}: expected one recipe cell with {marker!r}, found {len(cells)}"
    return cells[0]


def test_encryption_recipe_refuses_to_run_without_a_key(tmp_path):
    """A recipe that invented a key would write files nobody can ever decrypt."""
    result = run_alone(recipe("03_save_load.ipynb", "AESGCM"), tmp_path)
    assert result.returncode != 0 and "MODEL_KEY is not set" in result.stderr
    assert not (tmp_path / "runs" / "03_save_load" / "recipes" / "model.pt.enc").exists()


WORKERS_CHECK = """
one = one_epoch(make_loader(NoisyItems(), seed=0, num_workers=2))
two = one_epoch(make_loader(NoisyItems(), seed=0, num_workers=2))
assert one == two, "two runs with the same seed differ"
assert one[0][1] != one[1][1], "workers 0 and 1 drew the same noise: the dataset's RNG was not reseeded"
plain = DataLoader(NoisyItems(), batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
batches = one_epoch(plain)
assert batches[0][1] == batches[1][1], "without seed_worker the two workers should repeat each other's noise"
"""


def test_worker_seeding_recipe_with_two_workers(tmp_path):
    """Lesson 03 runs the recipe with 0 workers; here with 2: noise differs per worker and repeats per seed."""
    result = run_alone(recipe("03_save_load.ipynb", "def seed_worker") + "\n" + WORKERS_CHECK, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_there_are_recipes_to_run():
    assert RECIPES, "no recipe cells found: the recipe test would pass without testing anything"
