"""A local model registry: versions that only count up, aliases, diff, lineage, rollback (Lesson 04).

A registry is a folder, no server: `index.sqlite` (stdlib sqlite3, WAL mode) holds names,
versions, metadata, aliases and the aliases' history; `blobs/` holds the weights as
safetensors files named by their SHA-256, so identical weights are stored once and loading
never unpickles. Every write is one SQLite write transaction, so several processes can
register at once and a killed process leaves nothing half-done. With a signing key each version's
record is signed (Ed25519); with a verify key every load checks that signature first. From the shell:
`python -m mvtk.registry --help`. `Registry("http://host:port")` opens the same calls on an MLflow
server's Model Registry instead (Lesson 11, §6; see `mlflow_backend.py`).

Import everything from here (`from mvtk.registry import Registry`); the files below hold the
code, each importing only the ones above it:

| file          | Lesson 04                                  | what it holds                                       |
|---------------|--------------------------------------------|-----------------------------------------------------|
| `recipe.py`   | §2 what a version records, §6 loading      | how to rebuild any class: class path, constructor   |
|               |                                            | arguments (captured, checked), the module tree      |
| `records.py`  | §2 what a version records, §3 aliases      | ModelVersion, AliasEvent, CheckReport, ImportResult;|
|               |                                            | the name, alias and version rules; a registration   |
| `text.py`     | §2-§4 tables                               | Table, the names/versions/history tables, cells     |
| `index.py`    | §2 versions, §3 alias history              | RegistryIndex: the SQLite schema and every query    |
| `blobs.py`    | §2 stored once, §6 loading verified        | BlobStore: safetensors files named by SHA-256       |
| `diff.py`     | §4 Diff                                    | VersionDiff, TensorChange, LayerChange, compare_*   |
| `bundle.py`   | §7 export/import between registries        | write_bundle, read_bundle: a verified bundle folder |
| `registry.py` | §2-§3, §5 Lineage, §6 check, §7 export     | Registry: checks arguments, coordinates the rest;   |
|               |                                            | picks the backend by URI (a folder, or http://...)  |
| `mlflow_backend.py` | Lesson 11, §6 a team registry        | MlflowRegistry (the same calls on an MLflow server),|
|               |                                            | start_mlflow_server, MlflowServer                   |
| `cli.py`      | §7 from the shell                          | main: `python -m mvtk.registry` (`__main__.py`)     |
"""
from __future__ import annotations

from mvtk.registry.blobs import BLOB_DIR, BLOB_SUFFIX, PROGRAM_SUFFIX, BlobStore
from mvtk.registry.bundle import BUNDLE_FORMAT, read_bundle, write_bundle
from mvtk.registry.cli import DEFAULT_ROOT_ENV, main
from mvtk.registry.diff import LayerChange, TensorChange, VersionDiff, compare_modules, compare_states
from mvtk.registry.index import RegistryIndex
from mvtk.registry.recipe import capture_recipe, class_path, import_class, module_tree, rebuild
from mvtk.registry.records import (MAX_VERSION, AliasEvent, CheckReport, ImportResult, ModelVersion,
                                   architecture_label, check_alias, check_name, check_version_number,
                                   infer_architecture, is_sha256, version_statement)
from mvtk.registry.mlflow_backend import MlflowRegistry, MlflowServer, start_mlflow_server
from mvtk.registry.registry import BACKENDS, EXPORT_FORMAT, INDEX_FILE, Registry
from mvtk.registry.text import Table

__all__ = [
    # §2-§7: the registry and the records it returns (registry, records)
    "Registry", "ModelVersion", "AliasEvent", "CheckReport", "ImportResult", "INDEX_FILE", "EXPORT_FORMAT",
    # §2, §6: how any model class is rebuilt (recipe)
    "capture_recipe", "class_path", "import_class", "module_tree", "rebuild",
    # §7: moving versions between registries (bundle)
    "BUNDLE_FORMAT", "read_bundle", "write_bundle",
    # §2-§3: the rules a registration and an alias follow (records)
    "check_name", "check_alias", "check_version_number", "is_sha256", "infer_architecture", "architecture_label",
    # §6: what a version's signature signs; the largest version number (records)
    "version_statement", "MAX_VERSION",
    # §2, §6: the index and the blob store underneath (index, blobs)
    "RegistryIndex", "BlobStore", "BLOB_DIR", "BLOB_SUFFIX", "PROGRAM_SUFFIX",
    # §2-§4: tables and diffs (text, diff)
    "Table", "VersionDiff", "TensorChange", "LayerChange", "compare_states", "compare_modules",
    # Lesson 11, §6: the team registry on an MLflow server; backends by URI scheme (mlflow_backend, registry)
    "MlflowRegistry", "MlflowServer", "start_mlflow_server", "BACKENDS",
    # §7: the command line (cli)
    "main", "DEFAULT_ROOT_ENV",
]
