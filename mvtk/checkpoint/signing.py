"""Tamper evidence: Ed25519 signatures of files and statements with a key the attacker lacks (Lesson 03, §7).

A checksum inside a file detects accidental corruption only: whoever edits the file can compute and
store a new one. A signature made with a private key can be checked by anyone with the public key,
and cannot be re-made after an edit without the private key. A signed file `f` gets a detached
`f.sig`: JSON holding the algorithm and a list of records, each the digest of a content of `f`
(under the key "blake3", what mvtk writes now, or "sha256", what earlier versions wrote), the
signing key's id and the signature of that digest. `verify_file` accepts `f` if its digest is
that of a record whose signature verifies. Normally there is one record; `replacing_signed`
(how save_checkpoint and save_weights re-save a signed file) briefly holds two, so that a crash at
any instant leaves the file on disk with a record that verifies it. What a signature does not do:
hide the content (that is encryption), or help once the private key leaks.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mvtk import files
from mvtk.checkpoint._io import HASHES, check_digest, digest_bytes, digest_file, locked, writing
from mvtk.errors import InvalidArgumentError, SignatureError, check_path

__all__ = ["SIGNATURE_SUFFIX", "check_signing_key", "check_verify_key", "file_record", "key_id", "load_private_key",
           "load_public_key", "new_signing_key", "reading_signed", "record_digest",
           "read_signature", "replacing_signed", "sign_file", "sign_statement", "signature_path", "verify_file",
           "verify_statement", "write_signature"]

SIGNATURE_SUFFIX = ".sig"          # model.pt is signed by model.pt.sig
ALGORITHM = "ed25519"
FILE_CONTEXT = "mvtk-file-{}:"     # a file signature signs this ("mvtk-file-blake3:") + the file's digest (hex)
READ_ATTEMPTS = 5                  # reading_signed: reads of a file whose re-save kept racing the check, then an error
T = TypeVar("T")


def new_signing_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> tuple[Path, Path]:
    """Make an Ed25519 key pair: the private key (PEM, mode 600) and the public key to share (Lesson 03, §7).

    Refuses, writing nothing, when either key file exists (files signed with an existing private
    key could no longer be re-signed; replacing a public key others hold breaks their checks) or
    when both paths name one file. If writing the public key fails, the new private key is removed.
    """
    private_path, public_path = check_path(private_path, "private_path"), check_path(public_path, "public_path")
    same = private_path.resolve() == public_path.resolve()
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(private_path, public_path)  # hard links to one file
    if same:
        raise InvalidArgumentError(f"private_path {str(private_path)!r} and public_path {str(public_path)!r} are the "
                                   "same file: the public key would overwrite the private key; give two paths")
    for label, path in (("private", private_path), ("public", public_path)):
        if os.path.lexists(path):
            raise InvalidArgumentError(f"{label} key file {str(path)!r} already exists; refusing to overwrite a key "
                                       "(nothing was written)")
    key = Ed25519PrivateKey.generate()
    with files.writing(private_path) as tmp:
        os.chmod(tmp, 0o600)  # owner-only before the key is in it
        tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    try:
        with files.writing(public_path) as tmp:
            tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    except BaseException:
        private_path.unlink(missing_ok=True)  # a private key without its public half is of no use
        raise
    return private_path, public_path


def check_signing_key(value, name: str = "signing_key") -> Ed25519PrivateKey | None:
    """`value` if it is an Ed25519 private key or None; else an InvalidArgumentError naming `name` (Lesson 03, §7)."""
    if value is not None and not isinstance(value, Ed25519PrivateKey):
        raise InvalidArgumentError(f"{name} must be an Ed25519 private key (load_private_key) or None, "
                                   f"got {type(value).__name__}")
    return value


def check_verify_key(value, name: str = "verify_key") -> Ed25519PublicKey | None:
    """`value` if it is an Ed25519 public key or None; else an InvalidArgumentError naming `name` (Lesson 03, §7)."""
    if value is not None and not isinstance(value, Ed25519PublicKey):
        raise InvalidArgumentError(f"{name} must be an Ed25519 public key (load_public_key) or None, "
                                   f"got {type(value).__name__}")
    return value


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


def file_record(digest: str, private_key: Ed25519PrivateKey) -> dict:
    """One signed record of a `.sig` file: the digest, the key's id and the signature (Lesson 03, §7).

    `digest` is labelled, "blake3:<hex>" or "sha256:<hex>" (64 bare hex digits: a SHA-256); the
    record holds the hex under the hash's name, and the signature covers both.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"private_key must be an Ed25519 private key (load_private_key), "
                                   f"got {type(private_key).__name__}")
    algorithm, hex_digits = check_digest(digest, "digest")
    return {algorithm: hex_digits, "key_id": key_id(private_key),
            "signature": sign_statement(_statement(algorithm, hex_digits), private_key)}


def sign_file(path: str | os.PathLike, private_key: Ed25519PrivateKey, *, digest: str | None = None) -> Path:
    """Sign the file's BLAKE3 digest and write the signature beside it as `path.sig`, atomically (Lesson 03, §7).

    Pass `digest` ("blake3:<hex>") when the caller has just hashed the bytes it wrote (no second
    read of the file). To replace a signed file, use `replacing_signed`, which never leaves the
    file without a valid signature.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"private_key must be an Ed25519 private key (load_private_key), "
                                   f"got {type(private_key).__name__}")
    digest = digest if digest is not None else digest_file(check_path(path))
    return write_signature(path, [file_record(digest, private_key)])


@contextlib.contextmanager
def replacing_signed(path: str | os.PathLike, private_key: Ed25519PrivateKey, digest: str) -> Iterator[None]:
    """Around an atomic replacement of `path` by content of `digest`: keep it verifiable throughout (Lesson 03, §7).

    Two files cannot be replaced in one atomic step, so the signature goes through three states,
    each written atomically: before the block, `path.sig` holds the records that verify the file
    now on disk plus the new content's record; the block replaces the file; after it, `path.sig`
    holds the new record only. A crash at any instant leaves the file on disk (old or new) with a
    record that verifies it; a crash before the last step leaves the old record too, which only
    matters until the next save (it verifies the previous content, which was signed anyway). If the
    block raises, the previous `path.sig` is put back.
    The three steps hold `locked(path)` (a hidden `.name.lock` beside it): writers in other threads
    or processes of this machine wait, so two saves cannot interleave and leave the file of one with
    the signature of the other. That needs a file system with working flock (not NFS without it).
    Readers take no lock: `reading_signed` reads again if a save replaced the file meanwhile.
    """
    new = file_record(digest, private_key)
    with locked(path):
        yield from _replacing(path, new)


def _replacing(path, new: dict) -> Iterator[None]:
    """replacing_signed's three steps, run under its lock."""
    sig = signature_path(path)
    try:
        previous = sig.read_bytes() if sig.is_file() and not sig.is_symlink() else None
    except OSError:
        previous = None
    keep = []
    if previous is not None and Path(path).is_file():
        try:
            records = _parse_records(previous)
        except ValueError:
            records = []
        current = [r for r in records if record_digest(r) != record_digest(new)]
        on_disk = {}  # hash the file on disk only when some record could be for it, once per hash
        for record in current:
            algorithm = record_digest(record).partition(":")[0]
            on_disk.setdefault(algorithm, digest_file(path, algorithm))
            if record_digest(record) == on_disk[algorithm]:
                keep.append(record)
    write_signature(path, keep + [new])
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if previous is None:
                sig.unlink(missing_ok=True)
            else:
                with writing(sig) as tmp:
                    tmp.write_bytes(previous)
        raise
    if keep:
        write_signature(path, [new])


def reading_signed(read: Callable[[], T], path: str | os.PathLike) -> T:
    """`read()` (which reads `path` and verifies its signature), read again if a re-save raced it (Lesson 03, §7).

    A reader may get the file before a re-save and its `.sig` after it: a false "changed after it
    was signed". So when `read()` raises SignatureError and `path` or `path.sig` is no longer the
    file it was (inode, size or mtime changed), it runs again, up to READ_ATTEMPTS times in all; a
    file changed without its signature (tampering) is refused at once, as its files stay put.
    """
    attempt = 1
    while True:
        before = _identity(path)
        try:
            return read()
        except SignatureError:
            if attempt == READ_ATTEMPTS or _identity(path) == before:
                raise
        attempt += 1


def _identity(path) -> tuple:
    """(inode, device, size, mtime) of `path` and of `path.sig`, None for one that is missing."""
    found = []
    for item in (path, signature_path(path)):
        try:
            info = os.stat(item)
        except OSError:
            found.append(None)
        else:
            found.append((info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns))
    return tuple(found)


def record_digest(record: dict) -> str:
    """The labelled digest a `.sig` record signs, e.g. "blake3:<hex>" (Lesson 03, §7)."""
    algorithm = next(name for name in HASHES if name in record)
    return f"{algorithm}:{record[algorithm]}"


def read_signature(path: str | os.PathLike) -> list[dict]:
    """The records of `path.sig` (each: a digest, key_id, signature), unverified; SignatureError if unusable (Lesson 03, §7).

    The signature file must be a regular file: a symbolic link, a folder or a device is refused by name.
    """
    path = check_path(path)
    sig = signature_path(path)
    try:
        info = os.lstat(sig)
    except FileNotFoundError:
        raise SignatureError(f"{str(path)!r} has no signature file {sig.name!r}") from None
    except OSError as exc:
        raise SignatureError(f"cannot read signature file {str(sig)!r}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise SignatureError(f"signature file {str(sig)!r} is a symbolic link; refusing it: a signature must be a "
                             "regular file beside the file it signs")
    if stat.S_ISDIR(info.st_mode):
        raise SignatureError(f"signature file {str(sig)!r} is a folder, not a signature file; refusing it")
    if not stat.S_ISREG(info.st_mode):
        raise SignatureError(f"signature file {str(sig)!r} is not a regular file (a device, pipe or socket); "
                             "refusing it")
    try:
        fd = os.open(sig, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise SignatureError(f"signature file {str(sig)!r} changed into a non-regular file; refusing it")
            data = handle.read()
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise SignatureError(f"cannot read signature file {str(sig)!r}: {why}; refusing it") from None
    try:
        return _parse_records(data)
    except ValueError as exc:
        raise SignatureError(f"signature file {str(sig)!r} is not an mvtk signature ({exc})") from None


def verify_file(path: str | os.PathLike, public_key: Ed25519PublicKey, *, digest: str | None = None,
                data=None) -> str:
    """Check `path.sig` against the file and `public_key`; returns the verified labelled digest (Lesson 03, §7).

    The file passes if its digest is that of a record in `path.sig` whose signature verifies under
    `public_key` (a re-save briefly keeps the previous record too: see `replacing_signed`); records
    may hold a BLAKE3 (what mvtk writes) or a SHA-256 (what earlier versions wrote). Pass the bytes
    the caller is about to use as `data`, and their `digest` ("blake3:<hex>") if already computed:
    those bytes are checked, and the file is not read again. Raises SignatureError if the signature
    is missing, not a regular file, unreadable, made by another key, or made for other content.
    """
    path = check_path(path)
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidArgumentError(f"public_key must be an Ed25519 public key (load_public_key), "
                                   f"got {type(public_key).__name__}")
    known = {} if digest is None else dict([check_digest(digest, "digest")])  # algorithm -> hex of the bytes used
    try:
        records = read_signature(path)
    except SignatureError as exc:
        if "has no signature file" in str(exc):
            raise SignatureError(f"{exc}; a signature from key {key_id(public_key)} is required") from None
        raise
    signed = []
    for record in records:
        algorithm, _, hex_digits = record_digest(record).partition(":")
        try:
            verify_statement(_statement(algorithm, hex_digits), record["signature"], public_key,
                             f"signature of {str(path)!r}")
        except SignatureError as exc:
            failure = exc
            continue
        signed.append(record_digest(record))
    if not signed:
        raise failure
    used = dict.fromkeys(d.partition(":")[0] for d in signed)
    for algorithm in sorted(used, key=lambda name: name not in known):  # a hash already computed first
        if algorithm not in known:
            actual = digest_bytes(data, algorithm) if data is not None else digest_file(path, algorithm)
            known[algorithm] = actual.partition(":")[2]
        actual = f"{algorithm}:{known[algorithm]}"
        if actual in signed:
            return actual
    raise SignatureError(f"{str(path)!r} was changed after it was signed: its digest is {actual[:19]}…, "
                         f"the signed one {signed[-1][:19]}…")


def _parse_records(data: bytes) -> list[dict]:
    """The records of a `.sig` file's bytes: this format (a list) or the earlier one (one record); ValueError if neither."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("algorithm") != ALGORITHM:
        raise ValueError("not an mvtk ed25519 signature")
    records = document.get("records", [document])
    if not isinstance(records, list) or not records:
        raise ValueError("it holds no signed records")
    for record in records:
        if not (isinstance(record, dict) and sum(name in record for name in HASHES) == 1
                and isinstance(record.get("signature"), str)
                and all(isinstance(record[name], str) for name in HASHES if name in record)):
            raise ValueError(f"a record lacks its signature or one digest ({' or '.join(HASHES)})")
    return records


def write_signature(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write `records` (from file_record or read_signature) as `path.sig`, atomically; returns its path (Lesson 03, §7)."""
    if not isinstance(records, list) or not records:
        raise InvalidArgumentError(f"records must be a non-empty list of signed records, got {records!r}")
    sig = signature_path(path)
    with writing(sig) as tmp:  # a full disk reads as for any checkpoint file
        tmp.write_bytes((json.dumps({"algorithm": ALGORITHM, "records": records}, indent=1) + "\n").encode())
    return sig


def _statement(algorithm: str, hex_digits: str) -> bytes:
    """What a file record's signature signs: "mvtk-file-blake3:<hex>" (a SHA-256 record: as earlier versions)."""
    return FILE_CONTEXT.format(algorithm).encode() + hex_digits.encode()


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
