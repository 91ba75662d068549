"""Weights without pickle: safetensors files with provenance metadata and a SHA-256 (Lesson 03, §5).

`save_weights` serializes with `safetensors.torch.save` in memory and writes the bytes through
mvtk's atomic writer, so a crash never leaves a half-written file or a stray temporary file
that a later save does not remove. The file's metadata holds `mvtk_sha256`: the SHA-256 of the
header (the tensor index: each tensor's name, dtype, shape and offsets, and the metadata without
`mvtk_sha256` itself, as canonical JSON) followed by every tensor byte. So a flipped byte
anywhere in the file is detected; `load_weights` recomputes it from the bytes it read, before
any tensor is used.
Like the checkpoint's seal, it detects accidental corruption, not deliberate edits: for those,
sign with `signing_key=` and load with `verify_key=` (Lesson 03, §7); the signature covers the
file's BLAKE3 digest (files signed by earlier versions, over their SHA-256, still verify).
`mvtk.checkpoint` re-exports the public names here; import them from there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import safetensors
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from mvtk.checkpoint._io import check_device, digest_bytes, first_line, plain_dict, writing
from mvtk.checkpoint.core import check_state_dict_fits
from mvtk.checkpoint.signing import (check_signing_key, check_verify_key, reading_signed, replacing_signed,
                                     verify_file)
from mvtk.env import git_commit, utc_now
from mvtk.errors import CheckpointError, IntegrityError, InvalidArgumentError, check_module, check_path

__all__ = ["WEIGHTS_SHA256_KEY", "check_plain_tensors", "load_weights", "save_weights", "weights_digest"]

WEIGHTS_SHA256_KEY = "mvtk_sha256"  # the metadata entry holding the SHA-256 of the index and tensor bytes
HEADER_LIMIT = 100 * 1024 * 1024     # safetensors' own limit on the JSON header
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # what safetensors stores; a subclass (torchao's Int8Tensor) it cannot


def save_weights(path: str | os.PathLike, model: nn.Module, metadata: dict[str, str] | None = None, *,
                 signing_key: Ed25519PrivateKey | None = None) -> Path:
    """Write the model's tensors as safetensors (no pickle) with provenance and a SHA-256, atomically (Lesson 03, §5).

    The metadata records torch version, time, git commit and `mvtk_sha256` (see `weights_digest`).
    With `signing_key` (Ed25519, `load_private_key`) the file is also signed into `path.sig` (Lesson 03, §7);
    a re-save keeps the file on disk verifiable at every instant (see `replacing_signed`).
    """
    check_path(path)
    check_module(model)
    check_plain_tensors(model, "save_weights", "save the float model and quantize_int8 it after load_weights, or "
                        "save the int8 model with save_checkpoint and load it into a quantize_int8 copy of the float "
                        "architecture")
    check_signing_key(signing_key)
    extra = plain_dict(metadata, "metadata")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise InvalidArgumentError(f"safetensors metadata must map str to str, got {extra!r}")
    if WEIGHTS_SHA256_KEY in extra:
        raise InvalidArgumentError(f"metadata key {WEIGHTS_SHA256_KEY!r} is reserved: save_weights writes the checksum")
    meta = {"format": "mvtk-weights", "model_class": type(model).__name__, "torch_version": str(torch.__version__),
            "created": utc_now()}
    commit = git_commit()
    if commit:
        meta["git_commit"] = commit
    meta.update(extra)
    tensors, stored = {}, set()
    for k, v in model.state_dict().items():  # tied weights share one storage, which safetensors refuses: copy
        v = v.detach().cpu()
        tensors[k] = v.clone(memory_format=torch.contiguous_format) if v.untyped_storage().data_ptr() in stored \
            else v.contiguous()
        stored.add(v.untyped_storage().data_ptr())
    unsealed = safetensors.torch.save(tensors, metadata=meta)
    meta[WEIGHTS_SHA256_KEY] = weights_digest(unsealed)  # adding the digest changes neither the rest nor the tensors
    data = safetensors.torch.save(tensors, metadata=meta)
    signed = contextlib.nullcontext() if signing_key is None else replacing_signed(path, signing_key,
                                                                                    digest_bytes(data))
    with signed, writing(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return Path(path)


def check_plain_tensors(model_or_state_dict: nn.Module | Mapping, where: str, fix: str) -> None:
    """Refuse tensor subclasses safetensors cannot store (quantize_int8's Int8Tensor), naming `fix` (Lesson 06, §6).

    Raises InvalidArgumentError naming `where`, the first such tensor and its class; anything that is not
    a module or a mapping is left to the caller's own checks.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if not isinstance(state, Mapping):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and type(value) not in PLAIN_TENSORS:
            cls = type(value)
            raise InvalidArgumentError(f"{where} cannot store {key!r}: it is a {cls.__module__}.{cls.__qualname__}, "
                                       "a tensor subclass (quantize_int8's int8 weights are one), and safetensors "
                                       f"holds plain tensors only; {fix}")


def weights_digest(data: bytes) -> str:
    """SHA-256 of a safetensors file's header (canonical JSON, without mvtk_sha256) and tensor bytes (Lesson 03, §5).

    The header is the tensor index (names, dtypes, shapes, offsets) and the metadata; the entry
    `mvtk_sha256` is left out, so the digest can be stored there. Raises ValueError for bytes
    that are not a safetensors file.
    """
    header, start = _header(data)
    header = dict(header)
    header["__metadata__"] = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != WEIGHTS_SHA256_KEY}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(memoryview(data)[start:])
    return digest.hexdigest()


def load_weights(path: str | os.PathLike, model: nn.Module | None = None, *, device="cpu",
                 verify_key: Ed25519PublicKey | None = None) -> dict[str, str]:
    """Load a save_weights file into `model` after checking its SHA-256 and fit; returns its metadata (Lesson 03, §5).

    The file is read once; its SHA-256 (`mvtk_sha256`) is checked on those bytes before any
    tensor is used (IntegrityError naming the file; a file too damaged to hold a readable record is a
    CheckpointError saying it is damaged). `device` is checked first (InvalidArgumentError,
    DeviceUnavailableError). With `verify_key` (Ed25519, `load_public_key`),
    `path.sig` must sign the file (SignatureError otherwise) (Lesson 03, §7). A safetensors file
    not written by save_weights has no checksum: open it with `safetensors.torch.load_file`.
    """
    check_path(path)
    if model is not None:
        check_module(model)
    check_verify_key(verify_key)
    device = check_device(device, "device")  # before the file is read: a bad device is not the file's fault
    source = str(path)
    signed = Path(path).resolve() if Path(path).is_symlink() else Path(path)

    def read() -> tuple[bytes, dict]:
        if not Path(path).is_file():
            raise CheckpointError(f"weights file {source!r} does not exist (or is not a file)")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read weights file {source!r}: {exc.strerror or first_line(exc)}") from None
        if not data:
            raise CheckpointError(f"weights file {source!r} is empty (0 bytes)")
        try:
            header, start = _header(data)
            metadata = dict(header.get("__metadata__") or {})
            actual = weights_digest(data)
        except ValueError as exc:
            raise CheckpointError(f"weights file {source!r} is damaged or not written by save_weights: it is not a "
                                  f"readable safetensors file ({exc})") from None
        recorded = metadata.get(WEIGHTS_SHA256_KEY)
        if recorded is None and (metadata.get("format") == "mvtk-weights"
                                 or WEIGHTS_SHA256_KEY.encode() in data[:start]):
            raise CheckpointError(f"weights file {source!r} is damaged: it was written by save_weights, but its "
                                  f"SHA-256 record ({WEIGHTS_SHA256_KEY!r}) cannot be read; do not use it")
        if recorded is None:
            raise CheckpointError(f"{source!r} has no SHA-256 record ({WEIGHTS_SHA256_KEY!r}): it was not written by "
                                  "save_weights; open it with safetensors.torch.load_file")
        if recorded != actual:
            error = IntegrityError(f"weights file {source!r} failed its SHA-256 check: its bytes changed after it was "
                                   "saved (a damaged disk or copy); do not use it")
            error.recorded, error.actual = recorded, actual
            raise error
        if verify_key is not None:
            verify_file(signed, verify_key, data=data)
        return data, metadata

    # a signed file re-saved while it was read is read again, so a reader never sees a false alarm
    data, metadata = read() if verify_key is None else reading_signed(read, signed)
    if model is not None:
        try:
            state = {k: v.to(device) for k, v in safetensors.torch.load(data).items()}
        except (safetensors.SafetensorError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{source!r} is not a readable safetensors file: {first_line(exc)}") from None
        check_state_dict_fits(model, state, source)
        model.load_state_dict(state)
    return metadata


def _header(data: bytes) -> tuple[dict, int]:
    """(the parsed JSON header of safetensors bytes, where the tensor bytes start); ValueError if malformed."""
    if len(data) < 8:
        raise ValueError("shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > HEADER_LIMIT or 8 + size > len(data):
        raise ValueError(f"its header length ({size} bytes) does not fit the file ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[8:8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError("its header is not a JSON object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in header.get("__metadata__", {}).items()):
        raise ValueError("its metadata does not map str to str")
    body = len(data) - 8 - size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            ok = (set(entry) == {"dtype", "shape", "data_offsets"} and isinstance(entry["dtype"], str)
                  and all(type(n) is int and n >= 0 for n in entry["shape"]) and len(entry["data_offsets"]) == 2
                  and all(type(n) is int for n in entry["data_offsets"])
                  and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1] <= body)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"its index entry {name!r} is not a tensor (dtype, shape and offsets in the file)")
    return header, 8 + size
