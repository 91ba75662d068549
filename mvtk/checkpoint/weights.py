"""Weights without pickle: safetensors files with provenance metadata (Lesson 03, §5).

`mvtk.checkpoint` re-exports the public names here; import them from there.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from mvtk.checkpoint._io import first_line, plain_dict, write_error, writing
from mvtk.checkpoint.core import check_state_dict_fits
from mvtk.env import git_commit, utc_now
from mvtk.errors import CheckpointError, InvalidArgumentError, check_module

__all__ = ["load_weights", "save_weights"]


def save_weights(path: str | os.PathLike, model: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's tensors as safetensors (no pickle) with torch version, time, git commit (Lesson 03, §5)."""
    check_module(model)
    extra = plain_dict(metadata, "metadata")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise InvalidArgumentError(f"safetensors metadata must map str to str, got {extra!r}")
    meta = {"format": "mvtk-weights", "model_class": type(model).__name__, "torch_version": str(torch.__version__),
            "created": utc_now()}
    commit = git_commit()
    if commit:
        meta["git_commit"] = commit
    meta.update(extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with writing(path) as tmp:
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
        except safetensors.SafetensorError as exc:  # safetensors' writer reports a full disk as this, not OSError
            code = re.search(r"\(os error (\d+)\)", str(exc))
            raise write_error(path, int(code.group(1)) if code else errno.EIO, first_line(exc)) from exc
    return Path(path)


def load_weights(path: str | os.PathLike, model: nn.Module | None = None, *, device="cpu") -> dict[str, str]:
    """Load a safetensors file into `model` (checked to fit first); returns its metadata (Lesson 03, §5)."""
    source = str(path)
    if not Path(path).is_file():
        raise CheckpointError(f"weights file {source!r} does not exist (or is not a file)")
    if Path(path).stat().st_size == 0:
        raise CheckpointError(f"weights file {source!r} is empty (0 bytes)")
    try:
        with safetensors.safe_open(source, framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            state = {k: handle.get_tensor(k) for k in handle.keys()} if model is not None else None
    except (safetensors.SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{source!r} is not a readable safetensors file: {first_line(exc)}") from None
    if model is not None:
        check_state_dict_fits(model, state, source)
        model.load_state_dict(state)
    return metadata

