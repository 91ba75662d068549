"""Safe file writing and checksums shared by the lessons that write files (Lessons 03, 04, 07).

`atomic_write` is the one way mvtk writes a file: the new content goes to a temporary file in
the same folder, is flushed to disk, then renamed over the target, so a crash never leaves a
half-written file where a good one was.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mvtk.errors import InvalidArgumentError, MvtkError, check_path

__all__ = ["CHUNK", "TEMP_NAME", "atomic_write", "abandoned_temps", "remove_abandoned_temps", "write_bytes_atomic",
           "sha256_file", "sha256_bytes", "remove_stale_temps", "writing", "write_error"]

CHUNK = 1 << 20  # read files in 1 MiB pieces


TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[a-z0-9_]+\.tmp")  # .<target>.<writer pid>-<random>.tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write to: on success it replaces `path` atomically, on error it is deleted (Lesson 03, §6).

    The temporary file sits beside `path`, is named after it and the writing process
    (`.<name>.<pid>-<random>.tmp`, see `abandoned_temps`), and is flushed to disk before the
    rename. An existing file's permission bits are kept, so a private (0600) file stays private.
    """
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"cannot write to {str(target)!r}: it is a folder, expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; a new file gets the permissions open() would give it
    try:
        os.chmod(tmp, mode)
        yield tmp
        with open(tmp, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def abandoned_temps(folder: str | os.PathLike, is_target: Callable[[str], object] = bool) -> list[Path]:
    """atomic_write's temporary files in `folder` whose writing process has exited (Lessons 03 and 04).

    Only provably abandoned files are listed: a temporary file of a live process, this one
    included, may be a save in progress. `is_target` filters on the name of the file it was for.
    """
    found = []
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        match = TEMP_NAME.fullmatch(tmp.name)
        if match and is_target(match["target"]) and not _alive(int(match["pid"])):
            found.append(tmp)
    return found


def remove_abandoned_temps(folder: str | os.PathLike, is_target: Callable[[str], object] = bool) -> list[Path]:
    """Delete the files `abandoned_temps` lists; returns them (Lessons 03 and 04)."""
    removed = abandoned_temps(folder, is_target)
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted writes of `path` left; returns them (Lesson 03, §6).

    Only abandoned ones: files named as atomic_write names `path`'s temporary files
    (`.<name>.<pid>-<random>.tmp`) whose writing process has exited. A live process's file may be a
    save in progress and is kept; those of `c.pt.enc` are not those of `c.pt`.
    """
    target = check_path(path)
    return remove_abandoned_temps(target.parent, lambda name: name == target.name)


@contextlib.contextmanager
def writing(path: str | os.PathLike, error: type[MvtkError] = InvalidArgumentError) -> Iterator[Path]:
    """atomic_write after remove_stale_temps; an OSError becomes `error` naming the file (Lessons 03, 04, 06, 07).

    So a full disk or a read-only folder reads the same whichever kind of file was being saved.
    """
    check_path(path)
    try:
        remove_stale_temps(path)
        with atomic_write(path) as tmp:
            yield tmp
    except OSError as exc:
        raise write_error(path, exc, error) from exc


def write_error(path: str | os.PathLike, exc: OSError, error: type[MvtkError] = InvalidArgumentError) -> MvtkError:
    """The `error` for an OSError while writing `path`, in words, saying the old file is unchanged (Lesson 03, §6)."""
    code = exc.errno
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "the folder is not writable",
           errno.EPERM: "the folder is not writable"}.get(code, exc.strerror or str(exc))
    return error(f"cannot write {str(path)!r}: {why} ({errno.errorcode.get(code, code)}); "
                 "the previous file under that name, if any, is unchanged")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path (Lesson 03, §6)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks (Lesson 03, §6)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"cannot checksum {str(path)!r}: no such file")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 hex digest of `data` (Lesson 03, §6)."""
    return hashlib.sha256(data).hexdigest()
