"""The model registry's SQLite index: schema, connections, transactions and every query (Lesson 04, §2-§3).

`index.sqlite` (stdlib sqlite3, WAL mode) holds names, versions, metadata, aliases and the
aliases' history. `Registry` (in `mvtk.registry.registry`) does all its reading and writing
through one `RegistryIndex`, after checking its arguments; this file holds all of the
registry's SQL and no other file holds any. Rows go in and come out as the index stores them;
`mvtk.registry.records` turns them into records.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterator

from mvtk.env import utc_now
from mvtk.errors import NotFoundError, RegistryError
from mvtk.registry.text import alias_cell, ranges

__all__ = ["RegistryIndex", "SCHEMA", "BUSY_TIMEOUT_S", "ADDED_COLUMNS"]

BUSY_TIMEOUT_S = 60.0          # how long a writer waits while another process holds the write lock

ADDED_COLUMNS = ("signature", "class_path", "init_args", "modules", "program_sha256")  # added to older indexes

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
    signature TEXT,                        -- Ed25519 over the record (records.version_statement), NULL when unsigned
    class_path TEXT, init_args TEXT,       -- how to rebuild the model: 'module:QualName' and its arguments (JSON)
    modules TEXT,                          -- JSON list of [name, type, extra_repr]: the module tree
    program_sha256 TEXT,                   -- a torch.export program (.pt2) in the blob store, NULL when none
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


class RegistryIndex:
    """One registry's index file: a connection per thread and process, transactions, queries (Lesson 04, §2).

    `label` names the registry in error messages. Opening a blank index (a new or empty file, no
    tables) first calls `on_blank`, which raises to refuse it (the folder holds weights, so the index
    was lost, not new), then creates the tables; an SQLite file holding other tables is refused. An
    older index gets the columns later mvtk versions added (ADDED_COLUMNS). Every SQLite error
    (a damaged file, a full disk, a lock held too long) becomes a RegistryError naming the file.
    """

    def __init__(self, path: Path, label: str, on_blank: Callable[[], None] | None = None):
        self.path, self.label = path, label
        self._local = threading.local()
        try:
            with self.errors():
                tables = self._tables(self.connect())
            if not tables and on_blank is not None:
                with self.write() as conn:  # under the write lock: another process creating it has finished or not begun
                    tables = self._tables(conn)
                    if not tables:
                        on_blank()
            if tables and "versions" not in tables:
                raise RegistryError(f"registry index {str(self.path)!r} is an SQLite file but not an mvtk registry "
                                    f"index (its tables: {', '.join(sorted(tables))}); restore {self.path.name} "
                                    "from a backup, or give another --root")
        except BaseException:
            self.close()  # a refused index is left exactly as it was
            raise
        with self.errors():
            self.connect().execute("PRAGMA journal_mode = WAL")  # readers never block the writer, and vice versa
        with self.write() as conn:
            for statement in SCHEMA.split(";")[:-1]:
                conn.execute(statement)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(versions)")}
            for column in ADDED_COLUMNS:  # an index written by an older mvtk: still readable, its rows NULL here
                if column not in columns:
                    conn.execute(f"ALTER TABLE versions ADD COLUMN {column} TEXT")

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn any sqlite3 error raised inside into a RegistryError naming the index file and a remedy (Lesson 04, §2)."""
        try:
            yield
        except sqlite3.Error as exc:
            text = str(exc)
            if "full" in text:
                hint = "the disk holding it is full: free some space and try again; nothing was changed"
            elif "locked" in text or "busy" in text:
                hint = f"another process held the registry's write lock for over {BUSY_TIMEOUT_S:.0f} s"
            elif type(exc) is sqlite3.DatabaseError or "malformed" in text:
                hint = ("the file is damaged or is not an SQLite database: restore it from a backup "
                        "(Registry.export writes the index as JSON you can keep in git)")
            else:
                hint = "the index could not be read or written"
            raise RegistryError(f"registry index {str(self.path)!r}: {text}; {hint}") from exc

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    # -- connections and transactions ----------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """This thread's connection, opened once: reopening it (and the checkpoint at each close) costs time."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if conn is not None:
            _INHERITED.append(conn)  # opened before a fork: never use or close it in this process
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before register() returns
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction: other writers wait for it; an error or a crash inside undoes all of it."""
        return self._transaction("BEGIN IMMEDIATE")

    def read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One consistent snapshot for several SELECTs."""
        return self._transaction("BEGIN")

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        # Whatever happens, the cached per-thread connection leaves here outside any transaction.
        with self.errors():
            conn = self.connect()
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                _rollback(conn)  # SQLite may have rolled back already (disk full, say): never hide the original error
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)  # a failed COMMIT (a deferred constraint, a full disk) leaves the transaction open
                raise

    # -- versions ------------------------------------------------------------------------------------------

    def names(self, conn: sqlite3.Connection | None = None) -> list[str]:
        """The registered model names, sorted."""
        with self.errors():
            return [r[0] for r in (conn or self.connect()).execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def require_name(self, conn, name: str) -> None:
        """Raise NotFoundError, listing the names, unless `name` has a version."""
        if conn.execute("SELECT 1 FROM versions WHERE name = ? LIMIT 1", (name,)).fetchone() is None:
            raise NotFoundError(f"no model named {name!r} in registry {self.label!r}; "
                                f"its names: {', '.join(self.names(conn)) or 'none yet'}")

    def version_row(self, conn, name: str, version: int | None, alias: str | None) -> sqlite3.Row:
        """The row of one version: by number, by alias, or the latest; NotFoundError lists what exists."""
        self.require_name(conn, name)
        if alias is not None:
            aliases = self.aliases(conn, name)
            if alias not in aliases:
                raise NotFoundError(f"{name} has no alias {alias!r}; its aliases: {alias_cell(aliases) or 'none yet'}")
            version = aliases[alias]
        elif version is None:
            version = conn.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()[0]
        row = self.find_row(conn, name, version)
        if row is None:
            raise NotFoundError(f"{name} has no version {version}; its versions: {ranges(self.numbers(conn, name))}")
        return row

    def find_row(self, conn, name: str, version: int) -> sqlite3.Row | None:
        """The row of `name` `version`, or None."""
        return conn.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()

    def version_rows(self, conn, name: str) -> list[sqlite3.Row]:
        """Every row of `name`, oldest first."""
        return conn.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()

    def numbers(self, conn, name: str) -> list[int]:
        """The version numbers of `name` that exist, ascending."""
        return [r[0] for r in conn.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]

    def last_version(self, conn, name: str) -> int | None:
        """The highest number ever given to `name` (deleted versions included), or None for a new name."""
        found = conn.execute("SELECT last_version FROM models WHERE name = ?", (name,)).fetchone()
        return None if found is None else found[0]

    def keep_numbers(self, conn, name: str, last: int) -> None:
        """Record `last` as the highest number given to the new name `name` (an import keeping its numbers)."""
        conn.execute("INSERT INTO models (name, last_version) VALUES (?, ?)", (name, last))

    def next_version(self, conn, name: str) -> int:
        """Hand out the next number of `name`: one above the highest ever given, deleted ones included."""
        found = conn.execute("SELECT last_version FROM models WHERE name = ?", (name,)).fetchone()
        version = 1 if found is None else found[0] + 1
        conn.execute("INSERT INTO models (name, last_version) VALUES (?, ?) "
                     "ON CONFLICT(name) DO UPDATE SET last_version = excluded.last_version", (name, version))
        return version

    def insert_version(self, conn, row: dict) -> None:
        """Add one version's row (column -> value)."""
        conn.execute(f"INSERT INTO versions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     tuple(row.values()))

    def delete_version(self, conn, name: str, version: int) -> None:
        """Remove one version's row (its number stays used)."""
        conn.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))

    def looks_empty(self, conn) -> bool:
        """True when no name was ever given a version number: a new index, or one emptied (Lesson 04, §2)."""
        return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM models) AND NOT EXISTS (SELECT 1 FROM versions)"
                            ).fetchone()[0] == 1

    def blob_rows(self, conn: sqlite3.Connection | None = None) -> list[tuple[str, int, str]]:
        """(name, version, sha256) of every version's weights and program, sorted."""
        with self.errors():
            return [tuple(r) for r in (conn or self.connect()).execute(
                "SELECT name, version, sha256 FROM versions UNION ALL SELECT name, version, program_sha256 "
                "FROM versions WHERE program_sha256 IS NOT NULL ORDER BY 1, 2")]

    def all_version_rows(self, conn) -> list[sqlite3.Row]:
        """Every row of every name, sorted by name and version (Lesson 04, §6)."""
        return conn.execute("SELECT * FROM versions ORDER BY name, version").fetchall()

    # -- aliases -------------------------------------------------------------------------------------------

    def aliases(self, conn, name: str) -> dict[str, int]:
        """alias -> version for `name`, sorted by alias."""
        return {r[0]: r[1] for r in conn.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias",
                                                 (name,))}

    def event_rows(self, conn, name: str, alias: str | None) -> list[sqlite3.Row]:
        """The alias moves of `name` (or of one alias), oldest first."""
        query = "SELECT * FROM alias_events WHERE name = ?" + (" AND alias = ?" if alias is not None else "")
        return conn.execute(query + " ORDER BY seq", (name,) if alias is None else (name, alias)).fetchall()

    def move_alias(self, conn, name: str, alias: str, version: int, action: str) -> None:
        """Point `alias` at `version` and log the move; nothing happens if it already points there."""
        found = conn.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        previous = None if found is None else found[0]
        if previous == version:
            return  # already there: nothing moves, nothing is logged
        conn.execute("INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?) "
                     "ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version", (name, alias, version))
        self._log(conn, name, alias, action, version, previous)

    def remove_alias(self, conn, name: str, alias: str, previous: int) -> None:
        """Delete `alias` (which pointed at `previous`) and log the removal."""
        conn.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        self._log(conn, name, alias, "remove", None, previous)

    def copy_aliases(self, conn, name: str, aliases: dict[str, int], events: list[dict]) -> None:
        """Set the aliases of a name new here and append its history as it was elsewhere (an import)."""
        for event in events:
            conn.execute("INSERT INTO alias_events (name, alias, action, version, previous, at) VALUES (?, ?, ?, ?, ?, ?)",
                         (name, event["alias"], event["action"], event["version"], event["previous"], event["at"]))
        for alias, version in aliases.items():
            conn.execute("INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?)", (name, alias, version))

    def _log(self, conn, name, alias, action, version, previous) -> None:
        conn.execute("INSERT INTO alias_events (name, alias, action, version, previous, at) VALUES (?, ?, ?, ?, ?, ?)",
                     (name, alias, action, version, previous, utc_now()))


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open; a failure here must not replace the error being raised."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")

