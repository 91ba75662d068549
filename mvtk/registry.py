"""A local model registry: versions that only count up, aliases, diff, lineage, rollback (Lesson 04).

A registry is a folder, no server: `index.sqlite` (stdlib sqlite3, WAL mode) holds names,
versions, metadata, aliases and the aliases' history; `blobs/` holds the weights as
safetensors files named by their SHA-256, so identical weights are stored once and loading
never unpickles. Every write is one SQLite write transaction, so several processes can
register at once and a killed process leaves nothing half-done. From the shell:
`python -m mvtk.registry --help`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import html
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

import mvtk
from mvtk.errors import (ArchitectureMismatchError, IntegrityError, InvalidArgumentError, MvtkError,
                         NotFoundError, RegistryError)
from mvtk.files import sha256_bytes, sha256_file, write_bytes_atomic
from mvtk.models import MLP, MODELS, MLPv2, SmallCNN, build_model

if TYPE_CHECKING:
    from mvtk.data import ImageDataset

INDEX_FILE = "index.sqlite"
BLOB_DIR = "blobs"
BLOB_SUFFIX = ".safetensors"
BUSY_TIMEOUT_S = 60.0          # how long a writer waits while another process holds the write lock
DEFAULT_ROOT_ENV = "MVTK_REGISTRY"  # the CLI's registry folder when --root is not given
EXPORT_FORMAT = "mvtk-registry-index/1"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no '@' or '/': `name@alias` stays readable
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")      # starts with a letter: never mistaken for a version

_INHERITED: list[sqlite3.Connection] = []  # connections a forked child inherited: kept, never closed there

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL          -- the highest number ever handed out: never reused
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    tensor_keys TEXT NOT NULL,             -- JSON list: the state_dict's key order
    architecture TEXT, metrics TEXT NOT NULL, params TEXT NOT NULL, tags TEXT NOT NULL,
    notes TEXT NOT NULL, parent INTEGER, created TEXT NOT NULL, git_commit TEXT,
    torch_version TEXT NOT NULL, mvtk_version TEXT NOT NULL, data_fingerprint TEXT,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS versions_by_sha256 ON versions(sha256);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES versions(name, version)
);
CREATE TABLE IF NOT EXISTS alias_events (  -- append-only audit trail of every alias move
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, alias TEXT NOT NULL, action TEXT NOT NULL,
    version INTEGER, previous INTEGER, at TEXT NOT NULL
);
"""


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
            lines.append(f"  {key}: {json.dumps(value, sort_keys=True) if isinstance(value, dict) else _cell(value)}")
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


@dataclass(frozen=True, repr=False)
class Table:
    """Rows of text under column headers: prints aligned, shows as an HTML table in Jupyter (Lesson 04, §4)."""
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""

    def __str__(self) -> str:
        cells = [self.columns] + list(self.rows)
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class TensorChange:
    """How one state_dict entry differs between two versions (Lesson 04, §4)."""
    key: str
    status: str                       # "unchanged", "changed", "reshaped", "added" or "removed"
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    relative_change: float | None     # ||b - a|| / ||a|| when the shapes agree


@dataclass(frozen=True, repr=False)
class VersionDiff:
    """Two versions side by side: architecture, tensors, metrics and params (Lesson 04, §4)."""
    a: ModelVersion
    b: ModelVersion
    tensors: tuple[TensorChange, ...]

    def _keys(self, status: str) -> list[str]:
        return [t.key for t in self.tensors if t.status == status]

    added = property(lambda self: self._keys("added"))
    removed = property(lambda self: self._keys("removed"))
    reshaped = property(lambda self: self._keys("reshaped"))
    changed = property(lambda self: self._keys("changed"))
    unchanged = property(lambda self: self._keys("unchanged"))

    @property
    def architecture_changed(self) -> bool:
        return self.a.architecture != self.b.architecture

    @property
    def relative_change(self) -> dict[str, float]:
        """||b - a|| / ||a|| per tensor whose shape did not change."""
        return {t.key: t.relative_change for t in self.tensors if t.relative_change is not None}

    @property
    def metric_deltas(self) -> dict[str, float | None]:
        """b minus a per metric; None where one side lacks it."""
        return {key: _delta(self.a.metrics.get(key), self.b.metrics.get(key))
                for key in _union(self.a.metrics, self.b.metrics)}

    @property
    def param_changes(self) -> dict[str, tuple[Any, Any]]:
        """(a, b) for every hyper-parameter that differs (None where one side lacks it)."""
        return {key: (self.a.params.get(key), self.b.params.get(key)) for key in _union(self.a.params, self.b.params)
                if self.a.params.get(key) != self.b.params.get(key)}

    def tables(self) -> list[Table]:
        """The diff as three tables: tensors, metrics, params."""
        va, vb = f"v{self.a.version}", f"v{self.b.version}"
        tensors = Table(("tensor", "status", f"shape {va}", f"shape {vb}", "rel. change"), tuple(
            (t.key, t.status, _shape(t.shape_a), _shape(t.shape_b), _cell(t.relative_change)) for t in self.tensors),
            title=f"tensors ({len(self.tensors)})")
        metrics = Table(("metric", va, vb, "delta"), tuple(
            (k, _cell(self.a.metrics.get(k)), _cell(self.b.metrics.get(k)), _cell(d, signed=True))
            for k, d in self.metric_deltas.items()), title="metrics")
        params = Table(("param", va, vb, "delta"), tuple(
            (k, _cell(self.a.params.get(k)), _cell(self.b.params.get(k)),
             _change(self.a.params.get(k), self.b.params.get(k)) if k in self.param_changes else "")
            for k in _union(self.a.params, self.b.params)), title="params")
        return [tensors, metrics, params]

    def heading(self) -> str:
        arch = (f"{_arch(self.a.architecture)} -> {_arch(self.b.architecture)}" if self.architecture_changed
                else f"{_arch(self.a.architecture)} (same)")
        return f"{self.a.name}: v{self.a.version} -> v{self.b.version}\narchitecture: {arch}"

    def __str__(self) -> str:
        return "\n\n".join([self.heading()] + [str(t) for t in self.tables()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        heading = "<br>".join(html.escape(line) for line in self.heading().splitlines())
        return f"<div><p><b>{heading}</b></p>" + "".join(t._repr_html_() for t in self.tables()) + "</div>"


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
        self._local = threading.local()
        self._connect().execute("PRAGMA journal_mode = WAL")  # readers never block the writer, and vice versa
        with self._write() as conn:
            for statement in SCHEMA.split(";")[:-1]:
                conn.execute(statement)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def __reduce__(self):
        return (Registry, (self.root,))  # pickles as its folder: a worker process opens its own connection

    # -- registering -------------------------------------------------------------------------------------

    def register(self, name: str, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], *,
                 architecture: dict | None = None, metrics: dict | None = None, params: dict | None = None,
                 tags: dict | None = None, notes: str = "", parent: int | None = None,
                 dataset: ImageDataset | str | None = None) -> ModelVersion:
        """Store the weights and metadata as the next version of `name` (1, 2, 3, ...) (Lesson 04, §2).

        Writes the blob (unless identical weights are already stored) and one index row, in one
        transaction. `architecture` is inferred for the course's models; `dataset` is stored as
        its fingerprint; git commit, torch and mvtk versions and the time are recorded for you.
        """
        _check_name(name)
        state, architecture = _state_and_architecture(model_or_state_dict, architecture)
        if not isinstance(notes, str):
            raise InvalidArgumentError(f"notes must be a str, got {type(notes).__name__}")
        if parent is not None:
            _check_version_number(parent, "parent")
        data = safetensors_save(state)
        row = {"name": name, "sha256": sha256_bytes(data), "tensor_keys": json.dumps(list(state)),
               "architecture": None if architecture is None else _to_json(architecture, "architecture"),
               "metrics": _to_json(_check_metrics(metrics), "metrics"), "params": _to_json(params or {}, "params"),
               "tags": _to_json(tags or {}, "tags"), "notes": notes, "parent": parent, "created": _now(),
               "git_commit": git_commit(), "torch_version": torch.__version__, "mvtk_version": mvtk.__version__,
               "data_fingerprint": _data_fingerprint(dataset)}
        with self._write() as conn:
            if parent is not None:
                self._get(conn, name, parent, None)
            row["version"] = self._next_version(conn, name)
            self._store_blob(row["sha256"], data)
            conn.execute(f"INSERT INTO versions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                         tuple(row.values()))
        return _version_from_row(row)

    def _next_version(self, conn: sqlite3.Connection, name: str) -> int:
        found = conn.execute("SELECT last_version FROM models WHERE name = ?", (name,)).fetchone()
        version = 1 if found is None else found[0] + 1
        conn.execute("INSERT INTO models (name, last_version) VALUES (?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET last_version = excluded.last_version", (name, version))
        return version

    def _store_blob(self, sha256: str, data: bytes) -> None:
        path = self.blob_path(sha256)
        if path.is_file() and sha256_file(path) == sha256:
            return  # identical weights are stored once
        write_bytes_atomic(path, data)

    def blob_path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live: blobs/<2 hex>/<sha256>.safetensors (Lesson 04, §2)."""
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise InvalidArgumentError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        return self.root / BLOB_DIR / sha256[:2] / f"{sha256}{BLOB_SUFFIX}"

    # -- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The registered model names, sorted (Lesson 04, §2)."""
        return [r[0] for r in self._connect().execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first (Lesson 04, §2)."""
        with self._read() as conn:
            self._require_name(conn, name)
            rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
        return [_version_from_row(r) for r in rows]

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """One version: by number, by alias (also written 'name@alias'), or the latest (Lesson 04, §2)."""
        name, alias = _split_ref(name, alias)
        with self._read() as conn:
            return self._get(conn, name, version, alias)

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of `name` and the version each points to (Lesson 04, §3)."""
        with self._read() as conn:
            self._require_name(conn, name)
            return self._aliases(conn, name)

    def load(self, name: str, version: int | None = None, alias: str | None = None, *,
             device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The state_dict of a version, verified against its SHA-256 first; nothing is unpickled (Lesson 04, §6).

        Raises IntegrityError when the stored bytes changed since registration.
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
        _load_state(model, self._weights(mv, None), mv.ref)
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
        keys = mv.tensor_keys or tuple(tensors)
        return {key: tensors[key] if device is None else tensors[key].to(device) for key in keys}

    def lineage(self, name: str, version: int | None = None, alias: str | None = None) -> list[ModelVersion]:
        """The chain of parents ending at this version, oldest first; stops at a deleted parent (Lesson 04, §5)."""
        with self._read() as conn:
            name, alias = _split_ref(name, alias)
            chain = [self._get(conn, name, version, alias)]
            while chain[-1].parent is not None:
                row = conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?",
                                   (name, chain[-1].parent)).fetchone()
                if row is None:
                    break
                chain.append(_version_from_row(row))
        return chain[::-1]

    def diff(self, name: str, a: int | str, b: int | str) -> VersionDiff:
        """Compare two versions (numbers or alias names): tensors added/removed/reshaped, relative weight
        change per tensor, metric and param deltas (Lesson 04, §4)."""
        mv_a, mv_b = (self.get(name, *_version_or_alias(x)) for x in (a, b))
        state_a, state_b = self._weights(mv_a, None), self._weights(mv_b, None)
        keys = list(state_a) + [k for k in state_b if k not in state_a]
        return VersionDiff(mv_a, mv_b, tuple(_compare_tensor(k, state_a.get(k), state_b.get(k)) for k in keys))

    def table(self, name: str | None = None) -> Table:
        """Every name (versions, latest, aliases), or every version of `name`, as a table (Lesson 04, §2)."""
        if name is None:
            rows = []
            for n in self.names():
                found = self.versions(n)
                aliases = self.aliases(n)
                rows.append((n, str(len(found)), f"v{found[-1].version}", _alias_cell(aliases)))
            return Table(("name", "versions", "latest", "aliases"), tuple(rows))
        by_version: dict[int, list[str]] = {}
        for alias, version in self.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        rows = tuple((f"v{mv.version}", _cell(mv.architecture and mv.architecture["name"]), _cell(mv.metrics),
                      "" if mv.parent is None else f"v{mv.parent}", ", ".join(sorted(by_version.get(mv.version, []))),
                      mv.sha256[:12], mv.created) for mv in self.versions(name))
        return Table(("version", "architecture", "metrics", "parent", "aliases", "sha256", "created"), rows, title=name)

    # -- aliases -----------------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `name@alias` at `version` (moving it if it pointed elsewhere); the move is logged (Lesson 04, §3)."""
        _check_alias(alias)
        _check_version_number(version, "version")
        with self._write() as conn:
            mv = self._get(conn, name, version, None)
            self._move_alias(conn, name, alias, version, "set")
        return mv

    def promote(self, name: str, source: str = "staging", target: str = "production") -> ModelVersion:
        """Point `target` at the version `source` points to, e.g. staging -> production (Lesson 04, §3)."""
        _check_alias(target)
        with self._write() as conn:
            mv = self._get(conn, name, None, source)
            self._move_alias(conn, name, target, mv.version, "promote")
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete `name@alias` (the versions stay); the removal is logged (Lesson 04, §3)."""
        with self._write() as conn:
            mv = self._get(conn, name, None, alias)
            conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            self._log(conn, name, alias, "remove", None, mv.version)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of `name`'s aliases (or of one alias), oldest first: who was production when (Lesson 04, §3)."""
        with self._read() as conn:
            self._require_name(conn, name)
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
        with self._write() as conn:
            current = self._get(conn, name, None, alias)
            existing = set(self._numbers(conn, name))
            earlier = [v for v in _holders(self._events(conn, name, alias))[:-1]
                       if v != current.version and v in existing]
            if not earlier:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to: it has only pointed at "
                                    f"v{current.version} since it was last set; use set_alias() to choose one")
            self._move_alias(conn, name, alias, earlier[-1], "rollback")
            return self._get(conn, name, earlier[-1], None)

    def _move_alias(self, conn, name: str, alias: str, version: int, action: str) -> None:
        found = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        previous = None if found is None else found[0]
        if previous == version:
            return  # already there: nothing moves, nothing is logged
        conn.execute("INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) "
                     "ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version", (name, alias, version))
        self._log(conn, name, alias, action, version, previous)

    def _log(self, conn, name, alias, action, version, previous) -> None:
        conn.execute("INSERT INTO alias_events (name, alias, action, version, previous, at) VALUES (?, ?, ?, ?, ?, ?)",
                     (name, alias, action, version, previous, _now()))

    # -- deleting and checking -------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version from the index, and its blob if no other version uses it (Lesson 04, §2).

        Refused while an alias points to it. Its number is never given out again.
        """
        _check_version_number(version, "version")
        with self._write() as conn:
            mv = self._get(conn, name, version, None)
            holders = sorted(a for a, v in self._aliases(conn, name).items() if v == version)
            if holders:
                raise RegistryError(f"cannot delete {mv.ref}: {', '.join(f'{name}@{a}' for a in holders)} "
                                    "point(s) to it; move or remove the alias first")
            conn.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
        self.gc()

    def check(self) -> CheckReport:
        """Verify every version's blob against its SHA-256 and list leftovers; changes nothing (Lesson 04, §6)."""
        rows = self._connect().execute("SELECT name, version, sha256 FROM versions ORDER BY name, version").fetchall()
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
        with self._write() as conn:  # holding the write lock: no register is writing a blob meanwhile
            used = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM versions")}
            orphans, temp = self._leftovers(used)
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

    # -- exporting -------------------------------------------------------------------------------------------

    def export(self, path: str | os.PathLike | None = None) -> str:
        """The whole index as sorted, indented JSON that diffs well in git; also written to `path` (Lesson 04, §7)."""
        with self._read() as conn:
            models = {}
            for name in [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]:
                rows = conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
                models[name] = {
                    "aliases": self._aliases(conn, name),
                    "alias_history": [_event_dict(e) for e in self._events(conn, name, None)],
                    "versions": [_version_dict(_version_from_row(r)) for r in rows],
                }
        text = json.dumps({"format": EXPORT_FORMAT, "models": models}, indent=2, sort_keys=True) + "\n"
        if path is not None:
            write_bytes_atomic(path, text.encode("utf-8"))
        return text

    # -- the index -----------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, opened once: reopening (and the checkpoint at each close) costs ~10 ms."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if conn is not None:
            _INHERITED.append(conn)  # opened before a fork: never use or close it in this process
        conn = sqlite3.connect(self.index, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before register() returns
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection to the index (a later call opens a new one) (Lesson 04, §2)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: other writers wait for it; an error or a crash inside undoes all of it."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot for several SELECTs."""
        conn = self._connect()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _get(self, conn, name: str, version: int | None, alias: str | None) -> ModelVersion:
        if version is not None and alias is not None:
            raise InvalidArgumentError(f"give a version or an alias for {name!r}, not both "
                                       f"(got {version!r} and {alias!r})")
        self._require_name(conn, name)
        if alias is not None:
            aliases = self._aliases(conn, name)
            if alias not in aliases:
                raise NotFoundError(f"{name} has no alias {alias!r}; its aliases: {_alias_cell(aliases) or 'none yet'}")
            version = aliases[alias]
        elif version is None:
            version = conn.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0]
        _check_version_number(version, "version")
        row = conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
        if row is None:
            raise NotFoundError(f"{name} has no version {version}; its versions: {_ranges(self._numbers(conn, name))}")
        return _version_from_row(row)

    def _require_name(self, conn, name: str) -> None:
        if not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a str, got {type(name).__name__}")
        if conn.execute("SELECT 1 FROM versions WHERE name = ? LIMIT 1", (name,)).fetchone() is None:
            known = [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            raise NotFoundError(f"no model named {name!r} in registry {str(self.root)!r}; "
                                f"its names: {', '.join(known) or 'none yet'}")

    def _numbers(self, conn, name: str) -> list[int]:
        return [r[0] for r in conn.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]

    def _aliases(self, conn, name: str) -> dict[str, int]:
        return {r[0]: r[1] for r in conn.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias",
                                                 (name,))}

    def _events(self, conn, name: str, alias: str | None) -> list[AliasEvent]:
        query = "SELECT * FROM alias_events WHERE name = ?" + (" AND alias = ?" if alias is not None else "")
        rows = conn.execute(query + " ORDER BY seq", (name,) if alias is None else (name, alias)).fetchall()
        return [AliasEvent(**dict(r)) for r in rows]


# -- what gets recorded ------------------------------------------------------------------------------------------


def infer_architecture(model: nn.Module) -> dict | None:
    """The build_model recipe {"name", "kwargs"} of a course model; None for any other model (Lesson 04, §2)."""
    if type(model) is MLP:
        kwargs = {"in_features": model.fc1.in_features, "hidden": model.fc1.out_features,
                  "num_classes": model.fc2.out_features}
    elif type(model) is MLPv2:
        kwargs = {"in_features": model.fc1.in_features, "hidden": model.fc1.out_features,
                  "num_classes": model.fc3.out_features, "dropout": model.drop.p}
    elif type(model) is SmallCNN:
        kwargs = {"in_channels": model.input_shape[0], "input_size": model.input_shape[1],
                  "num_classes": model.fc2.out_features, "hidden": model.fc1.out_features,
                  "channels": [model.features.conv1.out_channels, model.features.conv2.out_channels]}
    else:
        return None
    return {"name": next(key for key, cls in MODELS.items() if cls is type(model)), "kwargs": kwargs}


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in the git working tree around `cwd`, or None outside one (Lesson 04, §2)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _state_and_architecture(obj, architecture: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    if isinstance(obj, nn.Module):
        while isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            obj = obj.module  # register the model, not its wrapper: no 'module.' prefix (Lesson 05)
        obj = getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper
        if architecture is None:
            architecture = infer_architecture(obj)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise InvalidArgumentError(f"expected an nn.Module or a state_dict (a mapping of names to tensors), "
                                   f"got {type(obj).__name__}")
    if not obj:
        raise InvalidArgumentError("the state_dict is empty: there are no weights to register")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"state_dict entry {key!r} is a {type(value).__name__}, expected a tensor "
                                       "under a str key; pass model.state_dict(), not a whole checkpoint")
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in obj.items()}
    if architecture is not None:
        _check_architecture(architecture, state)
    return state, architecture


def _check_architecture(architecture: dict, state: dict[str, torch.Tensor]) -> None:
    if (not isinstance(architecture, dict) or architecture.get("name") not in MODELS
            or not isinstance(architecture.get("kwargs", {}), dict) or set(architecture) - {"name", "kwargs"}):
        raise InvalidArgumentError(f"architecture must be {{'name': one of {sorted(MODELS)}, 'kwargs': {{...}}}} "
                                   f"as accepted by mvtk.models.build_model, got {architecture!r}")
    try:
        expected = build_model(architecture["name"], **architecture.get("kwargs", {})).state_dict()
    except TypeError as exc:  # a keyword the model's constructor does not take
        raise InvalidArgumentError(f"architecture {architecture!r} cannot be built: {exc}") from None
    problems = _mismatch(_shapes(expected), _shapes(state))
    if problems:
        raise ArchitectureMismatchError(f"the weights do not fit architecture {_arch(architecture)}: {problems}")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    problems = _mismatch(_shapes(model.state_dict()), _shapes(state))
    if problems:
        raise ArchitectureMismatchError(f"{label} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _mismatch(expected: dict[str, tuple], got: dict[str, tuple]) -> str:
    """'' when the shapes agree, else what is missing, unexpected or reshaped."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else ""]
    parts += [f"{k} is {got[k]}, expected {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    return "; ".join(p for p in parts if p)


def _check_metrics(metrics: dict | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidArgumentError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    clean = {}
    for key, value in metrics.items():
        try:
            number = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if not isinstance(key, str) or not math.isfinite(number):
            raise InvalidArgumentError(f"metric {key!r} must map a str to a finite number, got {value!r}")
        clean[key] = value if isinstance(value, int) else number
    return clean


def _data_fingerprint(dataset) -> str | None:
    if dataset is None or (isinstance(dataset, str) and re.fullmatch(r"[0-9a-f]{64}", dataset)):
        return dataset
    from mvtk.data import fingerprint  # here, not at the top: torchvision adds seconds to the CLI's start

    return fingerprint(dataset)  # raises InvalidArgumentError for anything but an ImageDataset


def _to_json(value, what: str) -> str:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgumentError(f"{what} must be a dict with str keys, got {value!r}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} must hold only JSON values (str, number, bool, None, list, dict): "
                                   f"{exc}") from None


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


# -- small helpers -----------------------------------------------------------------------------------------------


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


def _compare_tensor(key: str, a: torch.Tensor | None, b: torch.Tensor | None) -> TensorChange:
    shape_a = None if a is None else tuple(a.shape)
    shape_b = None if b is None else tuple(b.shape)
    if a is None or b is None:
        return TensorChange(key, "added" if a is None else "removed", shape_a, shape_b, None)
    if shape_a != shape_b:
        return TensorChange(key, "reshaped", shape_a, shape_b, None)
    a64, b64 = a.double(), b.double()
    norm = a64.norm().item()
    change = (b64 - a64).norm().item()
    relative = change / norm if norm > 0 else (0.0 if change == 0 else math.inf)
    return TensorChange(key, "unchanged" if torch.equal(a, b) else "changed", shape_a, shape_b, relative)


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


def _check_name(name) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(f"model name must be 1-128 letters, digits, '.', '_' or '-' (no '@' or '/'), "
                                   f"got {name!r}")


def _check_alias(alias) -> None:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgumentError(f"alias must start with a letter and hold only letters, digits, '_' or '-' "
                                   f"(e.g. 'production'), got {alias!r}")


def _check_version_number(version, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"{what} must be a version number (an int >= 1), got {version!r}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _union(a: dict, b: dict) -> list[str]:
    return list(a) + [k for k in b if k not in a]


def _delta(a, b) -> float | None:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return b - a if numbers else None


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts: list[list[int]] = []
    for n in numbers:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts) or "none"


def _alias_cell(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias} -> v{version}" for alias, version in sorted(aliases.items()))


def _arch(architecture: dict | None) -> str:
    if architecture is None:
        return "unknown"
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(architecture.get("kwargs", {}).items()))
    return f"{architecture['name']}({kwargs})"


def _change(a, b) -> str:
    delta = _delta(a, b)
    return "changed" if delta is None else _cell(delta, signed=True)


def _shape(shape: tuple | None) -> str:
    return "-" if shape is None else str(tuple(shape))


def _cell(value, signed: bool = False) -> str:
    """A value as table text: floats to 4 decimals, dicts as k=v, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and signed:
        return f"{value:+d}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) if value else "-"
    return str(value)


# -- the command line --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mvtk.registry",
                                     description="Inspect and manage an mvtk model registry (Lesson 04).")
    parser.add_argument("--root", default=os.environ.get(DEFAULT_ROOT_ENV, "registry"),
                        help=f"the registry folder (default: ${DEFAULT_ROOT_ENV} or ./registry)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = sub.add_parser("list", help="list names, or the versions of one name")
    cmd.add_argument("name", nargs="?")
    cmd = sub.add_parser("show", help="show one version: NAME (latest), NAME@ALIAS or NAME --version N")
    cmd.add_argument("ref")
    cmd.add_argument("--version", type=int)
    cmd = sub.add_parser("diff", help="compare two versions (numbers or aliases) of one name")
    cmd.add_argument("name")
    cmd.add_argument("a")
    cmd.add_argument("b")
    cmd = sub.add_parser("alias", help="list aliases; show an alias's history; or set/remove an alias")
    cmd.add_argument("name")
    cmd.add_argument("alias", nargs="?")
    cmd.add_argument("version", nargs="?", type=int)
    cmd.add_argument("--remove", action="store_true", help="remove the alias (the version stays)")
    cmd = sub.add_parser("promote", help="point one alias where another points (staging -> production)")
    cmd.add_argument("name")
    cmd.add_argument("--source", default="staging")
    cmd.add_argument("--target", default="production")
    cmd = sub.add_parser("rollback", help="move an alias back to its previous version")
    cmd.add_argument("name")
    cmd.add_argument("alias")
    cmd = sub.add_parser("export", help="print the index as JSON (or write it with --output)")
    cmd.add_argument("--output", "-o")
    sub.add_parser("check", help="verify every blob against its checksum; exit 1 on a problem")
    return parser


def _run(registry: Registry, args: argparse.Namespace) -> tuple[str, int]:
    if args.command == "list":
        return str(registry.table(args.name)), 0
    if args.command == "show":
        return registry.get(args.ref, version=args.version).describe(), 0
    if args.command == "diff":
        return str(registry.diff(args.name, args.a, args.b)), 0
    if args.command == "promote":
        mv = registry.promote(args.name, args.source, args.target)
        return f"{args.name}@{args.target} -> v{mv.version}", 0
    if args.command == "rollback":
        mv = registry.rollback(args.name, args.alias)
        return f"{args.name}@{args.alias} -> v{mv.version}", 0
    if args.command == "export":
        text = registry.export(args.output)
        return (f"wrote {args.output}" if args.output else text.rstrip("\n")), 0
    if args.command == "check":
        report = registry.check()
        lines = [f"{report.versions} versions checked: {'ok' if report.ok else 'PROBLEMS'}"]
        lines += [f"{what}: {', '.join(items)}" for what, items in
                  (("missing", report.missing), ("corrupt", report.corrupt), ("orphans", report.orphans),
                   ("temp files", report.temp_files)) if items]
        return "\n".join(lines), 0 if report.ok else 1
    return _run_alias(registry, args), 0


def _run_alias(registry: Registry, args: argparse.Namespace) -> str:
    if args.alias is None:
        return _alias_cell(registry.aliases(args.name)).replace(", ", "\n") or f"{args.name} has no aliases"
    if args.remove:
        registry.remove_alias(args.name, args.alias)
        return f"removed {args.name}@{args.alias}"
    if args.version is not None:
        mv = registry.set_alias(args.name, args.alias, args.version)
        return f"{args.name}@{args.alias} -> v{mv.version}"
    rows = tuple((str(e.seq), e.action, _cell(e.previous and f"v{e.previous}"), _cell(e.version and f"v{e.version}"),
                  e.at) for e in registry.alias_history(args.name, args.alias))
    return str(Table(("seq", "action", "from", "to", "at"), rows, title=f"{args.name}@{args.alias}"))


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.registry`: list, show, diff, alias, promote, rollback, export, check (Lesson 04, §7)."""
    args = _parser().parse_args(argv)
    try:
        text, code = _run(Registry(args.root, create=False), args)
    except MvtkError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
