"""Fixtures of the mvtk.checkpoint tests: loaders, a saved checkpoint, a key, temporary files of dead saves."""
from __future__ import annotations

import pytest

from mvtk.checkpoint import (load_private_key, load_public_key, new_key, new_signing_key,
                             save_checkpoint)
from mvtk.data import make_loaders


@pytest.fixture
def loaders():
    return make_loaders(batch_size=64)


@pytest.fixture
def saved(tmp_path, mlp):
    """A good checkpoint of `mlp` at epoch 3."""
    return save_checkpoint(tmp_path / "good.pt", mlp, epoch=3)


@pytest.fixture
def key():
    return new_key()


@pytest.fixture
def temp_file(tmp_path, dead_pid):
    """temp_file(name, pid=dead_pid): make the temporary file atomic_write names for `name` in tmp_path.

    With the default pid, the save that wrote it has died (an abandoned file); with os.getpid() it
    is a save in progress in this process.
    """
    def make(name: str, pid: int = dead_pid):
        path = tmp_path / f".{name}.{pid}-k3x_9a1q.tmp"
        path.write_bytes(b"partial")
        return path
    return make


@pytest.fixture
def keys(tmp_path):
    """(private, public) of a fresh Ed25519 pair, then (private, public) of a second, unrelated pair."""
    folder = tmp_path / "keys"
    new_signing_key(folder / "private.pem", folder / "public.pem")
    new_signing_key(folder / "other.pem", folder / "other.pub")
    return (load_private_key(folder / "private.pem"), load_public_key(folder / "public.pem"),
            load_private_key(folder / "other.pem"), load_public_key(folder / "other.pub"))
