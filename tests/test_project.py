"""The project's set-up stays consistent: pyproject, environment.yml, Makefile, CI, README."""
import re
import subprocess
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import yaml

from notebook_utils import NOTEBOOKS, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_same_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip_section == ["-e .[dev]"], "environment.yml must install the package from pyproject, nothing else"
    conda_packages = [d for d in deps if isinstance(d, str)]
    assert sorted(conda_packages) == ["pip", "python=3.11"], "dependencies belong in pyproject.toml only"


def test_pyproject_lists_every_course_dependency():
    names = {re.split(r"[<>=!\[ ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    needed = {"torch", "torchvision", "jupyterlab", "ipywidgets", "matplotlib", "tqdm", "scikit-learn",
              "safetensors", "onnx", "onnxscript", "onnxruntime", "tensorboard", "cryptography", "torchao"}
    assert needed <= names, f"missing: {sorted(needed - names)}"
    assert "torch>=2.10" in PYPROJECT["project"]["dependencies"]
    dev = " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    for tool in ("pytest", "nbval>=0.11,<0.12", "pytest-xdist", "playwright"):
        assert tool in dev


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_readme_learning_path_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in readme, f"README's learning path does not list {path.name}"


def test_make_lab_passes_lab_args_to_jupyter():
    dry_run = subprocess.run(["make", "--dry-run", "--always-make", "lab", "LAB_ARGS=--allow-root --port=8899"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lab_line = next(line for line in dry_run.splitlines() if "jupyter lab" in line)
    assert lab_line.endswith("--notebook-dir=notebooks --allow-root --port=8899")
