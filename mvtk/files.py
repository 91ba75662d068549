"""Safe file writing and checksums shared by the lessons that write files (Lessons 03, 04, 07).

`atomic_write` is the one way mvtk writes a file: the new content goes to a temporary file in
the same folder, is flushed to disk, then renamed over the target, so a crash never leaves a
half-written file where a good one was.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mvtk.errors import InvalidArgumentError

CHUNK = 1 << 20  # read files in 1 MiB pieces


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `path` atomically, on error it is removed."""
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"cannot write to {str(target)!r}: it is a folder, expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"cannot checksum {str(path)!r}: no such file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()
