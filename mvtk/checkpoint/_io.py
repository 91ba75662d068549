"""What every checkpoint file needs: atomic writes, per-path locks, hashing, plain-value checks (Lesson 03).

The lowest file of `mvtk.checkpoint`: core, weights and periodic all write through `writing`, so a
full disk or a read-only folder reads the same whichever kind of file was being saved. Checksums
and signatures name their hash in a labelled digest, `"blake3:<hex>"` or `"sha256:<hex>"`: BLAKE3
(a cryptographic hash, multi-threaded for large inputs) is what mvtk writes now; SHA-256 is what
files from earlier versions carry, and they still verify.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

import blake3
import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from mvtk import files
from mvtk.env import available_devices
from mvtk.errors import CheckpointError, DeviceUnavailableError, InvalidArgumentError
from mvtk.files import sha256_file
from mvtk.train import History

__all__ = ["HASHES", "LOCK_SUFFIX", "check_device", "check_digest", "check_name", "digest_bytes", "digest_file",
           "first_line", "history_dict", "lock_path", "locked", "new_hasher", "plain_dict", "writing"]

HASHES = ("blake3", "sha256")      # what a labelled digest may name: what mvtk writes now, then what it wrote before
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")  # both give 32 bytes, written as 64 lowercase hex digits
THREADED_FROM = 1 << 20            # BLAKE3 hashes inputs of this many bytes or more on every core
LOCK_SUFFIX = ".lock"              # `.r.pt.lock`: hidden like temp files, not `.tmp`, so no temp cleanup lists it
_pool_pid: int | None = None       # the process whose BLAKE3 thread pool is running (a forked child has none)


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


def new_hasher(algorithm: str = "blake3", size: int = 0):
    """A hashlib-style hasher for `algorithm` ("blake3" or "sha256"), threaded for `size` >= 1 MiB (Lesson 03, §6).

    BLAKE3 hashes a large input on all cores (blake3's shared thread pool); in a process forked from
    one that used that pool (the pool's threads are not copied), it hashes on one thread instead.
    """
    global _pool_pid
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm != "blake3":
        raise InvalidArgumentError(f"algorithm must be one of {HASHES}, got {algorithm!r}")
    if size < THREADED_FROM or _pool_pid not in (None, os.getpid()):
        return blake3.blake3()
    _pool_pid = os.getpid()
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def digest_bytes(data, algorithm: str = "blake3") -> str:
    """The labelled digest of bytes-like `data`, e.g. "blake3:<64 hex digits>" (Lesson 03, §6)."""
    hasher = new_hasher(algorithm, len(memoryview(data).cast("B")))
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def digest_file(path: str | os.PathLike, algorithm: str = "blake3") -> str:
    """The labelled digest of a file's bytes, read through a memory map (BLAKE3) or in chunks (Lesson 03, §7)."""
    if algorithm == "sha256":
        return f"sha256:{sha256_file(path)}"
    if not Path(path).is_file():
        raise InvalidArgumentError(f"cannot hash {str(path)!r}: no such file")
    hasher = new_hasher(algorithm, os.path.getsize(path))
    hasher.update_mmap(path)
    return f"{algorithm}:{hasher.hexdigest()}"


def check_digest(value, name: str = "digest") -> tuple[str, str]:
    """(algorithm, hex) of a labelled digest "blake3:<hex>" or "sha256:<hex>" (Lesson 03, §7).

    64 bare hex digits are read as a SHA-256, as earlier versions of mvtk passed them.
    """
    if isinstance(value, str) and HEX_DIGEST.fullmatch(value):
        return "sha256", value
    algorithm, _, hex_digits = value.partition(":") if isinstance(value, str) else ("", "", "")
    if algorithm not in HASHES or not HEX_DIGEST.fullmatch(hex_digits):
        raise InvalidArgumentError(f"{name} must be a labelled digest such as 'blake3:' or 'sha256:' followed by 64 "
                                   f"lowercase hex digits, got {value!r}")
    return algorithm, hex_digits


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """mvtk.files.writing for checkpoint files: an OSError becomes a CheckpointError naming the file (Lesson 03, §6)."""
    with files.writing(path, CheckpointError) as tmp:
        yield tmp


def lock_path(path: str | os.PathLike) -> Path:
    """The hidden lock file that `locked` takes for `path`: `.r.pt.lock` beside `r.pt` (Lesson 03, §7)."""
    path = Path(path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs, against other threads and processes (Lesson 03, §7).

    An `fcntl.flock` on the hidden file `lock_path(path)`, removed when the block ends (a lock file
    left by a killed writer is simply reused). It serialises writers on one machine whose file system
    honours flock (local disks; not NFS without working locks); readers do not take it. Where fcntl
    does not exist (Windows), the block runs unlocked. An OSError becomes a CheckpointError naming `path`.
    """
    if fcntl is None:
        yield
        return
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)  # as atomic_write does: a first save may make the folder
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the lock file may have been removed (and made anew) by the previous holder while we waited
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as exc:
        raise files.write_error(path, exc, CheckpointError) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before unlocking: a waiter that then gets this file sees it is gone and retries
        os.close(fd)


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
