"""Encryption at rest for checkpoints: AES-GCM keys, encrypting and decrypting bytes (Lesson 03, §7).

An encrypted file is `MVTKENC1`, the model's name (2-byte length + UTF-8), a fresh 12-byte nonce,
then the AES-GCM ciphertext and tag; the header is authenticated too, so a file cannot be passed
off as another model's. `mvtk.checkpoint` re-exports the public names here; import them from there.
"""
from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mvtk.checkpoint._io import check_name
from mvtk.errors import DecryptionError, InvalidArgumentError, check_bytes, check_path
from mvtk.files import atomic_write

__all__ = ["ENCRYPTED_MAGIC", "KEY_ENV_VAR", "NONCE_BYTES", "check_key", "decrypt_bytes", "encrypt_bytes", "encrypted_for",
           "load_key", "new_key"]

ENCRYPTED_MAGIC = b"MVTKENC1"      # first bytes of an encrypted checkpoint
NONCE_BYTES = 12                   # AES-GCM's standard nonce size; a fresh random one per save
KEY_ENV_VAR = "MVTK_CHECKPOINT_KEY"  # base64 of a 16/24/32-byte AES key


def new_key(key_file: str | os.PathLike | None = None) -> bytes:
    """A fresh random 256-bit AES key; written as base64 to `key_file` (mode 600) if given (Lesson 03, §7).

    Refuses to overwrite an existing key file: losing a key loses every model it encrypted.
    """
    key = AESGCM.generate_key(bit_length=256)
    if key_file is not None:
        check_path(key_file, "key_file")
        if Path(key_file).exists():
            raise InvalidArgumentError(f"key file {str(key_file)!r} already exists; refusing to overwrite a key")
        with atomic_write(key_file) as tmp:
            os.chmod(tmp, 0o600)  # owner-only before the key is in it
            tmp.write_bytes(base64.urlsafe_b64encode(key) + b"\n")
    return key


def load_key(key_file: str | os.PathLike | None = None, *, env_var: str = KEY_ENV_VAR) -> bytes:
    """The AES key from `key_file`, else from the environment variable `env_var` (base64) (Lesson 03, §7)."""
    if key_file is not None:
        if not check_path(key_file, "key_file").is_file():
            raise InvalidArgumentError(f"key file {str(key_file)!r} does not exist; make one with new_key(path)")
        text, source = Path(key_file).read_bytes(), f"key file {str(key_file)!r}"  # bytes: a binary file is no crash
    else:
        check_name(env_var, "env_var")
        text, source = os.environ.get(env_var), f"${env_var}"
        if text is None:
            raise InvalidArgumentError(f"no encryption key: set ${env_var} to a base64 key or pass key_file= "
                                       "(make one with mvtk.checkpoint.new_key(path))")
    try:
        raw = text if isinstance(text, bytes) else text.encode("ascii")
        key = base64.urlsafe_b64decode(raw.strip().decode("ascii").encode("ascii"))
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidArgumentError(f"{source} is not base64 text") from None
    return check_key(key, source)


def encrypt_bytes(data: bytes, key: bytes, name: str) -> bytes:
    """AES-GCM encrypt `data` with a fresh nonce; the header naming the model is authenticated too (Lesson 03, §7)."""
    check_bytes(data, "data")
    check_key(key, "key")
    if not isinstance(name, str) or not name or len(name.encode()) > 1024:
        raise InvalidArgumentError(f"name must be a non-empty str naming the model, got {name!r}")
    label = name.encode("utf-8")
    header = ENCRYPTED_MAGIC + len(label).to_bytes(2, "little") + label
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + AESGCM(key).encrypt(nonce, data, header)


def decrypt_bytes(blob: bytes, key: bytes, name: str | None = None, *, source: str = "data") -> bytes:
    """Decrypt encrypt_bytes' output; DecryptionError for a wrong key, another model or tampering (Lesson 03, §7)."""
    check_bytes(blob, "blob")
    check_key(key, "key")
    check_name(name, "name", optional=True)
    check_name(source, "source")
    header, stored, nonce, ciphertext = _parse_encrypted(bytes(blob), source)
    if name is not None and name != stored:
        raise DecryptionError(f"{source!r} is encrypted for model {stored!r}, not {name!r}")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise DecryptionError(f"cannot decrypt {source!r}: wrong key, or the file was changed after it was "
                              "encrypted (AES-GCM authentication failed)") from None


def encrypted_for(blob: bytes, *, source: str = "data") -> str:
    """The model name in the header of encrypt_bytes' output; authenticated only by decrypt_bytes (Lesson 03, §7)."""
    return _parse_encrypted(bytes(check_bytes(blob, "blob")), source)[1]


def _parse_encrypted(blob: bytes, source: str) -> tuple[bytes, str, bytes, bytes]:
    if not blob.startswith(ENCRYPTED_MAGIC):
        raise DecryptionError(f"{source!r} is not an mvtk encrypted file (it does not start with {ENCRYPTED_MAGIC!r})")
    start = len(ENCRYPTED_MAGIC) + 2
    end = start + int.from_bytes(blob[len(ENCRYPTED_MAGIC):start], "little")
    if len(blob) < end + NONCE_BYTES + 16:
        raise DecryptionError(f"{source!r} is truncated: shorter than its header, nonce and tag")
    try:
        stored = blob[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError(f"{source!r} has a damaged header (the model name is not UTF-8)") from None
    return blob[:end], stored, blob[end:end + NONCE_BYTES], blob[end + NONCE_BYTES:]


def check_key(key, source: str = "key") -> bytes:
    """`key` if it is a 16, 24 or 32-byte AES key; else an InvalidArgumentError naming `source` (Lesson 03, §7)."""
    if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise InvalidArgumentError(f"{source} must be a 16, 24 or 32-byte AES key, got {size}")
    return key
