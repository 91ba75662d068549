"""The exception types of mvtk, and `expect_error` for lessons that show an error on purpose.

Every mvtk error names the thing that was wrong (a file, an argument, a version) and what
was expected, so a learner can fix it without reading a traceback. Used by every lesson.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from pathlib import Path
from typing import Iterator

__all__ = [
    "MvtkError", "InvalidArgumentError", "DeviceUnavailableError", "DatasetError", "InputShapeError",
    "CheckpointError", "IntegrityError", "SignatureError", "ArchitectureMismatchError", "DecryptionError", "RegistryError",
    "NotFoundError", "ParallelError", "ExportError", "MonitorError",
    "check_int", "check_positive_int", "check_number", "check_module", "check_path", "check_bytes", "expect_error",
]

class MvtkError(Exception):
    """Base class of every error mvtk raises on purpose."""


class InvalidArgumentError(MvtkError, ValueError):
    """An argument has the wrong type or value (Lesson 00, §2)."""


class DeviceUnavailableError(MvtkError, RuntimeError):
    """A device was asked for that this machine does not have (Lesson 00, §3)."""


class DatasetError(MvtkError, ValueError):
    """A data set is unknown, missing on disk, or malformed (Lesson 02, §1)."""


class InputShapeError(MvtkError, ValueError):
    """A model received input of the wrong shape, dtype or values (Lesson 01, §6)."""


class CheckpointError(MvtkError):
    """A checkpoint file cannot be used: missing, truncated, corrupted, not a checkpoint (Lesson 03)."""


class IntegrityError(CheckpointError):
    """A file's checksum (BLAKE3 or SHA-256) does not match the one recorded when it was saved (Lesson 03)."""


class SignatureError(IntegrityError):
    """A file's or version's Ed25519 signature is missing, or does not match the key it must come from (Lesson 03)."""


class ArchitectureMismatchError(CheckpointError):
    """A state_dict does not fit the model: missing, unexpected or reshaped keys (Lesson 03)."""


class DecryptionError(CheckpointError):
    """An encrypted file cannot be decrypted: wrong key or tampered bytes (Lesson 03)."""


class RegistryError(MvtkError):
    """A model-registry operation is not allowed or its store is inconsistent (Lesson 04)."""


class NotFoundError(MvtkError, LookupError):
    """A name, version or alias does not exist; the message lists what does (Lesson 04)."""


class ParallelError(MvtkError, RuntimeError):
    """A data-parallel set-up is wrong: backend, device count, process group (Lesson 05)."""


class ExportError(MvtkError, RuntimeError):
    """A model could not be exported or its export does not agree with PyTorch (Lesson 07)."""


class MonitorError(MvtkError, ValueError):
    """Monitoring input is unusable: empty batches, mismatched feature counts (Lesson 08)."""


# --- argument checks shared by every module: one place, one wording -------------------------

def check_int(value, name: str, *, low: int | None = None, high: int | None = None, what: str = "an int",
              error: type[MvtkError] = InvalidArgumentError) -> int:
    """Return `value` if it is an int (not a bool) in [low, high]; else raise `error` naming `name` (Lesson 00, §2).

    The message reads "<name> must be <what> <range>, got <value>"; `what` words it for the lesson.
    """
    if not _is_int(value, low, high):
        raise error(f"{name} must be {what}{_range(low, high)}, got {value!r}")
    return value


def check_positive_int(value, name: str, error: type[MvtkError] = InvalidArgumentError) -> int:
    """Return `value` if it is an int >= 1 (bool is refused); else raise `error` naming `name` (Lesson 00, §2)."""
    if not _is_int(value, low=1):
        raise error(f"{name} must be a positive int, got {value!r}")
    return value


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, what: str = "a number",
                 error: type[MvtkError] = InvalidArgumentError) -> float:
    """A finite real number (not a bool) in range, returned as a float; else raise `error` (Lesson 00, §2).

    The range is [low, high]; `low_open` / `high_open` leave out that end, e.g. [0, 1) for a dropout
    probability. The message reads "<name> must be <what> <range>, got <value>".
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise error(f"{name} must be {what}{_range(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def check_path(value, name: str = "path") -> Path:
    """`value` as a Path if it is a non-empty str or os.PathLike without NUL; else an error naming `name`."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or "\x00" in text:
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise InvalidArgumentError(f"{name} must be a str or os.PathLike naming a file, got {shown}")
    return Path(text)


def check_bytes(value, name: str) -> bytes | bytearray | memoryview:
    """`value` if it is bytes, bytearray or memoryview; else an InvalidArgumentError naming `name`."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"{name} must be bytes, got {type(value).__name__}")
    return value


def check_module(value, name: str = "model", error: type[MvtkError] = InvalidArgumentError):
    """Return `value` if it is a torch.nn.Module; else raise `error` naming `name` and its type (Lesson 00, §2)."""
    from torch import nn  # here: errors is the lowest module and stays cheap to import

    if not isinstance(value, nn.Module):
        raise error(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def _is_int(value, low: int | None = None, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


@contextlib.contextmanager
def expect_error(expected: type[BaseException] | tuple[type[BaseException], ...],
                 match: str | None = None) -> Iterator[None]:
    """Run code that must fail: print the exception's type and message, and raise if it does not fail.

    Lets a lesson show an error on purpose while "Run All" still reaches the last cell
    (Lesson 00, §2; used throughout Lesson 12). `expected` is required, so a check passes
    only on the failure it names; a different exception type propagates.
    """
    types = expected if isinstance(expected, tuple) else (expected,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise InvalidArgumentError(f"expected must be an exception class or a tuple of them, got {expected!r}")
    try:
        yield
    except expected as exc:  # the failure the lesson wants to show
        if match is not None and match not in str(exc):
            raise AssertionError(
                f"expected a {_names(expected)} whose message contains {match!r}, got: {exc}") from exc
        print(f"{type(exc).__name__}: {str(exc).strip()}")
    else:
        raise AssertionError(f"expected {_names(expected)} to be raised, but the code ran without error")


def _names(expected) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)
