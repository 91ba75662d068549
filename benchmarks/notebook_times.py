"""How long each lesson notebook takes to run top to bottom in a fresh kernel on the CPU.

Prints one row per notebook and the total; exits non-zero when a notebook breaks the 60 s
budget of design.md §3 or fails. Run with `make bench` or `.venv/bin/python benchmarks/notebook_times.py`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BUDGET_S = 60.0
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path) -> float:
    """Execute a notebook in a fresh kernel (cwd: its folder) without saving it; returns the seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def main(paths: list[str]) -> int:
    os.environ.setdefault("MVTK_DEVICE", "cpu")
    notebooks = [Path(p) for p in paths] or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    total, slow = 0.0, []
    print(f"{'notebook':<26}{'seconds':>9}{'of budget':>11}")
    for path in notebooks:
        seconds = run_notebook(path)
        total += seconds
        print(f"{path.name:<26}{seconds:>9.1f}{seconds / BUDGET_S:>10.0%}")
        if seconds > BUDGET_S:
            slow.append(path.name)
    print(f"{'total':<26}{total:>9.1f}")
    if slow:
        print(f"over the {BUDGET_S:.0f} s budget: {', '.join(slow)}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
