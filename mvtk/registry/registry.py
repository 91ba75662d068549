"""The `Registry` facade: a folder of model versions, aliases, diff, lineage, rollback (Lesson 04, §2-§7).

A registry is a folder, no server: `index.sqlite` (the index, `mvtk.registry.index`) holds names,
versions, metadata, aliases and the aliases' history; `blobs/` (the blob store,
`mvtk.registry.blobs`) holds the weights as safetensors files named by their SHA-256. `Registry`
checks every argument at entry, then coordinates the two: every write is one SQLite write
transaction, so several processes can register at once and a killed process leaves nothing
half-done.

Signed versions: a registry opened with a `signing_key` signs every version it registers (an
Ed25519 signature over the version's whole record, its weights' SHA-256 included); one opened with
a `verify_key` checks that signature before any weights are used. The SHA-256 alone detects
accidental corruption only: whoever can write the folder can edit a blob and store its new SHA-256
in the index with the stdlib's sqlite3. The signature cannot be re-made without the private key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mvtk.checkpoint import check_state_dict_fits, load_program
from mvtk.checkpoint.signing import load_private_key, load_public_key, sign_statement, verify_statement
from mvtk.errors import InvalidArgumentError, NotFoundError, RegistryError, SignatureError, check_path
from mvtk.files import write_bytes_atomic
from mvtk.models import build_model
from mvtk.registry.blobs import BLOB_DIR, BLOB_SUFFIX, PROGRAM_SUFFIX, BlobStore
from mvtk.registry.bundle import BundleModel, read_bundle, write_bundle
from mvtk.registry.diff import VersionDiff, compare_states
from mvtk.registry.index import RegistryIndex
from mvtk.registry.recipe import rebuild
from mvtk.registry.records import (AliasEvent, CheckReport, ImportResult, ModelVersion, check_alias, check_name,
                                   check_version_number, event_from_row, new_version_row, row_from_version,
                                   version_from_row, version_statement)
from mvtk.registry.text import Table, history_table, names_table, versions_table

if TYPE_CHECKING:
    from mvtk.data import ImageDataset

__all__ = ["Registry", "INDEX_FILE", "EXPORT_FORMAT", "BACKENDS", "checked_ref", "rollback_target", "load_key"]

INDEX_FILE = "index.sqlite"
EXPORT_FORMAT = "mvtk-registry-index/1"
BACKENDS: dict[str, type] = {}  # URI scheme -> Registry subclass; mlflow_backend adds 'http' and 'https' (Lesson 11)


class Registry:
    """A folder of model versions: SQLite index + content-addressed safetensors blobs (Lesson 04, §2).

    A `root` that is a URL opens the backend BACKENDS holds for its scheme instead, with the same calls:
    `Registry("http://127.0.0.1:5000")` is an MlflowRegistry on that MLflow server (Lesson 11, §6).
    `create=False` refuses a folder that holds no registry yet (the command line uses it). Only a
    folder without stored weights is ever initialised: an index that is missing or empty (or not
    mvtk's) beside blobs is a damaged registry, refused with a RegistryError naming it.
    `signing_key` (an Ed25519 private key, or the path of its PEM file from
    mvtk.checkpoint.signing.new_signing_key) signs every version registered through this object;
    `verify_key` (the public key, or its PEM path) makes every load, diff and export verify the
    version's signature first, raising SignatureError when it is missing or wrong, and makes check()
    list unsigned and badly signed versions.
    """

    def __new__(cls, root=None, *args, **kwargs):
        # Registry('http://host:port') opens the backend BACKENDS holds for the scheme, as Path(...) opens a PosixPath
        return object.__new__(_backend(root) if cls is Registry else cls)

    def __init__(self, root: str | os.PathLike, *, create: bool = True,
                 signing_key: Ed25519PrivateKey | str | os.PathLike | None = None,
                 verify_key: Ed25519PublicKey | str | os.PathLike | None = None):
        if not isinstance(root, (str, os.PathLike)):
            raise InvalidArgumentError(f"root must be a folder path, got {type(root).__name__}")
        self.signing_key = load_key(signing_key, Ed25519PrivateKey, load_private_key, "signing_key", "private")
        self.verify_key = load_key(verify_key, Ed25519PublicKey, load_public_key, "verify_key", "public")
        self.root = Path(root)
        self.index = self.root / INDEX_FILE
        self.blobs = BlobStore(self.root)
        if not self.index.is_file():
            if not create:
                raise RegistryError(f"no registry at {str(self.root)!r} (no {INDEX_FILE}); "
                                    f"create one with Registry({str(self.root)!r}) or pass --root")
            if self.root.exists() and not self.root.is_dir():
                raise InvalidArgumentError(f"registry root {str(self.root)!r} is a file, expected a folder")
            # blobs first, then the index: a process creating this registry meanwhile makes the index before any blob
            if self.blobs.holds_files() and not os.path.lexists(self.index):
                raise self._lost_index("missing")
            self.root.mkdir(parents=True, exist_ok=True)
        self._db = RegistryIndex(self.index, str(self.root), on_blank=lambda: self._blank_index(create))

    def _blank_index(self, create: bool) -> None:
        """Refuse an index with no tables unless this is a new registry: no weights stored, create=True."""
        if self.blobs.holds_files():
            raise self._lost_index("empty (it holds no mvtk tables)")
        if not create:
            raise RegistryError(f"no registry at {str(self.root)!r}: its index {str(self.index)!r} is empty (it holds "
                                f"no mvtk tables); restore {INDEX_FILE} from a backup, or create a registry with "
                                f"Registry({str(self.root)!r})")

    def _lost_index(self, state: str) -> RegistryError:
        return RegistryError(f"registry index {str(self.index)!r} is {state}, but {BLOB_DIR}/ beside it holds stored "
                             f"weights: the registry is damaged, not new; restore {INDEX_FILE} from a backup "
                             "(starting afresh here would reuse version numbers and let gc delete every weights "
                             "file); nothing was changed")

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def __reduce__(self):
        # pickles as its folder and keys: a worker process opens its own connection
        return (_reopen, (self.root, _raw(self.signing_key), _raw(self.verify_key)))

    def close(self) -> None:
        """Close this thread's connection to the index (a later call opens a new one) (Lesson 04, §2)."""
        self._db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- registering -------------------------------------------------------------------------------------

    def register(self, name: str, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], *,
                 architecture: dict | None = None, metrics: dict | None = None, params: dict | None = None,
                 tags: dict | None = None, notes: str = "", parent: int | None = None,
                 dataset: ImageDataset | str | None = None, init_args: dict | None = None,
                 program_example: tuple | torch.Tensor | None = None) -> ModelVersion:
        """Store the weights and metadata as the next version of `name` (1, 2, 3, ...) (Lesson 04, §2).

        Writes the blob (unless identical weights are already stored) and one index row, in one
        transaction. How to rebuild the model is recorded for any class: its class path
        ('module:QualName'), its constructor arguments and its module tree. The arguments are
        `init_args` when given, else what the model kept (mvtk.models.remember_init_args sets
        `model.init_args`; Lightning sets `model.hparams`), else its attributes named like the
        constructor's parameters; whichever is used must rebuild the same layers and tensor shapes.
        When none does, register refuses and says what to pass, unless `program_example` (a tuple of
        example inputs) is given: then a torch.export program is stored too, which load_model uses
        without the class. A state_dict registers the weights alone (`architecture` rebuilds a
        course model's). `architecture` is inferred for the course's models; `dataset` (an mvtk
        ImageDataset, or its fingerprint: a string of 64 lowercase hex digits from
        mvtk.data.fingerprint) is stored as its fingerprint; git commit, torch and mvtk versions and
        the time are recorded for you. With a signing key, the version's record is signed too.
        Raises RegistryError naming the file when the disk is full; nothing is registered then. Weights
        safetensors cannot store (quantize_int8's int8 tensors) are refused: register the float model.
        """
        row, data, program = new_version_row(
            name, model_or_state_dict, architecture=architecture, metrics=metrics, params=params, tags=tags,
            notes=notes, parent=parent, dataset=dataset, init_args=init_args, program_example=program_example)
        with self._db.write() as conn:
            if parent is not None:
                self._get(conn, name, parent, None)
            row["version"] = self._db.next_version(conn, name)
            if self.signing_key is not None:
                row["signature"] = sign_statement(version_statement(version_from_row(row)), self.signing_key)
            self.blobs.put(row["sha256"], data)
            if program is not None:
                self.blobs.put(row["program_sha256"], program, PROGRAM_SUFFIX)
            self._db.insert_version(conn, row)
        return version_from_row(row)

    def blob_path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live: blobs/<2 hex>/<sha256>.safetensors (Lesson 04, §2)."""
        return self.blobs.path(sha256)

    # -- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The registered model names, sorted (Lesson 04, §2)."""
        return self._db.names()

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first (Lesson 04, §2)."""
        check_name(name)
        with self._db.read() as conn:
            self._db.require_name(conn, name)
            rows = self._db.version_rows(conn, name)
        return [version_from_row(r) for r in rows]

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """One version: by number, by alias (also written 'name@alias'), or the latest (Lesson 04, §2)."""
        name, version, alias = checked_ref(name, version, alias)
        with self._db.read() as conn:
            return self._get(conn, name, version, alias)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of `name` and the version each points to (Lesson 04, §3)."""
        check_name(name)
        with self._db.read() as conn:
            self._db.require_name(conn, name)
            return self._db.aliases(conn, name)

    def load(self, name: str, version: int | None = None, alias: str | None = None, *,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The state_dict of a version, verified against its SHA-256 first; nothing is unpickled (Lesson 04, §6).

        Raises IntegrityError when the stored bytes changed since registration, RegistryError
        when the blob file is missing, and (with a verify key) SignatureError when the version is
        unsigned or its record or weights changed after signing.
        """
        return self.weights_of(self.verified(self.get(name, version, alias)), device)

    def weights_of(self, mv: ModelVersion, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the record `mv`, checked against its SHA-256; what every backend provides (Lesson 04, §6)."""
        return self.blobs.load(mv, device)

    def program_bytes_of(self, mv: ModelVersion) -> bytes:
        """The torch.export program bytes of the record `mv`, checked against their SHA-256 (Lesson 04, §6)."""
        return self.blobs.read(mv, mv.program_sha256, PROGRAM_SUFFIX)

    def load_model(self, name: str, version: int | None = None, alias: str | None = None, *,
                   device: torch.device | str | None = None, program: bool = False) -> nn.Module:
        """The version's model rebuilt, its verified weights loaded, in eval() mode (Lesson 04, §6).

        Course models are rebuilt with mvtk.models.build_model; any other class is imported from the
        recorded 'module:QualName' and built with the recorded constructor arguments. Importing runs
        that module's code, so load only from registries you trust (with a verify key, the class path
        and arguments are covered by the version's signature). A version stored with a torch.export
        program and no class recipe, or `program=True`, loads the program instead: no class needed.
        Verified like load(): checksum always, signature when the registry has a verify key.
        """
        mv = self.verified(self.get(name, version, alias))
        if program or (mv.architecture is None and mv.init_args is None and mv.program_sha256 is not None):
            return self._program(mv).to(device if device is not None else "cpu")
        if mv.architecture is not None:
            model = build_model(mv.architecture["name"], **mv.architecture.get("kwargs", {}))
        elif mv.class_path is not None and mv.init_args is not None:
            model = rebuild(mv.class_path, mv.init_args)
        else:
            raise RegistryError(f"{mv.ref} was registered without an architecture, so it cannot be rebuilt: it "
                                "records no class and constructor arguments and no program; use load() with your own "
                                "model class, or register the model with init_args= or program_example=")
        state = self.weights_of(mv)
        check_state_dict_fits(model, state, mv.ref)
        model.load_state_dict(state)
        return model.to(device if device is not None else "cpu").eval()

    def load_program(self, name: str, version: int | None = None, alias: str | None = None) -> nn.Module:
        """The version's torch.export program as a callable module, no class needed (Lesson 04, §6).

        Its bytes are checked against the recorded SHA-256 (and the signature, with a verify key), then
        scanned for planted code (mvtk.checkpoint.check_pt2_archive) before torch loads them.
        """
        return self._program(self.verified(self.get(name, version, alias)))

    def _program(self, mv: ModelVersion) -> nn.Module:
        if mv.program_sha256 is None:
            raise RegistryError(f"{mv.ref} has no torch.export program; register with program_example=(example_input,) "
                                "to store one")
        return load_program(self.program_bytes_of(mv), f"the program of {mv.ref}")

    def lineage(self, name: str, version: int | None = None, alias: str | None = None) -> list[ModelVersion]:
        """The chain of parents ending at this version, oldest first; stops at a deleted parent (Lesson 04, §5)."""
        name, version, alias = checked_ref(name, version, alias)
        with self._db.read() as conn:
            chain = [self._get(conn, name, version, alias)]
            while chain[-1].parent is not None:
                row = self._db.find_row(conn, name, chain[-1].parent)
                if row is None:
                    break
                chain.append(version_from_row(row))
        return chain[::-1]

    def diff(self, name: str, a: int | str, b: int | str) -> VersionDiff:
        """Compare two versions (numbers or alias names) tensor by tensor and metric by metric (Lesson 04, §4).

        Lists the tensors added, removed and reshaped, the relative weight change per tensor, and the
        metric and param deltas.
        """
        mv_a, mv_b = (self.verified(self.get(name, *_version_or_alias(x, w))) for x, w in ((a, "a"), (b, "b")))
        return VersionDiff(mv_a, mv_b, compare_states(self.weights_of(mv_a), self.weights_of(mv_b)))

    def verified(self, mv: ModelVersion) -> ModelVersion:
        """`mv` itself, after checking its signature when this registry has a verify key (Lesson 04, §6).

        Raises SignatureError naming the version when it is unsigned, signed by another key, or its
        record (the weights' SHA-256 included) changed after signing.
        """
        if self.verify_key is not None:
            verify_statement(version_statement(mv), mv.signature, self.verify_key,
                             f"{mv.ref} in registry {str(self.root)!r}")
        return mv

    def table(self, name: str | None = None) -> Table:
        """Every name (versions, latest, aliases), or every version of `name`, as a table (Lesson 04, §2)."""
        if name is None:
            return names_table([(n, self.versions(n), self.aliases(n)) for n in self.names()])
        aliases = self.aliases(name)
        return versions_table(name, self.versions(name), aliases)

    # -- aliases -----------------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `name@alias` at `version` (moving it if it pointed elsewhere); the move is logged (Lesson 04, §3)."""
        check_name(name)
        check_alias(alias)
        check_version_number(version, "version")  # here too: None would otherwise read as "the latest"
        with self._db.write() as conn:
            mv = self._get(conn, name, version, None)
            self._db.move_alias(conn, name, alias, version, "set")
        return mv

    def promote(self, name: str, source: str = "staging", target: str = "production") -> ModelVersion:
        """Point `target` at the version `source` points to, e.g. staging -> production (Lesson 04, §3).

        Both are alias names; None is refused (it never means "the latest": promote a number with set_alias).
        """
        check_name(name)
        check_alias(source, "source")
        check_alias(target, "target")
        with self._db.write() as conn:
            mv = self._get(conn, name, None, source)
            self._db.move_alias(conn, name, target, mv.version, "promote")
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete `name@alias` (the versions stay); the removal is logged (Lesson 04, §3)."""
        check_name(name)
        check_alias(alias)
        with self._db.write() as conn:
            mv = self._get(conn, name, None, alias)
            self._db.remove_alias(conn, name, alias, mv.version)

    def history_table(self, name: str, alias: str | None = None) -> Table:
        """The alias history as a table: seq, alias, action, from, to, time (Lesson 04, §3)."""
        return history_table(name, self.alias_history(name, alias), alias)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of `name`'s aliases (or of one alias), oldest first: who was production when (Lesson 04, §3)."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        with self._db.read() as conn:
            self._db.require_name(conn, name)
            events = self._events(conn, name, alias)
            if alias is not None and not events:
                known = sorted({e.alias for e in self._events(conn, name, None)})
                raise NotFoundError(f"{name} has no alias {alias!r} and never had one; aliases with a history: "
                                    f"{', '.join(known) or 'none yet'}")
        return events

    def rollback(self, name: str, alias: str) -> ModelVersion:
        """Move `alias` back to the version that held it before the current one; logged (Lesson 04, §3).

        Repeated rollbacks walk further back, like undo; versions deleted since are skipped.
        """
        check_name(name)
        check_alias(alias)
        with self._db.write() as conn:
            current = self._get(conn, name, None, alias)
            target = rollback_target(current, alias, self._events(conn, name, alias), self._db.numbers(conn, name))
            self._db.move_alias(conn, name, alias, target, "rollback")
            return self._get(conn, name, target, None)

    # -- deleting and checking -------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version from the index, and its blob if no other version uses it (Lesson 04, §2).

        Refused while an alias points to it. Its number is never given out again. Then runs gc(), which
        also removes blobs and temporary files that interrupted writes left behind.
        """
        check_name(name)
        check_version_number(version, "version")  # here too: None would otherwise read as "the latest"
        with self._db.write() as conn:
            mv = self._get(conn, name, version, None)
            holders = sorted(a for a, v in self._db.aliases(conn, name).items() if v == version)
            if holders:
                raise RegistryError(f"cannot delete {mv.ref}: {', '.join(f'{name}@{a}' for a in holders)} "
                                    "point(s) to it; move or remove the alias first")
            self._db.delete_version(conn, name, version)
        self.gc()

    def check(self) -> CheckReport:
        """Verify every version's blob against its SHA-256 and list leftovers; changes nothing (Lesson 04, §6).

        Leftovers are blobs no version uses and temporary files whose writing process has died; a
        temporary file of a live writer is a register in progress and is not listed. With a verify
        key, versions that are unsigned or whose signature does not verify are listed too.
        """
        with self._db.read() as conn:
            versions = [version_from_row(r) for r in self._db.all_version_rows(conn)]
        state = {sha: self.blobs.status(sha) for sha in {mv.sha256 for mv in versions}}
        programs = {sha: self.blobs.status(sha, PROGRAM_SUFFIX)
                    for sha in {mv.program_sha256 for mv in versions} - {None}}
        labels = {status: tuple(mv.ref + ("" if state[mv.sha256] == status else " (program)") for mv in versions
                                if status in (state[mv.sha256], programs.get(mv.program_sha256)))
                  for status in ("missing", "corrupt")}
        unsigned, bad = [], []
        for mv in versions if self.verify_key is not None else ():
            try:
                self.verified(mv)
            except SignatureError:
                (bad if mv.signature else unsigned).append(mv.ref)
        orphans, temps = self.blobs.leftovers(set(state) | set(programs))
        return CheckReport(len(versions), labels["missing"], labels["corrupt"], orphans, temps,
                           tuple(unsigned), tuple(bad))

    def gc(self) -> list[str]:
        """Delete blobs no version uses and abandoned temporary files; returns what was removed (Lesson 04, §2).

        Refused (RegistryError, nothing deleted) when the index records no version at all but blobs are
        stored: an emptied index says nothing about which weights are in use.
        """
        with self._db.write() as conn:  # holding the write lock: no register is writing a blob meanwhile
            orphans, temps = self.blobs.leftovers({r[2] for r in self._db.blob_rows(conn)})
            if orphans and self._db.looks_empty(conn):
                raise RegistryError(f"gc refused: the index {str(self.index)!r} records no version, yet {BLOB_DIR}/ "
                                    f"holds {len(orphans)} weights file(s), e.g. {orphans[0]}; an emptied index "
                                    f"cannot say which are in use: restore {INDEX_FILE} from a backup (or delete "
                                    f"{BLOB_DIR}/ yourself if none of it is wanted); nothing was deleted")
            for relative in orphans + temps:
                self.blobs.remove(relative)
        return list(orphans + temps)

    def export(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> str:
        """The whole index as sorted, indented JSON that diffs well in git; also written to `path` (Lesson 04, §7).

        Each version carries its signature (null when unsigned). With a verify key, every version's
        signature is checked first: a SignatureError names the first that fails, and nothing is written.
        `path` must lie outside the registry folder, in a folder that exists; an existing file there is
        replaced only when it is an earlier export (re-exporting to one file is how git shows what
        changed) or with `overwrite=True`. InvalidArgumentError names the path otherwise.
        """
        if path is not None:
            path = self._output(path, "path", folder=False)
            if not overwrite and os.path.lexists(path) and not _is_export(path):
                raise InvalidArgumentError(f"path {str(path)!r} exists already and is not an earlier export of a "
                                           "registry index; pass overwrite=True (--force on the command line) to "
                                           "replace it")
        if self.verify_key is not None:
            with self._db.read() as conn:
                for row in self._db.all_version_rows(conn):
                    self.verified(version_from_row(row))
        with self._db.read() as conn:
            models = {name: {"aliases": self._db.aliases(conn, name),
                             "alias_history": [_fields(e, "name") for e in self._events(conn, name, None)],
                             "versions": [_fields(version_from_row(r), "name", "tensor_keys", "modules")
                                          for r in self._db.version_rows(conn, name)]}
                      for name in self._db.names(conn)}
        text = json.dumps({"format": EXPORT_FORMAT, "models": models}, indent=2, sort_keys=True) + "\n"
        if path is not None:
            write_bytes_atomic(path, text.encode("utf-8"))
        return text

    def export_versions(self, folder: str | os.PathLike, names: list[str] | str | None = None) -> Path:
        """Write versions to a new bundle folder another registry can import; returns it (Lesson 04, §7).

        Every version of each name in `names` (default: all) with its weights, program, record
        (class path, arguments, signature), the aliases and their history. With a verify key, each
        version's signature is checked first; with a signing key, the bundle's manifest is signed.
        See mvtk.registry.bundle for the layout. Nothing is left at `folder` if writing fails. `folder`
        must be new, outside the registry folder, in a folder that exists (InvalidArgumentError otherwise).
        """
        folder = self._output(folder, "folder", folder=True)
        names = self.names() if names is None else [names] if isinstance(names, str) else list(names)
        models = {}
        with self._db.read() as conn:
            for name in names:
                check_name(name)
                self._db.require_name(conn, name)
                versions = [self.verified(version_from_row(r)) for r in self._db.version_rows(conn, name)]
                models[name] = BundleModel(versions, self._db.aliases(conn, name),
                                           [_fields(e, "name", "seq") for e in self._events(conn, name, None)],
                                           self._db.last_version(conn, name))
        for model in models.values():
            for mv in model.versions:
                model.files[(mv.sha256, BLOB_SUFFIX)] = self.blobs.read(mv, mv.sha256)
                if mv.program_sha256 is not None:
                    model.files[(mv.program_sha256, PROGRAM_SUFFIX)] = self.blobs.read(mv, mv.program_sha256,
                                                                                       PROGRAM_SUFFIX)
        return write_bundle(folder, models, self.signing_key)

    def import_versions(self, folder: str | os.PathLike, *,
                        verify_key: Ed25519PublicKey | str | os.PathLike | None = None) -> ImportResult:
        """Add the versions of a bundle (export_versions) to this registry, verified first (Lesson 04, §7).

        Everything is checked before anything is written (see mvtk.registry.bundle.read_bundle): a
        damaged or edited file raises IntegrityError, and with a verify key (`verify_key`, else this
        registry's) an unsigned or badly signed manifest or version raises SignatureError. A name new
        here keeps its numbers, signatures, aliases and alias history; a name that exists here gets
        numbers after its own (numbers only count up), parents mapped, and its aliases are left alone.
        A renumbered version is signed again with this registry's signing key (unsigned without one;
        refused when this registry verifies signatures but cannot sign). Returns the mapping.
        """
        key = load_key(verify_key, Ed25519PublicKey, load_public_key, "verify_key", "public") or self.verify_key
        bundle = read_bundle(folder, key)
        moved, aliases, skipped = {}, {}, {}
        with self._db.write() as conn:
            for name, model in bundle.items():
                fresh = self._db.last_version(conn, name) is None
                numbers = {mv.version: mv.version if fresh else None for mv in model.versions}
                if not fresh and self.verify_key is not None and self.signing_key is None:
                    raise RegistryError(f"{name} exists in {self.root}, so its imported versions get new numbers and "
                                        "need new signatures, but this registry has a verify key and no signing key; "
                                        "open it with signing_key= to import")
                if fresh:
                    self._db.keep_numbers(conn, name, model.last_version)
                for mv in model.versions:
                    if not fresh:
                        numbers[mv.version] = self._db.next_version(conn, name)
                    parent = mv.parent if fresh else numbers.get(mv.parent)
                    new = dataclasses.replace(mv, version=numbers[mv.version], parent=parent)
                    if not fresh:
                        signature = (None if self.signing_key is None
                                     else sign_statement(version_statement(new), self.signing_key))
                        new = dataclasses.replace(new, signature=signature)
                    self.blobs.put(mv.sha256, model.files[(mv.sha256, BLOB_SUFFIX)])
                    if mv.program_sha256 is not None:
                        self.blobs.put(mv.program_sha256, model.files[(mv.program_sha256, PROGRAM_SUFFIX)],
                                       PROGRAM_SUFFIX)
                    self._db.insert_version(conn, row_from_version(new))
                if fresh:
                    self._db.copy_aliases(conn, name, model.aliases, model.history)
                    aliases[name] = dict(model.aliases)
                else:
                    skipped[name] = tuple(sorted(model.aliases))
                moved[name] = numbers
        return ImportResult(moved, aliases, skipped)

    def _output(self, path, what: str, *, folder: bool) -> Path:
        """`path` checked as a place to write an export: outside the registry, its parent folder there."""
        path = check_path(path, what)
        try:
            resolved, root = path.resolve(), self.root.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise InvalidArgumentError(f"{what} {str(path)!r} cannot be resolved: {exc}") from None
        if resolved == root or root in resolved.parents:
            raise InvalidArgumentError(f"{what} {str(path)!r} is inside the registry folder {str(self.root)!r}: "
                                       "writing there could overwrite the registry itself; choose a path outside it")
        if not resolved.parent.is_dir():
            raise InvalidArgumentError(f"{what} {str(path)!r}: the folder {str(path.parent)!r} does not exist; "
                                       f"create it first (nothing is created for you)")
        if os.path.isdir(path) and not folder:
            raise InvalidArgumentError(f"{what} {str(path)!r} is a folder, expected a file path")
        return path

    # -- rows to records -------------------------------------------------------------------------------------

    def _get(self, conn, name: str, version: int | None, alias: str | None) -> ModelVersion:
        return version_from_row(self._db.version_row(conn, name, version, alias))

    def _events(self, conn, name: str, alias: str | None) -> list[AliasEvent]:
        return [event_from_row(r) for r in self._db.event_rows(conn, name, alias)]


# -- checking references at entry, and small helpers ------------------------------------------------------------


def _backend(root) -> type:
    """Registry for a folder; the class BACKENDS holds for a URI's scheme ('http://...': an MLflow server)."""
    if isinstance(root, str) and "://" not in root and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:/", root):
        raise InvalidArgumentError(f"registry {root!r} looks like a URL with one '/' after its scheme; write a server "
                                   "as 'http://host:port' (two slashes), or give a folder path")
    if not isinstance(root, str) or "://" not in root:
        return Registry
    scheme = root.partition("://")[0].lower()
    if scheme not in BACKENDS:
        raise InvalidArgumentError(f"registry {root!r}: no backend for {scheme}:// URIs; give a folder path, or the "
                                   f"URL of a server ({', '.join(f'{s}://' for s in sorted(BACKENDS)) or 'none'})")
    return BACKENDS[scheme]


def checked_ref(name, version, alias: str | None) -> tuple[str, int | None, str | None]:
    """'name@alias' split; a str name; a version number or an alias, not both (Lesson 04, §2)."""
    if isinstance(name, str) and "@" in name:
        name, _, named = name.partition("@")
        if alias is not None and alias != named:
            raise InvalidArgumentError(f"two different aliases given: {named!r} in the name and {alias!r}")
        alias = named
    check_name(name)
    if alias is not None:
        check_alias(alias)
    if version is not None and alias is not None:
        raise InvalidArgumentError(f"give a version or an alias for {name!r}, not both "
                                   f"(got {version!r} and {alias!r})")
    if version is not None:
        check_version_number(version, "version")
    return name, version, alias


def _version_or_alias(ref: int | str, what: str) -> tuple[int | None, str | None]:
    """A version number (an int, or a str of ASCII digits as the command line passes it) or an alias name."""
    if isinstance(ref, str) and ref.isascii() and ref.isdigit():
        return check_version_number(int(ref), what), None
    if isinstance(ref, str):
        return None, check_alias(ref, what)
    return check_version_number(ref, what), None


def load_key(given, kind: type, loader, what: str, half: str):
    """None, a key object of `kind`, or the path of its PEM file (loaded); anything else is refused (Lesson 04, §6)."""
    if given is None or isinstance(given, kind):
        return given
    if isinstance(given, (str, os.PathLike)):
        return loader(given)
    raise InvalidArgumentError(f"{what} must be an Ed25519 {half} key or the path of its PEM file "
                               f"(mvtk.checkpoint.signing.new_signing_key), got {type(given).__name__}")


def _raw(key) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, Ed25519PrivateKey):
        return key.private_bytes_raw()
    return key.public_bytes_raw()


def _reopen(root: Path, signing_raw: bytes | None, verify_raw: bytes | None) -> Registry:
    """Unpickle a Registry: its folder and keys."""
    return Registry(root, signing_key=None if signing_raw is None else Ed25519PrivateKey.from_private_bytes(signing_raw),
                    verify_key=None if verify_raw is None else Ed25519PublicKey.from_public_bytes(verify_raw))


def _is_export(path: Path) -> bool:
    """True when `path` is a plain file that starts like Registry.export's JSON (safe to replace)."""
    start = json.dumps({"format": EXPORT_FORMAT}, indent=2)[:-2].encode()  # '{\n  "format": "mvtk-registry-index/1"'
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as handle:
            return handle.read(len(start)) == start
    except OSError:
        return False


def _fields(record, *leave_out: str) -> dict:
    """A record's fields as a dict, for export."""
    return {key: getattr(record, key) for key in type(record).__dataclass_fields__ if key not in leave_out}


def rollback_target(current: ModelVersion, alias: str, events: list[AliasEvent], existing) -> int:
    """The version rollback moves `alias` to: the holder before `current`, skipping deleted ones (Lesson 04, §3).

    RegistryError when the history (`events`, oldest first) holds no earlier version still in `existing`.
    """
    existing = set(existing)
    earlier = [v for v in _holders(events)[:-1] if v != current.version and v in existing]
    if not earlier:
        raise RegistryError(f"nothing left to undo: {current.name}@{alias} points at v{current.version} and its "
                            "history holds no earlier version to go back to (moves already rolled back "
                            "are not undone twice, deleted versions are skipped); use set_alias() to "
                            "choose one")
    return earlier[-1]


def _holders(events: list[AliasEvent]) -> list[int]:
    """Replay an alias's history as an undo stack: set/promote push, rollback pops, remove clears."""
    stack: list[int] = []
    for event in events:
        if event.action == "remove":
            stack = []
        elif event.action == "rollback":
            while stack and stack[-1] != event.version:
                stack.pop()
            stack = stack or [event.version]
        else:
            stack.append(event.version)
    return stack
