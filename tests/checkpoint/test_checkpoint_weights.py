"""Lesson 03's claims about weights without pickle: safetensors files with provenance metadata."""
import subprocess

import pytest
import torch

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import load_weights, save_weights
from mvtk.errors import ArchitectureMismatchError, CheckpointError, InvalidArgumentError
from mvtk.models import MLP


def test_safetensors_round_trip_with_metadata(tmp_path, mlp):
    path = save_weights(tmp_path / "w.safetensors", mlp, metadata={"dataset": "digits"})
    other = MLP(hidden=16)
    meta = load_weights(path, other)
    torch.testing.assert_close(other.state_dict(), mlp.state_dict(), rtol=0, atol=0)
    assert meta["torch_version"] == str(torch.__version__) and meta["dataset"] == "digits"
    assert meta["model_class"] == "MLP" and meta["created"].endswith("+00:00")


def test_safetensors_metadata_records_the_git_commit_when_there_is_one(tmp_path, mlp, monkeypatch):
    monkeypatch.setattr("mvtk.checkpoint.weights.git_commit", lambda: "a" * 40)
    assert load_weights(save_weights(tmp_path / "w.safetensors", mlp))["git_commit"] == "a" * 40
    monkeypatch.setattr("mvtk.checkpoint.weights.git_commit", lambda: None)
    assert "git_commit" not in load_weights(save_weights(tmp_path / "w.safetensors", mlp))


def test_git_commit_is_none_without_git_or_when_it_hangs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ckpt.git_commit() is None  # not a repository
    for failure in (FileNotFoundError("git"), subprocess.TimeoutExpired("git", 2.0)):
        monkeypatch.setattr(subprocess, "run", lambda *a, failure=failure, **k: (_ for _ in ()).throw(failure))
        assert ckpt.git_commit() is None


def test_safetensors_for_another_architecture_is_a_mismatch(tmp_path, mlp):
    path = save_weights(tmp_path / "w.safetensors", MLP(hidden=32))
    with pytest.raises(ArchitectureMismatchError, match="shape mismatch"):
        load_weights(path, mlp)


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_a_broken_safetensors_file_is_a_clear_error(tmp_path, mlp, content):
    (tmp_path / "w.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_weights(tmp_path / "w.safetensors", mlp)


def test_safetensors_metadata_must_be_strings(tmp_path, mlp):
    with pytest.raises(InvalidArgumentError, match="metadata must map str to str"):
        save_weights(tmp_path / "w.safetensors", mlp, metadata={"epoch": 3})
