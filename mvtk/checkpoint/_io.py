"""What every checkpoint file needs: writing atomically with clear errors, and the plain-value checks (Lesson 03).

The lowest file of `mvtk.checkpoint`: core, weights and periodic all write through `writing`, so a
full disk or a read-only folder reads the same whichever kind of file was being saved.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from mvtk.errors import CheckpointError, InvalidArgumentError
from mvtk.files import atomic_write, remove_abandoned_temps
from mvtk.train import History

__all__ = ["first_line", "history_dict", "plain_dict", "remove_stale_temps", "write_error", "writing"]


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted writes of `path` left; returns them (Lesson 03, §6).

    Only abandoned ones: files named as mvtk.files.atomic_write names `path`'s temporary files
    (`.<name>.<pid>-<random>.tmp`) whose writing process has exited. A live process's file may be a
    save in progress and is kept; those of `c.pt.enc` are not those of `c.pt`.
    """
    target = Path(path)
    return remove_abandoned_temps(target.parent, lambda name: name == target.name)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """atomic_write after remove_stale_temps; an OSError becomes a CheckpointError naming the file (Lesson 03, §6)."""
    remove_stale_temps(path)
    try:
        with atomic_write(path) as tmp:
            yield tmp
    except OSError as exc:
        raise write_error(path, exc.errno, exc.strerror or str(exc)) from exc


def write_error(path: str | os.PathLike, code: int | None, text: str) -> CheckpointError:
    """The CheckpointError for an OS error `code` while writing `path` (the old file is unchanged) (Lesson 03, §6)."""
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "the folder is not writable",
           errno.EPERM: "the folder is not writable"}.get(code, text)
    return CheckpointError(f"cannot write {str(path)!r}: {why} ({errno.errorcode.get(code, code)}); "
                           "the previous file under that name, if any, is unchanged")


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
