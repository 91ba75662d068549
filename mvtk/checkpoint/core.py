"""Save, load and verify a full training checkpoint: exact resume, safe loading, integrity (Lesson 03, §2, §4, §6).

A checkpoint is one file written by `torch.save` (a zip archive) that holds only tensors and plain
Python values, so `torch.load(path, weights_only=True)` opens it. `save_checkpoint` records a
checksum of those bytes in the zip's comment (the last bytes of the file) and writes atomically:
`mvtk-blake3:<hex>` since format version 2 (BLAKE3, a cryptographic hash that runs on every core),
`mvtk-sha256:<hex>` in files of version 1, which still load. `load_checkpoint` verifies the
checksum before anything is unpickled, and never unpickles code.

The checksum detects accidental corruption (a bad disk, a cut copy), not deliberate edits: anyone
can re-seal edited bytes with `seal()`. For tamper evidence, save with `signing_key=` (an Ed25519
private key) and load with `verify_key=` (its public key): the detached `path.sig` is checked
before anything is unpickled (Lesson 03, §7).
`mvtk.checkpoint` re-exports the public names here; import them from there.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import mmap
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mvtk.checkpoint._io import (HASHES, check_device, check_name, digest_bytes, first_line, history_dict, new_hasher,
                                 plain_dict, writing)
from mvtk.checkpoint.crypto import ENCRYPTED_MAGIC, check_key, decrypt_bytes, encrypt_bytes, encrypted_for
from mvtk.checkpoint.signing import (check_signing_key, check_verify_key, reading_signed, replacing_signed,
                                     verify_file)
from mvtk.env import git_commit, utc_now
from mvtk.errors import (ArchitectureMismatchError, CheckpointError, DecryptionError, IntegrityError,
                         InvalidArgumentError, check_int, check_module, check_bytes, check_path)
from mvtk.models import MODULE_PREFIX, strip_module_prefix, unwrap
from mvtk.train import History

__all__ = ["FORMAT", "FORMAT_VERSION", "check_plain", "check_state_dict_fits", "checkpoint_payload",
           "load_checkpoint", "read_checkpoint", "restore_rng_state", "rng_state", "save_checkpoint", "seal",
           "unseal"]

FORMAT = "mvtk-checkpoint"         # payload["format"]: tells an mvtk checkpoint from any other torch file
FORMAT_VERSION = 2                 # 2: sealed with BLAKE3; 1: with SHA-256 (still read)
SEAL_PREFIXES = {f"mvtk-{name}:".encode(): name for name in HASHES}  # the zip comment: a prefix + 64 hex digits
SEAL_LEN = 12 + 64                 # both prefixes are 12 bytes long
HASH_LABELS = {"blake3": "BLAKE3", "sha256": "SHA-256"}  # how messages name them
ZIP_MAGIC, EOCD_MAGIC = b"PK\x03\x04", b"PK\x05\x06"  # start of a zip file; its end-of-directory record
STATE_KEYS = ("model", "optimizer", "scheduler", "rng")  # what load_checkpoint restores, not returns
PLAIN = (str, int, float, bool, bytes, type(None))
CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)
MAX_DEPTH = 100                    # check_plain: how deeply containers may nest (pickle recurses once per level)
SHOW_KEYS = 8                      # how many keys an architecture-mismatch message lists per kind


# --- §2: a full training checkpoint ---------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, epoch: int, step: int = 0, history: History | dict | None = None,
                    loader_generator: torch.Generator | None = None, metrics: dict | None = None,
                    extra: dict | None = None, key: bytes | None = None, name: str | None = None,
                    signing_key: Ed25519PrivateKey | None = None) -> Path:
    """Write model, optimiser, scheduler, progress and RNG states to one file, atomically (Lesson 03, §2).

    The file replaces `path` only once complete; the BLAKE3 digest of its bytes is stored in it (it
    detects accidental corruption, not deliberate edits). With `key`, the file is AES-GCM encrypted for
    the model `name` (default: the model's class name) (Lesson 03, §7). With `signing_key` (an Ed25519
    private key, `load_private_key`), the file's BLAKE3 digest is signed into `path.sig`; re-saving over a
    signed file goes through `replacing_signed`, so a crash at any instant leaves the file on disk,
    old or new, with a signature that verifies it.
    Abandoned temporary files of earlier saves of `path` that were interrupted (their process has exited)
    are removed.
    """
    check_path(path)
    if key is not None:
        check_key(key)
    check_name(name, "name", optional=True)
    check_signing_key(signing_key)
    payload = checkpoint_payload(model, optimizer, scheduler, epoch=epoch, step=step, history=history,
                                 loader_generator=loader_generator, metrics=metrics, extra=extra)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    *parts, digest = _seal_parts(buffer.getbuffer())  # written as they are: no copy of a large model's bytes
    if key is not None:
        parts = [encrypt_bytes(b"".join(parts), key, name if name is not None else type(model).__name__)]
        digest = digest_bytes(parts[0])
    signed = contextlib.nullcontext() if signing_key is None else replacing_signed(path, signing_key, digest)
    with signed, writing(path) as tmp:
        with open(tmp, "wb") as handle:
            for part in parts:
                handle.write(part)
    return Path(path)


def checkpoint_payload(model: nn.Module, optimizer=None, scheduler=None, *, epoch: int, step: int = 0,
                       history=None, loader_generator=None, metrics=None, extra=None) -> dict:
    """The dict save_checkpoint stores: states plus metadata, checked to be plain types (Lesson 03, §2)."""
    check_module(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "state_dict", None)):
        raise InvalidArgumentError(f"scheduler must have a state_dict() method, got {type(scheduler).__name__}")
    check_int(epoch, "epoch", low=0)
    check_int(step, "step", low=0)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": rng_state(loader_generator),
        "epoch": epoch, "step": step, "history": history_dict(history),
        "metrics": plain_dict(metrics, "metrics"), "extra": plain_dict(extra, "extra"),
        "model_class": type(model).__name__, "torch_version": str(torch.__version__),
        "created": utc_now(), "git_commit": git_commit(),
    }
    check_plain(payload, "checkpoint")
    return payload


def rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """The states of the torch, CUDA, Python and NumPy RNGs and of the loader's generator (Lesson 03, §2)."""
    if loader_generator is not None and not isinstance(loader_generator, torch.Generator):
        raise InvalidArgumentError(f"loader_generator must be a torch.Generator (loader.generator), got "
                                   f"{type(loader_generator).__name__}")
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # the Mersenne-Twister words as int64 tensors: unpickled far faster than 625 Python ints
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }


def restore_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    """Put back the RNG states rng_state() recorded; the loader's too when its generator is given (Lesson 03, §4)."""
    torch.set_rng_state(state["torch"].cpu())
    for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if loader_generator is not None:
        loader_generator.set_state(state["loader"].cpu())


def check_plain(value, where: str = "value") -> None:
    """Raise unless `value` holds only tensors and plain values, all weights_only loading accepts (Lesson 03, §2).

    Containers may nest MAX_DEPTH deep and may not contain themselves (a cycle): both are named.
    """
    _check_plain(value, where, ())


def _check_plain(value, where: str, outer: tuple[int, ...]) -> None:
    """check_plain below the containers whose ids are `outer` (the path from the top)."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN or isinstance(value, (torch.dtype, torch.device)):
        return
    if type(value) in CONTAINERS:
        if id(value) in outer:
            raise InvalidArgumentError(f"{where} contains itself (a cycle, e.g. l.append(l)); a checkpoint holds "
                                       "only tree-shaped plain values: break the cycle")
        if len(outer) >= MAX_DEPTH:
            raise InvalidArgumentError(f"{where} nests containers more than {MAX_DEPTH} deep (the depth limit); "
                                       "flatten it")
        items, inner = value.items() if isinstance(value, dict) else enumerate(value), (*outer, id(value))
        for item_key, item in items:
            if isinstance(value, dict) and type(item_key) not in PLAIN:
                raise InvalidArgumentError(f"{where} has a key of type {type(item_key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{item_key!r}]", inner)
        return
    raise InvalidArgumentError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint holds only tensors and plain "
        "Python values (dict, list, tuple, str, int, float, bool, None) so torch.load(weights_only=True) opens it: "
        "convert it first (float(x), x.tolist(), dataclasses.asdict(x))")


# --- §2 and §6: loading, verified and safe --------------------------------------------------

def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, optimizer=None, scheduler=None, *,
                    map_location="cpu", loader_generator: torch.Generator | None = None, restore_rng: bool = True,
                    key: bytes | None = None, name: str | None = None,
                    verify_key: Ed25519PublicKey | None = None) -> dict:
    """Verify a checkpoint and restore it into the objects given; returns its metadata (Lesson 03, §2, §4).

    Changes the model's weights, the optimiser's and scheduler's state, and (with `restore_rng`)
    the global RNGs and `loader_generator`. Every check runs first: if an argument is wrong, the
    file is refused, the model does not fit, or a state asked for is missing or does not fit,
    nothing is changed. With no model, optimiser, scheduler or loader_generator given, only the
    metadata is read and no RNG is touched.

    A checkpoint saved from an nn.DataParallel/DDP wrapper (every key starts with `module.`) loads
    into the plain model, and a plain model's checkpoint into a wrapped one (into `model.module`), as
    mvtk.parallel.load_state_dict_any does (Lesson 05, §3); keys that fit as saved are loaded as saved.

    `verify_key` (an Ed25519 public key, `load_public_key`) requires a signature `path.sig` made
    with its private key; it is checked on the bytes read, before anything is unpickled
    (SignatureError if it is missing or does not match). Files of format version 1 (sealed and
    signed with SHA-256) verify as before.

    `key` is the AES key of an encrypted file (`load_key()`); a key given for a file that is not
    encrypted is refused (DecryptionError), so a plain file cannot be swapped in for an encrypted
    one. `name`, if given, must equal the model name the file was encrypted for.

    Returns everything in the checkpoint except the states it restored (model, optimizer,
    scheduler, rng): format, format_version, epoch, step, history (a dict: `History.from_dict`),
    metrics, extra, model_class, torch_version, created, git_commit (str, or None outside a git
    checkout), and for an encrypted file `encrypted_for`, the model name in its header.
    """
    check_path(path)
    if model is not None:
        check_module(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "load_state_dict", None)):
        raise InvalidArgumentError(f"scheduler must have a load_state_dict() method, got {type(scheduler).__name__}")
    if loader_generator is not None and not isinstance(loader_generator, torch.Generator):
        raise InvalidArgumentError(f"loader_generator must be a torch.Generator (loader.generator) or None, got "
                                   f"{type(loader_generator).__name__}")
    if not isinstance(restore_rng, bool):
        raise InvalidArgumentError(f"restore_rng must be True or False, got {restore_rng!r}")
    payload = read_checkpoint(path, map_location=map_location, key=key, name=name, verify_key=verify_key)
    source = str(path)
    restoring = any(target is not None for target in (model, optimizer, scheduler, loader_generator))
    restore_rng = restore_rng and restoring  # reading the metadata alone changes no RNG
    into, state = (None, None) if model is None else _fitting_state(model, payload["model"], source)
    for part, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is not None and payload[part] is None:
            raise CheckpointError(f"checkpoint {source!r} holds no {part} state (it was saved without {part}=); "
                                  f"pass {part}=None")
    if restore_rng and loader_generator is not None and payload["rng"]["loader"] is None:
        raise CheckpointError(f"checkpoint {source!r} holds no DataLoader generator state (it was saved without "
                              "loader_generator=); the shuffle order cannot be restored")
    if restore_rng:
        _check_rng(payload["rng"], loader_generator, source)
    # torch's Optimizer.load_state_dict checks that the state fits before it changes anything; a
    # scheduler's need not, so the scheduler goes first and is put back if the optimiser's fails
    previous = None if scheduler is None else copy.deepcopy(scheduler.state_dict())
    _load_state(scheduler, payload, "scheduler", source)
    try:
        _load_state(optimizer, payload, "optimizer", source)
    except CheckpointError:
        if scheduler is not None:
            scheduler.load_state_dict(previous)
        raise
    if into is not None:
        into.load_state_dict(state)
    if restore_rng:
        before = rng_state(loader_generator)
        try:
            restore_rng_state(payload["rng"], loader_generator)
        except Exception as exc:  # checked above; put back whatever was set if a state still does not fit
            restore_rng_state(before, loader_generator)
            raise CheckpointError(f"the RNG states in {source!r} cannot be restored: {first_line(exc)}") from None
    return {k: v for k, v in payload.items() if k not in STATE_KEYS}


def read_checkpoint(path: str | os.PathLike, *, map_location="cpu", key: bytes | None = None,
                    name: str | None = None, verify_key: Ed25519PublicKey | None = None) -> dict:
    """The whole verified payload of a checkpoint (states and metadata), loaded safely (Lesson 03, §6).

    `key`, `name` and `verify_key` as for load_checkpoint: with a key, the file must be encrypted;
    with a verify_key, it must be signed. The file is read once: its bytes are memory-mapped and
    hashed (BLAKE3 on every core; SHA-256 for a version-1 file), the checksum checked (and the
    signature), then torch.load maps the same file, so the tensors are not copied again.
    """
    check_path(path)
    if key is not None:
        check_key(key)
    check_name(name, "name", optional=True)
    check_verify_key(verify_key)
    if isinstance(map_location, (str, torch.device)):  # a dict or a function is torch.load's to check
        check_device(map_location, "map_location")
    source = str(path)
    signed = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # last.pt: its target's signature

    def read() -> tuple[object, str | None]:
        with _mapped(path, "checkpoint") as (data, same_file):
            if bytes(data[:len(ENCRYPTED_MAGIC)]) == ENCRYPTED_MAGIC:
                if key is None:
                    raise DecryptionError(f"checkpoint {source!r} is encrypted: pass key= (mvtk.checkpoint.load_key())")
                if verify_key is not None:
                    verify_file(signed, verify_key, data=data)
                whole = bytes(data)
                sealed = decrypt_bytes(whole, key, name, source=source)
                encrypted_name = encrypted_for(whole, source=source)
                _unseal(sealed, source)
                return _torch_load(io.BytesIO(sealed), source, map_location), encrypted_name
            if key is not None:
                raise DecryptionError(f"checkpoint {source!r} is not encrypted, but a key was given: refusing it (an "
                                      "unencrypted file may have been put in place of an encrypted one)")
            digest = _unseal(data, source)  # one pass over the bytes gives the sealed hash and the file's hash
            if verify_key is not None:
                verify_file(signed, verify_key, digest=digest, data=data)
            # Verified: now torch maps the very file just hashed (same inode), so nothing is read twice.
            return _torch_load(same_file, source, map_location, mmap=True), None

    # a signed file re-saved while it was read is read again, so a reader never sees a false alarm
    payload, encrypted_name = read() if verify_key is None else reading_signed(read, signed)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source!r} is a torch file but not an mvtk checkpoint (no format={FORMAT!r} entry)")
    version = check_int(payload.get("format_version"), f"format_version of checkpoint {source!r}", low=1,
                        error=CheckpointError)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {source!r} has format version {version}, newer than version "
                              f"{FORMAT_VERSION} that this mvtk reads: update mvtk to load it")
    if encrypted_name is not None:
        payload["encrypted_for"] = encrypted_name
    return payload


def seal(data: bytes, algorithm: str = "blake3") -> bytes:
    """torch.save bytes with their checksum written into the zip comment at the end (Lesson 03, §6).

    `algorithm` "blake3" is what save_checkpoint writes; "sha256" writes the seal of format version 1.
    This detects accidental corruption only: anyone who edits a file can seal it again. Signatures
    (`save_checkpoint(..., signing_key=)`) detect deliberate edits.
    """
    if algorithm not in HASHES:
        raise InvalidArgumentError(f"algorithm must be one of {HASHES}, got {algorithm!r}")
    return b"".join(_seal_parts(memoryview(check_bytes(data, "data")), algorithm)[:2])


def _seal_parts(view: memoryview, algorithm: str = "blake3") -> tuple[memoryview, bytes, str]:
    """(the archive up to its comment-length field, that field + the comment, the whole file's labelled digest)."""
    if len(view) < 22 or bytes(view[-22:-18]) != EOCD_MAGIC or bytes(view[-2:]) != b"\x00\x00":
        raise InvalidArgumentError("seal() expects the bytes of a torch.save zip archive with no comment")
    body = view[:-2]
    hasher = new_hasher(algorithm, len(body))
    hasher.update(body)
    comment = f"mvtk-{algorithm}:{hasher.hexdigest()}".encode("ascii")
    tail = len(comment).to_bytes(2, "little") + comment
    hasher.update(tail)
    return body, tail, f"{algorithm}:{hasher.hexdigest()}"


def unseal(data: bytes, source: str = "data") -> bytes:
    """Check the checksum seal() wrote; clear errors for empty, foreign, cut or changed files (Lesson 03, §6).

    The seal is BLAKE3, or SHA-256 in a file of format version 1. Returns `data` itself, unchanged
    (comment included), when the check passes: torch.load ignores the comment.
    The check detects accidental corruption; it is no tamper check, as anyone can seal() edited bytes.
    """
    _unseal(check_bytes(data, "data"), check_name(source, "source"))
    return data


def _unseal(data: bytes, source: str) -> str:
    """unseal()'s check; returns the whole file's labelled digest, computed in the same pass."""
    if not data:
        raise CheckpointError(f"checkpoint {source!r} is empty (0 bytes): the save that wrote it never finished")
    if bytes(data[:len(ZIP_MAGIC)]) != ZIP_MAGIC:
        raise CheckpointError(f"{source!r} is not a checkpoint: a torch.save file is a zip archive, "
                              f"this one starts with {bytes(data[:8])!r}")
    comment = bytes(data[-SEAL_LEN:])
    algorithm = SEAL_PREFIXES.get(comment[:SEAL_LEN - 64])
    if (algorithm is None or bytes(data[-SEAL_LEN - 22:-SEAL_LEN - 18]) != EOCD_MAGIC
            or bytes(data[-SEAL_LEN - 2:-SEAL_LEN]) != SEAL_LEN.to_bytes(2, "little")):  # the comment's length field
        if bytes(data[-22:-18]) == EOCD_MAGIC and bytes(data[-2:]) == b"\x00\x00":
            raise CheckpointError(f"{source!r} has no checksum record: it was written by torch.save, not "
                                  "save_checkpoint; open it with torch.load(path, weights_only=True)")
        raise CheckpointError(f"checkpoint {source!r} is truncated (or damaged at its end): the checksum record "
                              "save_checkpoint writes last is missing; use an earlier checkpoint")
    recorded = comment[SEAL_LEN - 64:].decode("ascii", errors="replace")
    hasher = new_hasher(algorithm, len(data))
    hasher.update(memoryview(data)[:-SEAL_LEN - 2])  # the bytes before the comment's length field
    actual = hasher.hexdigest()
    if actual != recorded:
        error = IntegrityError(f"checkpoint {source!r} failed its {HASH_LABELS[algorithm]} check: its bytes changed "
                               "after it was saved (a damaged disk or copy); do not use it")
        error.recorded, error.actual = recorded, actual
        raise error
    hasher.update(memoryview(data)[-SEAL_LEN - 2:])
    return f"{algorithm}:{hasher.hexdigest()}"


def check_state_dict_fits(model: nn.Module, state: dict, source: str = "state_dict") -> None:
    """Raise ArchitectureMismatchError listing missing, unexpected and reshaped keys (Lesson 03, §6)."""
    check_module(model)
    if not isinstance(state, dict):
        raise InvalidArgumentError(f"state must be a dict (a state_dict), got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                for k, v in expected.items() if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if not (missing or unexpected or reshaped):
        return
    lines = [f"{source!r} does not fit {type(model).__name__}: it was saved from a different architecture"]
    for label, keys in (("missing (in the model, not in the file)", missing),
                        ("unexpected (in the file, not in the model)", unexpected), ("shape mismatch", reshaped)):
        if keys:
            more = f" ... and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
            lines.append(f"  {label}: {', '.join(keys[:SHOW_KEYS])}{more}")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        lines.append("  hint: keys start with 'module.': it was saved from a DataParallel/DDP wrapper; "
                     "strip the prefix or save model.module (Lesson 05)")
    raise ArchitectureMismatchError("\n".join(lines))


# --- helpers ------------------------------------------------------------------------------

@contextlib.contextmanager
def _mapped(path: str | os.PathLike, what: str):
    """(the file's bytes, memory-mapped read-only; a path that opens that very file) while the block runs.

    The path is /proc/self/fd/N where Linux has it, so a file renamed over `path` meanwhile (another
    save) cannot slip in between the check and the load; elsewhere the path itself, checked to be the
    same file afterwards.
    """
    if not check_path(path).is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {exc.strerror or first_line(exc)}") from None
    try:
        proc = f"/proc/self/fd/{fd}"
        same_file = proc if os.path.exists(proc) else os.fspath(path)
        stat = os.fstat(fd)
        if stat.st_size == 0:
            yield b"", same_file
            return
        # Not closed by hand: slices of it may live on in a traceback; it closes once the last one is gone.
        yield memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ)), same_file
        if same_file != proc and (os.stat(path).st_ino, os.stat(path).st_dev) != (stat.st_ino, stat.st_dev):
            raise CheckpointError(f"{what} {str(path)!r} was replaced while it was being loaded; load it again")
    finally:
        os.close(fd)


def _torch_load(source_file, source: str, map_location, mmap: bool = False) -> object:
    """torch.load(weights_only=True) with its refusals and damage turned into CheckpointErrors naming `source`."""
    try:
        return torch.load(source_file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {source!r} holds objects that safe loading (weights_only=True) refuses; "
                              f"nothing in it was run. {_unpickler_reason(exc)}") from None
    except Exception as exc:  # torch raises RuntimeError/ValueError for a damaged archive
        raise CheckpointError(f"checkpoint {source!r} cannot be read by torch.load: {first_line(exc)}") from None


def _check_rng(state, loader_generator, source: str) -> None:
    """Refuse RNG states restore_rng_state could not put back, before anything is changed."""
    try:
        ok = (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
              and isinstance(state["cuda"], (list, tuple)) and len(state["python"]) == 3
              and isinstance(state["python"][1], torch.Tensor) and len(state["numpy"]) == 5
              and isinstance(state["numpy"][1], torch.Tensor)
              and (loader_generator is None or (isinstance(state["loader"], torch.Tensor)
                                                and state["loader"].dtype == torch.uint8)))
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {source!r} holds RNG states in an unexpected form; "
                              "load it with restore_rng=False")


def _fitting_state(model: nn.Module, state: dict, source: str) -> tuple[nn.Module, dict]:
    """(module, state_dict) to load: as saved, or across a DataParallel/DDP wrapper's `module.` prefix.

    The plain model inside a wrapper takes the state with the prefix stripped from every key (when every
    key has it); if that does not fit either, the refusal is check_state_dict_fits' for the state as saved.
    """
    try:
        check_state_dict_fits(model, state, source)
        return model, state
    except ArchitectureMismatchError as refusal:
        prefixed = bool(state) and all(isinstance(k, str) and k.startswith(MODULE_PREFIX) for k in state)
        target = unwrap(model)
        if target is model and not prefixed:
            raise
        stripped = strip_module_prefix(state)
        try:
            check_state_dict_fits(target, stripped, source)
        except ArchitectureMismatchError:
            raise refusal from None
        return target, stripped


def _load_state(target, payload: dict, part: str, source: str) -> None:
    if target is None:
        return
    try:
        target.load_state_dict(payload[part])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"the {part} state in {source!r} does not fit the {part} given: "
                              f"{first_line(exc)}") from None


def _unpickler_reason(exc: BaseException) -> str:
    """The 'Unsupported global: ...' line of torch's long weights_only message, without its advice."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?: Please|\n|$)", str(exc))
    return match.group(1) if match else first_line(exc)
