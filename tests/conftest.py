"""Fixtures every test folder shares: the repository root, small seeded models, a planted pickle, a dead pid."""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mvtk.env import seed_everything
from mvtk.models import MLP
from notebook_utils import ROOT  # the repository: pyproject.toml, mvtk/, notebooks/


class Plant:
    """A pickle that runs code when loaded: it creates `marker` (the attack weights_only=True refuses)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def planted_bytes(marker: Path, payload: dict | None = None) -> bytes:
    """torch.save bytes of `payload` (a dict) with a Plant inside: loading them without weights_only creates `marker`."""
    buffer = io.BytesIO()
    torch.save({**(payload or {}), "plant": Plant(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def mlp() -> MLP:
    """A small MLP (hidden 16) with seeded weights, on one CPU thread."""
    seed_everything(0, threads=1)
    return MLP(hidden=16)


@pytest.fixture
def planted(tmp_path):
    """(path of a torch file that runs code if unpickled unsafely, path of the marker that code would create)."""
    marker = tmp_path / "planted-code-ran"
    path = tmp_path / "planted.pt"
    path.write_bytes(planted_bytes(marker))
    return path, marker


@pytest.fixture
def dead_pid() -> int:
    """A process id no process has (above Linux's largest pid_max, 2**22, and macOS's 99998), checked."""
    pid = 2**22 + 1
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB tmpfs folder (a disk that fills up); skipped, loudly, where this user cannot mount one."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"FULL-DISK TEST SKIPPED: cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def put_in_the_way(tmp_path):
    """put_in_the_way(path, intruder): replace a file by a folder, a symlink to a good copy elsewhere, or a fifo."""
    def replace(path: Path, intruder: str) -> None:
        data = path.read_bytes()
        path.unlink()
        if intruder == "folder":
            path.mkdir()
        elif intruder == "symlink":
            elsewhere = tmp_path / "elsewhere" / path.name
            elsewhere.parent.mkdir(exist_ok=True)
            elsewhere.write_bytes(data)
            path.symlink_to(elsewhere)
        else:
            os.mkfifo(path)
    return replace


@pytest.fixture
def one_thread():
    """One torch thread in this process: small models train fastest so, and on 2 busy cores 2 threads mostly wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
