"""What every checkpoint file needs: writing atomically with clear errors, and the plain-value checks (Lesson 03).

The lowest file of `mvtk.checkpoint`: core, weights and periodic all write through `writing`, so a
full disk or a read-only folder reads the same whichever kind of file was being saved.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch

from mvtk import files
from mvtk.env import available_devices
from mvtk.errors import CheckpointError, DeviceUnavailableError, InvalidArgumentError
from mvtk.train import History

__all__ = ["check_device", "check_name", "first_line", "history_dict", "plain_dict", "writing"]


def check_name(value, name: str = "name", *, optional: bool = False) -> str | None:
    """`value` if it is a non-empty str (or None when `optional`); else an InvalidArgumentError (Lesson 03, §7)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{name} must be a non-empty str{' or None' if optional else ''}, got {value!r}")
    return value


def check_device(value, name: str = "device") -> torch.device:
    """`value` (a str or torch.device) as a torch.device this machine has (Lesson 03, §5).

    InvalidArgumentError naming `name` for something that is not a device, DeviceUnavailableError
    for a device this machine lacks: so a bad argument is never blamed on the file being loaded.
    """
    if not isinstance(value, (str, torch.device)):
        raise InvalidArgumentError(f"{name} must be a str or torch.device such as 'cpu' or 'cuda', "
                                   f"got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"{name} {value!r} is not a device; expected 'cpu' or an accelerator such as "
                                   "'cuda', 'cuda:N', 'mps' or 'xpu'") from None
    available = available_devices()
    if device.type not in available:
        raise DeviceUnavailableError(f"{name} {value!r} was asked for but this machine has only {available}")
    if device.type != "cpu" and device.index is not None and device.index >= torch.accelerator.device_count():
        raise DeviceUnavailableError(f"{name} {value!r} was asked for but this machine has "
                                     f"{torch.accelerator.device_count()} {device.type} device(s)")
    return device


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """mvtk.files.writing for checkpoint files: an OSError becomes a CheckpointError naming the file (Lesson 03, §6)."""
    with files.writing(path, CheckpointError) as tmp:
        yield tmp


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), to quote in an error (Lesson 03, §6)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def history_dict(history) -> dict:
    """A History, a dict of lists or None as the plain dict a checkpoint stores (Lesson 03, §2)."""
    if history is None:
        return History().to_dict()
    if isinstance(history, History):
        return history.to_dict()
    if isinstance(history, dict):
        return {str(k): list(v) for k, v in history.items()}
    raise InvalidArgumentError(f"history must be an mvtk.train.History, a dict or None, got {type(history).__name__}")


def plain_dict(value, label: str) -> dict:
    """A copy of the dict `value` ({} for None); anything else is an error naming `label` (Lesson 03, §2)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{label} must be a dict or None, got {type(value).__name__}")
    return dict(value)
