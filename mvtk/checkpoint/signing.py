"""Tamper evidence: Ed25519 signatures of files and statements with a key the attacker lacks (Lesson 03, §7).

A SHA-256 inside a file detects accidental corruption only: whoever edits the file can compute and
store a new one. A signature made with a private key can be checked by anyone with the public key,
and cannot be re-made after an edit without the private key. A signed file `f` gets a detached
`f.sig` (JSON: algorithm, the file's SHA-256, the signing key's id, the signature). What a
signature does not do: hide the content (that is encryption), or help once the private key leaks.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mvtk.checkpoint._io import writing
from mvtk.errors import InvalidArgumentError, SignatureError, check_path
from mvtk.files import atomic_write, sha256_file, write_bytes_atomic

__all__ = ["SIGNATURE_SUFFIX", "key_id", "load_private_key", "load_public_key", "new_signing_key",
           "sign_file", "sign_statement", "signature_path", "verify_file", "verify_statement"]

SIGNATURE_SUFFIX = ".sig"          # model.pt is signed by model.pt.sig
ALGORITHM = "ed25519"
FILE_CONTEXT = b"mvtk-file-sha256:"  # what a file signature signs: this prefix + the file's SHA-256 (hex)


def new_signing_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> tuple[Path, Path]:
    """Make an Ed25519 key pair: the private key (PEM, mode 600) and the public key to share (Lesson 03, §7).

    Refuses to overwrite an existing private key: files signed with it could no longer be re-signed.
    """
    private_path, public_path = check_path(private_path, "private_path"), check_path(public_path, "public_path")
    if private_path.exists():
        raise InvalidArgumentError(f"private key file {str(private_path)!r} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    with atomic_write(private_path) as tmp:
        os.chmod(tmp, 0o600)  # owner-only before the key is in it
        tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    write_bytes_atomic(public_path, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read a private key written by new_signing_key; a clear error names a missing or wrong file (Lesson 03, §7)."""
    key = _load_pem(path, "private", serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"key file {str(path)!r} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Read a public key written by new_signing_key; a clear error names a missing or wrong file (Lesson 03, §7)."""
    key = _load_pem(path, "public", serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgumentError(f"key file {str(path)!r} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short fingerprint of a key pair (16 hex digits of the public key's SHA-256), the same for both halves (Lesson 03, §7)."""
    public = _public(key)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_statement(statement: bytes, private_key: Ed25519PrivateKey) -> str:
    """The base64 Ed25519 signature of `statement` (e.g. "digits v3 has weights <sha256>") (Lesson 04, §6)."""
    if not isinstance(statement, bytes):
        raise InvalidArgumentError(f"statement must be bytes, got {type(statement).__name__}")
    if not isinstance(private_key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"private_key must be an Ed25519 private key (load_private_key), "
                                   f"got {type(private_key).__name__}")
    return base64.b64encode(private_key.sign(statement)).decode("ascii")


def verify_statement(statement: bytes, signature: str | None, public_key: Ed25519PublicKey, what: str) -> None:
    """Raise SignatureError naming `what` unless `signature` signs `statement` under `public_key` (Lesson 04, §6)."""
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidArgumentError(f"public_key must be an Ed25519 public key (load_public_key), "
                                   f"got {type(public_key).__name__}")
    if not signature:
        raise SignatureError(f"{what} is not signed; a signature from key {key_id(public_key)} is required")
    try:
        public_key.verify(base64.b64decode(signature, validate=True), statement)
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what}: the signature does not match key {key_id(public_key)}: it was changed "
                             f"after signing, or signed with another key") from exc


def signature_path(path: str | os.PathLike) -> Path:
    """Where the detached signature of `path` lives: `path` + '.sig' (Lesson 03, §7)."""
    path = check_path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def sign_file(path: str | os.PathLike, private_key: Ed25519PrivateKey, *, sha256: str | None = None) -> Path:
    """Sign the file's SHA-256 and write the signature beside it as `path.sig`, atomically (Lesson 03, §7).

    Pass `sha256` when the caller has just hashed the bytes it wrote (no second read of the file).
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"private_key must be an Ed25519 private key (load_private_key), "
                                   f"got {type(private_key).__name__}")
    digest = sha256 if sha256 is not None else sha256_file(check_path(path))
    record = {"algorithm": ALGORITHM, "sha256": digest, "key_id": key_id(private_key),
              "signature": sign_statement(FILE_CONTEXT + digest.encode(), private_key)}
    with writing(signature_path(path)) as tmp:  # a full disk reads as for any checkpoint file
        tmp.write_bytes((json.dumps(record, indent=1) + "\n").encode())
    return signature_path(path)


def verify_file(path: str | os.PathLike, public_key: Ed25519PublicKey, *, sha256: str | None = None) -> str:
    """Check `path.sig` against the file and `public_key`; returns the verified SHA-256 (Lesson 03, §7).

    Pass `sha256` when the caller has already hashed the bytes it is about to use (no second read).
    Raises SignatureError if the signature is missing, unreadable, made by another key, or made
    for other content.
    """
    path, sig = check_path(path), signature_path(path)
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidArgumentError(f"public_key must be an Ed25519 public key (load_public_key), "
                                   f"got {type(public_key).__name__}")
    if not sig.is_file():
        raise SignatureError(f"{str(path)!r} has no signature file {sig.name!r}; "
                             f"a signature from key {key_id(public_key)} is required")
    try:
        record = json.loads(sig.read_bytes())
        signed_digest, signature = record["sha256"], record["signature"]
        if record.get("algorithm") != ALGORITHM or not isinstance(signed_digest, str):
            raise ValueError("not an mvtk ed25519 signature")
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"signature file {str(sig)!r} is not an mvtk signature ({exc})") from exc
    verify_statement(FILE_CONTEXT + signed_digest.encode(), signature, public_key, f"signature of {str(path)!r}")
    actual = sha256 if sha256 is not None else sha256_file(path)
    if actual != signed_digest:
        raise SignatureError(f"{str(path)!r} was changed after it was signed: its SHA-256 is {actual[:12]}…, "
                             f"the signed one {signed_digest[:12]}…")
    return actual


def _public(key) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise InvalidArgumentError(f"expected an Ed25519 key, got {type(key).__name__}")


def _load_pem(given, kind: str, loader, **kwargs):
    path = Path(given) if isinstance(given, (str, os.PathLike)) else None
    if path is None or not path.is_file():
        raise InvalidArgumentError(f"no {kind} key file at {given!r}: expected the path of a PEM file")
    try:
        return loader(path.read_bytes(), **kwargs)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"key file {str(path)!r} is not a PEM {kind} key ({exc})") from exc
