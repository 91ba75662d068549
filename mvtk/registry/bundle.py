"""Moving versions between registries: a bundle folder, written whole and read back verified (Lesson 04, §7).

A bundle is a folder that another registry can import: `bundle.json` (every version's full record,
the aliases and their history), `bundle.json.sha256` (its checksum), `bundle.json.sig` when the
exporting registry signs (Ed25519 over the manifest), and `blobs/` with the weights (and programs)
named by their SHA-256. `read_bundle` checks everything before the registry writes anything: the
manifest's checksum (and signature, given a verify key), each record's fields and signature, each
file's SHA-256 and that the weights hold the tensors the record lists. A checksum catches damage; only a
signature catches a deliberate edit, since whoever edits the manifest can recompute its checksum.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from mvtk.checkpoint import check_pt2_archive, sign_statement, verify_statement
from mvtk.errors import ExportError, IntegrityError, InvalidArgumentError, RegistryError, check_path
from mvtk.files import sha256_bytes, write_bytes_atomic
from mvtk.registry.blobs import BLOB_DIR, BLOB_SUFFIX, PROGRAM_SUFFIX
from mvtk.registry.recipe import CLASS_PATH_PATTERN
from mvtk.registry.records import (ALIAS_PATTERN, ModelVersion, check_alias, check_name, check_version_number,
                                   is_sha256, version_statement)

__all__ = ["BUNDLE_FORMAT", "MANIFEST", "BUNDLE_PREFIX", "BundleModel", "version_record", "write_bundle",
           "read_bundle"]

BUNDLE_FORMAT = "mvtk-registry-bundle/1"
MANIFEST = "bundle.json"
BUNDLE_PREFIX = b"mvtk-registry-bundle/1\n"  # what a bundle's signature signs: this + the manifest's bytes
ACTIONS = ("set", "promote", "rollback", "remove")


@dataclass
class BundleModel:
    """One name's part of a bundle: versions (oldest first), aliases, alias history, files (Lesson 04, §7)."""
    versions: list[ModelVersion]
    aliases: dict[str, int]
    history: list[dict]                                   # alias events: alias, action, version, previous, at
    last_version: int                                     # the highest number the source ever gave
    files: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)  # (sha256, suffix) -> bytes


def version_record(mv: ModelVersion) -> dict:
    """A version's full record as JSON values, all but its name (Lesson 04, §7)."""
    record = {key: getattr(mv, key) for key in ModelVersion.__dataclass_fields__ if key != "name"}
    record["tensor_keys"] = list(mv.tensor_keys)
    record["modules"] = [list(m) for m in mv.modules]
    return record


def write_bundle(folder: str | os.PathLike, models: dict[str, BundleModel],
                 signing_key: Ed25519PrivateKey | None = None) -> Path:
    """Write `models` as a bundle at `folder`, which must not exist yet; all of it or nothing (Lesson 04, §7).

    The files are written into a temporary folder beside it, which is then renamed into place. The
    folder it goes in must exist: nothing is created for you (InvalidArgumentError naming it).
    """
    folder = check_path(folder, "folder")
    if os.path.lexists(folder):
        raise InvalidArgumentError(f"{str(folder)!r} exists already; export into a new folder")
    if not folder.parent.is_dir():
        raise InvalidArgumentError(f"folder {str(folder)!r}: the folder {str(folder.parent)!r} it goes in does not "
                                   "exist; create it first (nothing is created for you)")
    manifest = {"format": BUNDLE_FORMAT, "models": {
        name: {"aliases": model.aliases, "alias_history": model.history, "last_version": model.last_version,
               "versions": [version_record(mv) for mv in model.versions]} for name, model in models.items()}}
    data = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as exc:  # no permission, a full disk
        raise RegistryError(f"cannot write the bundle {str(folder)!r}: {exc.strerror or exc}") from exc
    try:
        for model in models.values():
            for (sha256, suffix), blob in model.files.items():
                write_bytes_atomic(staging / BLOB_DIR / f"{sha256}{suffix}", blob)
        write_bytes_atomic(staging / MANIFEST, data)
        write_bytes_atomic(staging / f"{MANIFEST}.sha256", f"{sha256_bytes(data)}  {MANIFEST}\n".encode())
        if signing_key is not None:
            write_bytes_atomic(staging / f"{MANIFEST}.sig", sign_statement(BUNDLE_PREFIX + data, signing_key).encode())
        os.rename(staging, folder)
    except OSError as exc:
        raise RegistryError(f"cannot write the bundle {str(folder)!r}: {exc.strerror or exc}; nothing was "
                            "left there") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_bundle(folder: str | os.PathLike, verify_key: Ed25519PublicKey | None = None) -> dict[str, BundleModel]:
    """Read and verify a bundle written by write_bundle; nothing is returned unless all of it checks out (Lesson 04, §7).

    IntegrityError when the manifest or a file differs from its SHA-256, SignatureError (with
    `verify_key`) when the manifest or a version is unsigned or its signature fails, RegistryError
    when a record is malformed or the weights do not hold the tensors it lists.
    """
    folder = check_path(folder, "folder")
    label = f"bundle {str(folder)!r}"
    data, recorded = _read(folder / MANIFEST, label), _read(folder / f"{MANIFEST}.sha256", label)
    if recorded.decode("ascii", "replace").split("  ")[0].strip() != sha256_bytes(data):
        raise IntegrityError(f"{label}: {MANIFEST} does not match the SHA-256 in {MANIFEST}.sha256: it was "
                             "damaged or edited after export; export it again")
    if verify_key is not None:
        signature = folder / f"{MANIFEST}.sig"
        verify_statement(BUNDLE_PREFIX + data, signature.read_text("ascii") if signature.is_file() else None,
                         verify_key, f"{label} ({MANIFEST})")
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{label}: {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise RegistryError(f"{label}: {MANIFEST} is not an mvtk registry bundle (format {BUNDLE_FORMAT!r})")
    models = manifest.get("models")
    if not isinstance(models, dict) or not models:
        raise RegistryError(f"{label} holds no models")
    return {check_name(name, f"{label}: model name"): _model(folder, label, name, entry, verify_key)
            for name, entry in models.items()}


# -- helpers ------------------------------------------------------------------------------------------------------


def _read(path: Path, label: str) -> bytes:
    try:
        if path.exists() and not path.is_file():  # a folder, a fifo (reading one would wait forever)
            raise RegistryError(f"{label}: {path.name} is not a file")
        return path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{label}: {path.name} is missing; is this a folder written by Registry.export_versions?") from None
    except OSError as exc:
        raise RegistryError(f"{label}: cannot read {path.name}: {exc.strerror or exc}") from exc


def _model(folder: Path, label: str, name: str, entry, verify_key) -> BundleModel:
    if not isinstance(entry, dict) or not isinstance(entry.get("versions"), list) or not entry["versions"]:
        raise RegistryError(f"{label}: model {name!r} has no list of versions")
    versions = [_version(label, name, record) for record in entry["versions"]]
    numbers = [mv.version for mv in versions]
    if numbers != sorted(set(numbers)):
        raise RegistryError(f"{label}: the versions of {name!r} are not unique and ascending: {numbers}")
    last = check_version_number(entry.get("last_version", numbers[-1]), f"{label}: last_version of {name!r}")
    if last < numbers[-1]:
        raise RegistryError(f"{label}: last_version {last} of {name!r} is below its version {numbers[-1]}")
    aliases = entry.get("aliases", {})
    if not isinstance(aliases, dict) or any(v not in numbers for v in aliases.values()):
        raise RegistryError(f"{label}: the aliases of {name!r} must map alias names to versions in the bundle")
    for alias in aliases:
        check_alias(alias, f"{label}: alias of {name!r}")
    history = entry.get("alias_history", [])
    if not isinstance(history, list) or not all(_is_event(e) for e in history):
        raise RegistryError(f"{label}: the alias history of {name!r} is malformed")
    model = BundleModel(versions, dict(aliases), [{k: e[k] for k in ("alias", "action", "version", "previous", "at")}
                                                   for e in history], last)
    for mv in versions:
        if verify_key is not None:
            verify_statement(version_statement(mv), mv.signature, verify_key, f"{mv.ref} in {label}")
        weights = _blob(folder, label, mv, mv.sha256, BLOB_SUFFIX)
        try:
            keys = set(safetensors_load(weights))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise RegistryError(f"{label}: the weights of {mv.ref} are not a safetensors file ({exc})") from None
        if keys != set(mv.tensor_keys):
            raise RegistryError(f"{label}: the weights of {mv.ref} hold other tensors than its record lists")
        model.files[(mv.sha256, BLOB_SUFFIX)] = weights
        if mv.program_sha256 is not None:
            program = _blob(folder, label, mv, mv.program_sha256, PROGRAM_SUFFIX)
            try:
                check_pt2_archive(program, f"the program of {mv.ref} in {label}")
            except ExportError as exc:
                raise RegistryError(str(exc)) from None
            model.files[(mv.program_sha256, PROGRAM_SUFFIX)] = program
    return model


def _blob(folder: Path, label: str, mv: ModelVersion, sha256: str, suffix: str) -> bytes:
    data = _read(folder / BLOB_DIR / f"{sha256}{suffix}", label)
    if sha256_bytes(data) != sha256:
        raise IntegrityError(f"{label}: {BLOB_DIR}/{sha256[:12]}...{suffix} of {mv.ref} does not match its SHA-256: "
                             "the file was damaged or edited after export")
    return data


# field -> (check, what it must be): a record's shape, checked before any value is used
_STR, _OPT_STR = (lambda v: isinstance(v, str)), (lambda v: v is None or isinstance(v, str))
_DICT, _OPT_DICT = (lambda v: isinstance(v, dict)), (lambda v: v is None or isinstance(v, dict))
FIELDS = {
    "version": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a version number"),
    "sha256": (is_sha256, "a SHA-256"),
    "tensor_keys": (lambda v: isinstance(v, list) and v and all(isinstance(k, str) for k in v), "a list of str"),
    "architecture": (_OPT_DICT, "a dict or null"), "metrics": (_DICT, "a dict"), "params": (_DICT, "a dict"),
    "tags": (_DICT, "a dict"), "notes": (_STR, "a str"),
    "parent": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a version or null"),
    "created": (_STR, "a str"), "git_commit": (_OPT_STR, "a str or null"), "torch_version": (_STR, "a str"),
    "mvtk_version": (_STR, "a str"), "data_fingerprint": (lambda v: v is None or is_sha256(v), "a SHA-256 or null"),
    "signature": (_OPT_STR, "a str or null"),
    "class_path": (lambda v: v is None or isinstance(v, str) and CLASS_PATH_PATTERN.fullmatch(v), "'module:Class' or null"),
    "init_args": (_OPT_DICT, "a dict or null"),
    "modules": (lambda v: isinstance(v, list) and all(isinstance(m, list) and len(m) == 3
                                                       and all(isinstance(x, str) for x in m) for m in v),
                "a list of [name, type, extra_repr]"),
    "program_sha256": (lambda v: v is None or is_sha256(v), "a SHA-256 or null"),
}


def _version(label: str, name: str, record) -> ModelVersion:
    if not isinstance(record, dict) or set(record) != set(FIELDS):
        extra = sorted(set(record) ^ set(FIELDS)) if isinstance(record, dict) else type(record).__name__
        raise RegistryError(f"{label}: a version record of {name!r} is malformed (fields differ: {extra})")
    for key, (check, what) in FIELDS.items():
        if not check(record[key]):
            raise RegistryError(f"{label}: {name} v{record.get('version')}: {key} must be {what}, got {record[key]!r:.80}")
    return ModelVersion(name=name, **{**record, "tensor_keys": tuple(record["tensor_keys"]),
                                      "modules": tuple(tuple(m) for m in record["modules"])})


def _is_event(event) -> bool:
    if not isinstance(event, dict) or not {"alias", "action", "version", "previous", "at"} <= set(event):
        return False
    numbers = all(v is None or isinstance(v, int) and not isinstance(v, bool) for v in (event["version"],
                                                                                         event["previous"]))
    return (isinstance(event["alias"], str) and ALIAS_PATTERN.fullmatch(event["alias"]) is not None
            and event["action"] in ACTIONS and numbers and isinstance(event["at"], str))
