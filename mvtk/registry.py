"""A local model registry: versions that only count up, aliases, diff, lineage, rollback (Lesson 04).

A registry is a folder, no server: `index.sqlite` (stdlib sqlite3, WAL mode) holds names,
versions, metadata, aliases and the aliases' history; `blobs/` holds the weights as
safetensors files named by their SHA-256, so identical weights are stored once and loading
never unpickles. Every write is one SQLite write transaction, so several processes can
register at once and a killed process leaves nothing half-done. From the shell:
`python -m mvtk.registry --help`.

The index's SQL lives in `mvtk.registry_index`, the checking of what a registration records in
`mvtk.registry_record`, diffs and tables in `mvtk.registry_diff`, the command line in
`mvtk.registry_cli`; import everything from here.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors.torch import load as safetensors_load
from torch import nn

from mvtk.checkpoint import check_state_dict_fits
from mvtk.errors import IntegrityError, InvalidArgumentError, NotFoundError, RegistryError
from mvtk.files import sha256_bytes, sha256_file, write_bytes_atomic
from mvtk.models import build_model
from mvtk.registry_diff import (Table, VersionDiff, cell, compare_states, history_table, names_table,
                                versions_table)
from mvtk.registry_index import RegistryIndex, check_alias, check_version_number
from mvtk.registry_record import is_sha256, new_version_row

if TYPE_CHECKING:
    from mvtk.data import ImageDataset

INDEX_FILE = "index.sqlite"
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".safetensors"
EXPORT_FORMAT = "mvtk-registry-index/1"


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its weights' SHA-256 and everything needed to reproduce it (Lesson 04, §2)."""
    name: str
    version: int
    sha256: str                       # of the safetensors bytes in the blob store
    architecture: dict | None         # {"name": "mlp", "kwargs": {...}} for mvtk.models.build_model
    metrics: dict
    params: dict
    tags: dict
    notes: str
    parent: int | None                # the version this one was fine-tuned from
    created: str                      # ISO 8601, UTC
    git_commit: str | None            # HEAD of the git working tree it was registered from
    torch_version: str
    mvtk_version: str
    data_fingerprint: str | None      # mvtk.data.fingerprint of the training data
    tensor_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ref(self) -> str:
        """A short label such as 'digits v3'."""
        return f"{self.name} v{self.version}"

    def describe(self) -> str:
        """Every field on its own line, as `python -m mvtk.registry show` prints it (Lesson 04, §2)."""
        lines = [f"{self.ref}"]
        for key in ("sha256", "architecture", "metrics", "params", "tags", "notes", "parent", "created",
                    "git_commit", "torch_version", "mvtk_version", "data_fingerprint"):
            value = getattr(self, key)
            lines.append(f"  {key}: {json.dumps(value, sort_keys=True) if isinstance(value, dict) else cell(value)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias: set, promote, rollback or remove, with the version before and after (Lesson 04, §3)."""
    seq: int
    name: str
    alias: str
    action: str
    version: int | None
    previous: int | None
    at: str


@dataclass(frozen=True)
class CheckReport:
    """What `Registry.check` found: versions whose blob is missing or corrupt, and leftovers (Lesson 04, §6)."""
    versions: int
    missing: tuple[str, ...]          # versions whose blob file is gone
    corrupt: tuple[str, ...]          # versions whose blob no longer matches its SHA-256
    orphans: tuple[str, ...]          # blobs no version uses (an interrupted register or delete); harmless
    temp_files: tuple[str, ...]       # half-written files a killed writer left; harmless

    @property
    def ok(self) -> bool:
        """True when every version's weights are present and match their checksum."""
        return not self.missing and not self.corrupt


class Registry:
    """A folder of model versions: SQLite index + content-addressed safetensors blobs (Lesson 04, §2).

    `create=False` refuses a folder that holds no registry yet (the command line uses it).
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        if not isinstance(root, (str, os.PathLike)):
            raise InvalidArgumentError(f"root must be a folder path, got {type(root).__name__}")
        self.root = Path(root)
        self.index = self.root / INDEX_FILE
        if not self.index.is_file():
            if not create:
                raise RegistryError(f"no registry at {str(self.root)!r} (no {INDEX_FILE}); "
                                    f"create one with Registry({str(self.root)!r}) or pass --root")
            if self.root.exists() and not self.root.is_dir():
                raise InvalidArgumentError(f"registry root {str(self.root)!r} is a file, expected a folder")
            self.root.mkdir(parents=True, exist_ok=True)
        self._db = RegistryIndex(self.index, str(self.root))

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def __reduce__(self):
        return (Registry, (self.root,))  # pickles as its folder: a worker process opens its own connection

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
                 dataset: ImageDataset | str | None = None) -> ModelVersion:
        """Store the weights and metadata as the next version of `name` (1, 2, 3, ...) (Lesson 04, §2).

        Writes the blob (unless identical weights are already stored) and one index row, in one
        transaction. `architecture` is inferred for the course's models; `dataset` (an mvtk
        ImageDataset, or its fingerprint: a string of 64 lowercase hex digits from
        mvtk.data.fingerprint) is stored as its fingerprint; git commit, torch and mvtk versions and
        the time are recorded for you.
        """
        row, data = new_version_row(name, model_or_state_dict, architecture=architecture, metrics=metrics,
                                params=params, tags=tags, notes=notes, parent=parent, dataset=dataset)
        with self._db.write() as conn:
            if parent is not None:
                self._get(conn, name, parent, None)
            row["version"] = self._db.next_version(conn, name)
            self._store_blob(row["sha256"], data)
            self._db.insert_version(conn, row)
        return _version_from_row(row)

    def _store_blob(self, sha256: str, data: bytes) -> None:
        path = self.blob_path(sha256)
        if path.is_file() and sha256_file(path) == sha256:
            return  # identical weights are stored once
        write_bytes_atomic(path, data)

    def blob_path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live: blobs/<2 hex>/<sha256>.safetensors (Lesson 04, §2)."""
        if not is_sha256(sha256):
            raise InvalidArgumentError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        return self.root / BLOB_DIR / sha256[:2] / f"{sha256}{BLOB_SUFFIX}"

    # -- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The registered model names, sorted (Lesson 04, §2)."""
        return self._db.names()

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first (Lesson 04, §2)."""
        with self._db.read() as conn:
            self._db.require_name(conn, name)
            rows = self._db.version_rows(conn, name)
        return [_version_from_row(r) for r in rows]

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """One version: by number, by alias (also written 'name@alias'), or the latest (Lesson 04, §2)."""
        name, alias = _split_ref(name, alias)
        with self._db.read() as conn:
            return self._get(conn, name, version, alias)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of `name` and the version each points to (Lesson 04, §3)."""
        with self._db.read() as conn:
            self._db.require_name(conn, name)
            return self._db.aliases(conn, name)

    def load(self, name: str, version: int | None = None, alias: str | None = None, *,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The state_dict of a version, verified against its SHA-256 first; nothing is unpickled (Lesson 04, §6).

        Raises IntegrityError when the stored bytes changed since registration, and RegistryError
        when the blob file is missing.
        """
        return self._weights(self.get(name, version, alias), device)

    def load_model(self, name: str, version: int | None = None, alias: str | None = None, *,
                   device: torch.device | str | None = None) -> nn.Module:
        """The version's model rebuilt with mvtk.models.build_model, weights loaded, in eval() mode (Lesson 04, §6)."""
        mv = self.get(name, version, alias)
        if mv.architecture is None:
            raise RegistryError(f"{mv.ref} was registered without an architecture, so it cannot be rebuilt; "
                                "use load() with your own model class, or register with "
                                "architecture={'name': ..., 'kwargs': {...}}")
        model = build_model(mv.architecture["name"], **mv.architecture.get("kwargs", {}))
        state = self._weights(mv, None)
        check_state_dict_fits(model, state, mv.ref)
        model.load_state_dict(state)
        return model.to(device if device is not None else "cpu").eval()

    def _weights(self, mv: ModelVersion, device) -> dict[str, torch.Tensor]:
        path = self.blob_path(mv.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{mv.ref}: its weights file {_relative(path, self.root)} is missing from the "
                                "blob store; restore it from a backup or delete the version") from None
        actual = sha256_bytes(data)
        if actual != mv.sha256:
            raise IntegrityError(f"{mv.ref}: the weights in {_relative(path, self.root)} do not match the SHA-256 "
                                 f"recorded at registration (expected {mv.sha256[:12]}..., got {actual[:12]}...); "
                                 "the file changed after it was registered: restore it or register again")
        tensors = safetensors_load(data)
        return {key: tensors[key] if device is None else tensors[key].to(device) for key in mv.tensor_keys}

    def lineage(self, name: str, version: int | None = None, alias: str | None = None) -> list[ModelVersion]:
        """The chain of parents ending at this version, oldest first; stops at a deleted parent (Lesson 04, §5)."""
        with self._db.read() as conn:
            name, alias = _split_ref(name, alias)
            chain = [self._get(conn, name, version, alias)]
            while chain[-1].parent is not None:
                row = self._db.find_row(conn, name, chain[-1].parent)
                if row is None:
                    break
                chain.append(_version_from_row(row))
        return chain[::-1]

    def diff(self, name: str, a: int | str, b: int | str) -> VersionDiff:
        """Compare two versions (numbers or alias names): tensors added/removed/reshaped, relative weight
        change per tensor, metric and param deltas (Lesson 04, §4)."""
        mv_a, mv_b = (self.get(name, *_version_or_alias(x)) for x in (a, b))
        return VersionDiff(mv_a, mv_b, compare_states(self._weights(mv_a, None), self._weights(mv_b, None)))

    def table(self, name: str | None = None) -> Table:
        """Every name (versions, latest, aliases), or every version of `name`, as a table (Lesson 04, §2)."""
        if name is None:
            return names_table([(n, self.versions(n), self.aliases(n)) for n in self.names()])
        aliases = self.aliases(name)
        return versions_table(name, self.versions(name), aliases)

    # -- aliases -----------------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `name@alias` at `version` (moving it if it pointed elsewhere); the move is logged (Lesson 04, §3)."""
        check_alias(alias)
        check_version_number(version, "version")  # here too: _get would read version=None as "the latest"
        with self._db.write() as conn:
            mv = self._get(conn, name, version, None)
            self._db.move_alias(conn, name, alias, version, "set")
        return mv

    def promote(self, name: str, source: str = "staging", target: str = "production") -> ModelVersion:
        """Point `target` at the version `source` points to, e.g. staging -> production (Lesson 04, §3)."""
        check_alias(target)
        with self._db.write() as conn:
            mv = self._get(conn, name, None, source)
            self._db.move_alias(conn, name, target, mv.version, "promote")
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete `name@alias` (the versions stay); the removal is logged (Lesson 04, §3)."""
        with self._db.write() as conn:
            mv = self._get(conn, name, None, alias)
            self._db.remove_alias(conn, name, alias, mv.version)

    def history_table(self, name: str, alias: str | None = None) -> Table:
        """The alias history as a table: seq, alias, action, from, to, time (Lesson 04, §3)."""
        return history_table(name, self.alias_history(name, alias), alias)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of `name`'s aliases (or of one alias), oldest first: who was production when (Lesson 04, §3)."""
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
        with self._db.write() as conn:
            current = self._get(conn, name, None, alias)
            existing = set(self._db.numbers(conn, name))
            earlier = [v for v in _holders(self._events(conn, name, alias))[:-1]
                       if v != current.version and v in existing]
            if not earlier:
                raise RegistryError(f"nothing left to undo: {name}@{alias} points at v{current.version} and its "
                                    "history holds no earlier version to go back to (moves already rolled back "
                                    "are not undone twice, deleted versions are skipped); use set_alias() to "
                                    "choose one")
            self._db.move_alias(conn, name, alias, earlier[-1], "rollback")
            return self._get(conn, name, earlier[-1], None)

    # -- deleting and checking -------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version from the index, and its blob if no other version uses it (Lesson 04, §2).

        Refused while an alias points to it. Its number is never given out again. Then runs gc(), which
        also removes blobs and temporary files that interrupted writes left behind.
        """
        check_version_number(version, "version")  # here too: _get would read version=None as "the latest"
        with self._db.write() as conn:
            mv = self._get(conn, name, version, None)
            holders = sorted(a for a, v in self._db.aliases(conn, name).items() if v == version)
            if holders:
                raise RegistryError(f"cannot delete {mv.ref}: {', '.join(f'{name}@{a}' for a in holders)} "
                                    "point(s) to it; move or remove the alias first")
            self._db.delete_version(conn, name, version)
        self.gc()

    def check(self) -> CheckReport:
        """Verify every version's blob against its SHA-256 and list leftovers; changes nothing (Lesson 04, §6)."""
        rows = self._db.blob_rows()
        state = {}
        for sha in {r[2] for r in rows}:
            path = self.blob_path(sha)
            state[sha] = "missing" if not path.is_file() else ("ok" if sha256_file(path) == sha else "corrupt")
        labels = {status: tuple(f"{n} v{v}" for n, v, sha in rows if state[sha] == status)
                  for status in ("missing", "corrupt")}
        orphans, temp = self._leftovers({r[2] for r in rows})
        return CheckReport(len(rows), labels["missing"], labels["corrupt"], orphans, temp)

    def gc(self) -> list[str]:
        """Delete blobs no version uses and half-written temporary files; returns what was removed (Lesson 04, §2)."""
        with self._db.write() as conn:  # holding the write lock: no register is writing a blob meanwhile
            orphans, temp = self._leftovers({r[2] for r in self._db.blob_rows(conn)})
            for relative in orphans + temp:
                (self.root / relative).unlink(missing_ok=True)
        return list(orphans + temp)

    def _leftovers(self, used: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        files = sorted(p for p in (self.root / BLOB_DIR).glob("*/*") if p.is_file())
        orphans = tuple(_relative(p, self.root) for p in files
                        if p.name.endswith(BLOB_SUFFIX) and not p.name.startswith(".")
                        and p.name[:-len(BLOB_SUFFIX)] not in used)
        temp = tuple(_relative(p, self.root) for p in files if p.name.startswith("."))
        return orphans, temp

    def export(self, path: str | os.PathLike | None = None) -> str:
        """The whole index as sorted, indented JSON that diffs well in git; also written to `path` (Lesson 04, §7)."""
        with self._db.read() as conn:
            models = {name: {"aliases": self._db.aliases(conn, name),
                             "alias_history": [_event_dict(e) for e in self._events(conn, name, None)],
                             "versions": [_version_dict(_version_from_row(r))
                                          for r in self._db.version_rows(conn, name)]}
                      for name in self._db.names(conn)}
        text = json.dumps({"format": EXPORT_FORMAT, "models": models}, indent=2, sort_keys=True) + "\n"
        if path is not None:
            write_bytes_atomic(path, text.encode("utf-8"))
        return text

    # -- rows to records -------------------------------------------------------------------------------------

    def _get(self, conn, name: str, version: int | None, alias: str | None) -> ModelVersion:
        return _version_from_row(self._db.version_row(conn, name, version, alias))

    def _events(self, conn, name: str, alias: str | None) -> list[AliasEvent]:
        return [AliasEvent(**dict(r)) for r in self._db.event_rows(conn, name, alias)]


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.registry`: list, show, diff, alias, promote, rollback, export, check (Lesson 04, §7)."""
    from mvtk.registry_cli import main as cli_main  # here: registry_cli imports this module, not the reverse

    return cli_main(argv)


# -- rows to records, and small helpers -----------------------------------------------------------------------


def _version_from_row(row) -> ModelVersion:
    row = dict(row)
    loads = {key: json.loads(row[key]) if row[key] is not None else None
             for key in ("architecture", "metrics", "params", "tags", "tensor_keys")}
    return ModelVersion(name=row["name"], version=row["version"], sha256=row["sha256"], notes=row["notes"],
                        parent=row["parent"], created=row["created"], git_commit=row["git_commit"],
                        torch_version=row["torch_version"], mvtk_version=row["mvtk_version"],
                        data_fingerprint=row["data_fingerprint"], architecture=loads["architecture"],
                        metrics=loads["metrics"], params=loads["params"], tags=loads["tags"],
                        tensor_keys=tuple(loads["tensor_keys"]))


def _version_dict(mv: ModelVersion) -> dict:
    return {key: getattr(mv, key) for key in ModelVersion.__dataclass_fields__ if key not in ("name", "tensor_keys")}


def _event_dict(event: AliasEvent) -> dict:
    return {key: getattr(event, key) for key in AliasEvent.__dataclass_fields__ if key != "name"}


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


def _split_ref(name, alias: str | None) -> tuple[str, str | None]:
    if isinstance(name, str) and "@" in name:
        name, _, named = name.partition("@")
        if alias is not None and alias != named:
            raise InvalidArgumentError(f"two different aliases given: {named!r} in the name and {alias!r}")
        alias = named
    return name, alias


def _version_or_alias(ref: int | str) -> tuple[int | None, str | None]:
    if isinstance(ref, str) and ref.isdigit():
        return int(ref), None
    return (None, ref) if isinstance(ref, str) else (ref, None)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


if __name__ == "__main__":
    sys.exit(main())  # main() imports mvtk.registry_cli only now, so the two never import each other at load
