"""The team registry: Lesson 04's Registry calls on MLflow's Model Registry behind an `mlflow server` (Lesson 11, §6).

`Registry("http://127.0.0.1:5000")` opens an `MlflowRegistry` (the facade picks the backend by the
URI; a folder path stays a local registry). The same calls work: register, versions, get,
aliases, set_alias, promote, load and load_model by `name@alias`, table, diff, lineage. Where it lives:

- each version is an MLflow model version of the registered model `name`; its weights (safetensors)
  and optional torch.export program are the artifacts of one MLflow run in the experiment
  `mvtk-registry`, uploaded through the server;
- mvtk's whole record of the version (the weights' SHA-256, class path, metrics, signature...) is the
  model-version tag `mvtk.record`, in the server's database: loading downloads the weights and checks
  them against that SHA-256 (IntegrityError when the artifact changed), and against the signature with
  a verify key;
- aliases are MLflow's own (`set_registered_model_alias`); their history, which MLflow does not keep,
  is one registered-model tag per move (`mvtk.alias_event.<time>-<random>`), so rollback works too.
  Moves are two calls (the alias, then its event): a client killed in between leaves a move unlogged.

Not supported on this backend, refused with a RegistryError that says so: blob_path, check, gc,
export, export_versions, import_versions (the files live on the server; use MLflow's tools).

`start_mlflow_server(folder)` runs a real `mlflow server` on 127.0.0.1 (SQLite database and artifacts in
`folder`) in its own process group; `MlflowServer.stop()` ends the whole group and waits for the port.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import httpx
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load as safetensors_load
from torch import nn

from mvtk.checkpoint.signing import load_private_key, load_public_key, sign_statement
from mvtk.env import utc_now
from mvtk.errors import IntegrityError, InvalidArgumentError, NotFoundError, RegistryError, check_int, check_number
from mvtk.files import sha256_bytes
from mvtk.registry.records import (AliasEvent, ModelVersion, check_alias, check_name, check_version_number,
                                   new_version_row, version_from_row, version_statement)
from mvtk.registry.registry import BACKENDS, Registry, checked_ref, load_key, rollback_target
from mvtk.registry.text import alias_cell, ranges

__all__ = ["MlflowRegistry", "MlflowServer", "start_mlflow_server", "EXPERIMENT", "RECORD_TAG", "MODEL_TAG",
           "EVENT_PREFIX", "ARTIFACT_DIR", "WEIGHTS_FILE", "PROGRAM_FILE", "START_TIMEOUT_S"]

EXPERIMENT = "mvtk-registry"          # the MLflow experiment whose runs hold the versions' files
RECORD_TAG = "mvtk.record"            # model-version tag: mvtk's record of the version (JSON)
MODEL_TAG = "mvtk.registry"           # registered-model tag: this name is managed by mvtk
EVENT_PREFIX = "mvtk.alias_event."    # registered-model tags: one per alias move, named by time
ARTIFACT_DIR = "mvtk"                 # the run's artifact folder holding the files below
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "program.pt2"
START_TIMEOUT_S = 120.0               # an mlflow server takes 10-30 s to answer on a loaded 2-core machine
TIMEOUT_S = 10.0                     # default: how long one request waits for the server before failing
ALIAS_RETRIES = 3                     # tries of a first set_alias that races another client's
RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)  # MLflow refuses these alias names


class ClientSettings:
    """MLflow's HTTP settings (read from os.environ on every request) set during mvtk's calls, then restored.

    Lesson 11, §6. Nested and concurrent calls share one setting; the user's values come back after the last.
    """

    NAMES = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")

    def __init__(self):
        self.lock, self.depth, self.saved = threading.Lock(), 0, {}

    @contextmanager
    def applied(self, timeout: float):
        """Set the timeout (whole seconds, at least 1), no retries and no backoff for the calls inside."""
        with self.lock:
            if self.depth == 0:
                self.saved = {key: os.environ.get(key) for key in self.NAMES}
            self.depth += 1
            os.environ.update(zip(self.NAMES, (str(max(1, round(timeout))), "0", "0")))
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    for key, value in self.saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value


CLIENT_SETTINGS = ClientSettings()


class MlflowRegistry(Registry):
    """Lesson 04's registry calls on an MLflow server's Model Registry, at `uri` (Lesson 11, §6).

    Opened by `Registry("http://host:port")`. `signing_key` and `verify_key` work as for a folder:
    each record is signed at registration, checked before its weights are used. `create` is accepted
    for the same signature and ignored: the server holds the registry. `timeout` (s) bounds each
    request: a dead or frozen server fails the call with a RegistryError after it, without retries.
    MLflow's client reads its settings from the environment, so during each call this sets
    MLFLOW_HTTP_REQUEST_TIMEOUT, _MAX_RETRIES (0) and _BACKOFF_FACTOR (0), and restores them afterwards.
    """

    def __init__(self, root: str, *, create: bool = True,
                 signing_key: Ed25519PrivateKey | str | os.PathLike | None = None,
                 verify_key: Ed25519PublicKey | str | os.PathLike | None = None, timeout: float = TIMEOUT_S):
        parts = urlsplit(root) if isinstance(root, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgumentError(f"an MLflow registry URI must look like 'http://127.0.0.1:5000', got {root!r}")
        self.signing_key = load_key(signing_key, Ed25519PrivateKey, load_private_key, "signing_key", "private")
        self.verify_key = load_key(verify_key, Ed25519PublicKey, load_public_key, "verify_key", "public")
        self.timeout = check_number(timeout, "timeout", low=1, high=3600)
        self.root = self.uri = root.rstrip("/")
        try:
            answer = httpx.get(f"{self.uri}/health", timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise RegistryError(f"no MLflow server answers at {self.uri!r} ({type(exc).__name__}: {exc}); start one "
                                "(mvtk.registry.start_mlflow_server, or `mlflow server --port N`) or fix the URI"
                                ) from None
        if answer.status_code != 200:
            raise RegistryError(f"{self.uri!r} answered /health with {answer.status_code}, not 200: "
                                "is it an MLflow server?")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per download in notebooks
        from mlflow import MlflowClient  # here, not at the top: importing mlflow takes seconds

        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiment: str | None = None

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def close(self) -> None:
        """Nothing to close: every call is one HTTP request to the server (Lesson 11, §6)."""

    # -- registering -------------------------------------------------------------------------------------

    def register(self, name: str, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], *,
                 architecture: dict | None = None, metrics: dict | None = None, params: dict | None = None,
                 tags: dict | None = None, notes: str = "", parent: int | None = None, dataset=None,
                 init_args: dict | None = None, program_example: tuple | torch.Tensor | None = None) -> ModelVersion:
        """Upload the weights as a run's artifacts and create the next MLflow model version of `name` (Lesson 11, §6).

        Arguments and record as Registry.register. The number is MLflow's (1, 2, 3...); mvtk's record,
        signed with a signing key, becomes the version's `mvtk.record` tag. A failure after the version
        was created deletes it again, so no version without a record is left behind.
        """
        row, data, program = new_version_row(
            name, model_or_state_dict, architecture=architecture, metrics=metrics, params=params, tags=tags,
            notes=notes, parent=parent, dataset=dataset, init_args=init_args, program_example=program_example)
        if parent is not None:
            self.get(name, parent)
        with self._calls(f"registering {name}"):
            self._ensure_model(name)
            run = self.client.create_run(self._experiment_id(), run_name=f"{name}-weights", tags={MODEL_TAG: name})
            with tempfile.TemporaryDirectory(prefix="mvtk-mlflow-") as tmp:
                (Path(tmp) / WEIGHTS_FILE).write_bytes(data)
                if program is not None:
                    (Path(tmp) / PROGRAM_FILE).write_bytes(program)
                self.client.log_artifacts(run.info.run_id, tmp, ARTIFACT_DIR)
            self.client.update_run(run.info.run_id, status="FINISHED")  # set_terminated would print links
            created = self.client.create_model_version(name, f"{run.info.artifact_uri}/{ARTIFACT_DIR}",
                                                       run_id=run.info.run_id, description=notes,
                                                       await_creation_for=0)
            try:
                row["version"] = int(created.version)
                if self.signing_key is not None:
                    row["signature"] = sign_statement(version_statement(version_from_row(row)), self.signing_key)
                self.client.set_model_version_tag(name, created.version, RECORD_TAG, json.dumps(row, sort_keys=True))
            except BaseException:
                self.client.delete_model_version(name, created.version)
                raise
        return version_from_row(row)

    # -- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names registered through mvtk on this server, sorted (Lesson 11, §6)."""
        found, token = [], None
        with self._calls("listing the registered models"):
            while True:
                page = self.client.search_registered_models(max_results=1000, page_token=token)
                found += [rm.name for rm in page if MODEL_TAG in rm.tags]
                token = page.token
                if not token:
                    return sorted(found)

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name` that mvtk registered, oldest first (Lesson 11, §6)."""
        check_name(name)  # also what keeps the filter string below safe: no quote can appear in a name
        self._model(name)
        found, token = [], None
        with self._calls(f"listing the versions of {name}"):
            while True:
                page = self.client.search_model_versions(f"name = '{name}'", page_token=token)
                found += [record for mv in page if RECORD_TAG in mv.tags
                          if (record := self._record_or_warn(mv)) is not None]
                token = page.token
                if not token:
                    return sorted(found, key=lambda mv: mv.version)

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """One version: by number, by alias (also 'name@alias'), or the latest; NotFoundError lists what exists.

        Lesson 11, §6.
        """
        name, version, alias = checked_ref(name, version, alias)
        model = self._model(name)
        if alias is not None:
            aliases = {a: int(v) for a, v in model.aliases.items()}
            if alias not in aliases:
                raise NotFoundError(f"{name} has no alias {alias!r}; its aliases: {alias_cell(aliases) or 'none yet'}")
            version = aliases[alias]
        elif version is None:
            versions = self.versions(name)
            if not versions:
                raise NotFoundError(f"{name} has no version registered through mvtk in {self.uri!r}")
            return versions[-1]
        try:
            with self._calls(f"reading {name} v{version}"):
                return self._record(self.client.get_model_version(name, str(version)))
        except NotFoundError:
            numbers = [mv.version for mv in self.versions(name)]
            raise NotFoundError(f"{name} has no version {version}; its versions: {ranges(numbers)}") from None

    def aliases(self, name: str) -> dict[str, int]:
        """The aliases of `name` and the version each points to, as MLflow stores them (Lesson 11, §6)."""
        check_name(name)
        return {alias: int(v) for alias, v in sorted(self._model(name).aliases.items())}

    def weights_of(self, mv: ModelVersion, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Download the weights artifact of `mv` and check it against the recorded SHA-256 first (Lesson 11, §6)."""
        tensors = safetensors_load(self._artifact(mv, WEIGHTS_FILE, mv.sha256))
        return {key: tensors[key] if device is None else tensors[key].to(device) for key in mv.tensor_keys}

    def program_bytes_of(self, mv: ModelVersion) -> bytes:
        """Download the program artifact of `mv`, checked against its recorded SHA-256 (Lesson 11, §6)."""
        return self._artifact(mv, PROGRAM_FILE, mv.program_sha256)

    def lineage(self, name: str, version: int | None = None, alias: str | None = None) -> list[ModelVersion]:
        """The chain of parents ending at this version, oldest first; stops at a deleted parent (Lesson 11, §6)."""
        chain = [self.get(name, version, alias)]
        while chain[-1].parent is not None:
            try:
                chain.append(self.get(chain[-1].name, chain[-1].parent))
            except NotFoundError:
                break
        return chain[::-1]

    # -- aliases -----------------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point `name@alias` at `version` in MLflow; the move is kept as a registered-model tag (Lesson 11, §6)."""
        check_name(name)
        check_alias(alias)
        check_version_number(version, "version")
        self._check_reserved(alias, "alias")
        mv = self.get(name, version)
        self._move(name, alias, mv.version, "set")
        return mv

    def promote(self, name: str, source: str = "staging", target: str = "production") -> ModelVersion:
        """Point `target` at the version `source` points to, e.g. staging -> production (Lesson 11, §6)."""
        check_name(name)
        check_alias(source, "source")
        check_alias(target, "target")
        self._check_reserved(target, "target")
        mv = self.get(name, alias=source)
        self._move(name, target, mv.version, "promote")
        return mv

    def remove_alias(self, name: str, alias: str) -> None:
        """Delete `name@alias` in MLflow (the versions stay); the removal is logged (Lesson 11, §6)."""
        mv = self.get(name, alias=alias)
        with self._calls(f"removing {name}@{alias}"):
            self.client.delete_registered_model_alias(name, alias)
        self._log(name, alias, "remove", None, mv.version)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every move of `name`'s aliases made through mvtk (or of one alias), oldest first (Lesson 11, §6)."""
        check_name(name)
        if alias is not None:
            check_alias(alias)
        events = self._events(name)
        chosen = [e for e in events if alias is None or e.alias == alias]
        if alias is not None and not chosen:
            known = sorted({e.alias for e in events})
            raise NotFoundError(f"{name} has no alias {alias!r} with a history kept by mvtk; aliases with a history: "
                                f"{', '.join(known) or 'none yet'}")
        return chosen

    def rollback(self, name: str, alias: str) -> ModelVersion:
        """Move `alias` back to the version that held it before, from the history in tags; logged (Lesson 11, §6)."""
        current = self.get(name, alias=alias)
        events = [e for e in self._events(name) if e.alias == alias]
        target = rollback_target(current, alias, events, [mv.version for mv in self.versions(name)])
        self._move(name, alias, target, "rollback")
        return self.get(name, target)

    def delete_version(self, name: str, version: int) -> None:
        """Delete the MLflow model version; refused while an alias points to it (Lesson 11, §6).

        Its run and artifacts stay on the server (MLflow's own clean-up, `mlflow gc`, removes deleted runs).
        """
        check_name(name)
        check_version_number(version, "version")
        mv = self.get(name, version)
        holders = sorted(a for a, v in self.aliases(name).items() if v == version)
        if holders:
            raise RegistryError(f"cannot delete {mv.ref}: {', '.join(f'{name}@{a}' for a in holders)} "
                                "point(s) to it; move or remove the alias first")
        with self._calls(f"deleting {mv.ref}"):
            self.client.delete_model_version(name, str(version))

    # -- what the folder registry has and this backend does not ------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Refused: the weights are artifacts on the server, not files here (Lesson 11, §6)."""
        raise self._unsupported("blob_path", "the weights are run artifacts on the server, not local files")

    def check(self):
        """Refused: the server's files are not readable from here; load() checks each version (Lesson 11, §6)."""
        raise self._unsupported("check", "load() verifies each version's weights against its SHA-256 instead")

    def gc(self):
        """Refused: MLflow's own `mlflow gc` removes deleted runs and their artifacts (Lesson 11, §6)."""
        raise self._unsupported("gc", "run `mlflow gc` against the server's database instead")

    def export(self, path=None, *, overwrite: bool = False):
        """Refused: export a folder registry; the server's database is its own record (Lesson 11, §6)."""
        raise self._unsupported("export", "the server's database (SQLite here) is the record; back it up instead")

    def export_versions(self, folder, names=None):
        """Refused: bundles move versions between folder registries (Lesson 11, §6)."""
        raise self._unsupported("export_versions", "load the versions and register them into a folder registry")

    def import_versions(self, folder, *, verify_key=None):
        """Refused: bundles move versions between folder registries (Lesson 11, §6)."""
        raise self._unsupported("import_versions", "load the bundle into a folder registry, then register here")

    # -- MLflow calls ------------------------------------------------------------------------------------------

    @contextmanager
    def _calls(self, what: str):
        """MLflow's exceptions as mvtk's: NotFoundError for a missing resource, RegistryError otherwise."""
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        try:
            with CLIENT_SETTINGS.applied(self.timeout):
                yield
        except MlflowException as exc:
            message = str(exc.message).splitlines()[0][:300] if exc.message else type(exc).__name__
            if any(word in str(exc.message) for word in ("timed out", "timeout", "Max retries exceeded", "refused")):
                message = (f"no answer within {self.timeout:g} s (is the server down, frozen or overloaded? "
                           "Registry(..., timeout=) waits longer)")
            kind = NotFoundError if exc.error_code == "RESOURCE_DOES_NOT_EXIST" else RegistryError
            raise kind(f"MLflow server {self.uri!r}, {what}: {message}") from None
        except (RequestException, OSError) as exc:
            raise RegistryError(f"MLflow server {self.uri!r}, {what}: no answer ({type(exc).__name__}: "
                                f"{str(exc)[:300]}); is it running?") from None

    def _model(self, name: str):
        """The registered model `name`; NotFoundError listing the names unless mvtk registered it."""
        try:
            with self._calls(f"reading the registered model {name}"):
                model = self.client.get_registered_model(name)
        except NotFoundError:
            model = None
        if model is None or MODEL_TAG not in model.tags:
            raise NotFoundError(f"no model named {name!r} in registry {self.uri!r}; "
                                f"its names: {', '.join(self.names()) or 'none yet'}")
        return model

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags={MODEL_TAG: "1"})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self.client.set_registered_model_tag(name, MODEL_TAG, "1")

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        if self._experiment is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            if found is None:
                try:
                    self._experiment = self.client.create_experiment(EXPERIMENT)
                except MlflowException:  # another client created it meanwhile
                    self._experiment = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
            else:
                self._experiment = found.experiment_id
        return self._experiment

    def _record(self, found) -> ModelVersion:
        """mvtk's record of an MLflow model version, checked to belong to that version."""
        text = found.tags.get(RECORD_TAG)
        if text is None:
            raise RegistryError(f"{found.name} v{found.version} in {self.uri!r} has no {RECORD_TAG} tag: it was not "
                                "registered through mvtk (or its registration is still running)")
        try:
            mv = version_from_row(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RegistryError(f"{found.name} v{found.version}: its {RECORD_TAG} tag is not an mvtk record: "
                                f"{exc}") from None
        if (mv.name, str(mv.version)) != (found.name, str(found.version)):
            raise IntegrityError(f"{found.name} v{found.version}: its {RECORD_TAG} tag records {mv.ref}; "
                                 "the tag was copied from another version")
        return mv

    def _record_or_warn(self, found) -> ModelVersion | None:
        """The record of `found`, or None with a RuntimeWarning naming it when its tag is damaged (listing goes on)."""
        try:
            return self._record(found)
        except (RegistryError, IntegrityError) as exc:
            warnings.warn(f"skipped a damaged version: {exc}; get({found.name!r}, {found.version}) raises the same",
                          RuntimeWarning, stacklevel=3)
            return None

    def _artifact(self, mv: ModelVersion, filename: str, sha256: str | None) -> bytes:
        """One file of `mv` downloaded from the server, after checking its SHA-256."""
        if sha256 is None:
            raise RegistryError(f"{mv.ref} has no torch.export program; register with program_example=(example_input,) "
                                "to store one")
        from mlflow.artifacts import download_artifacts

        with self._calls(f"downloading {filename} of {mv.ref}"), tempfile.TemporaryDirectory(prefix="mvtk-") as tmp:
            source = self.client.get_model_version_download_uri(mv.name, str(mv.version))
            path = download_artifacts(artifact_uri=f"{source}/{filename}", dst_path=tmp, tracking_uri=self.uri)
            data = Path(path).read_bytes()
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityError(f"{mv.ref}: the artifact {filename} on {self.uri!r} does not match the SHA-256 "
                                 f"recorded at registration (expected {sha256[:12]}..., got {actual[:12]}...); "
                                 "it changed after it was registered: register the version again")
        return data

    def _events(self, name: str) -> list[AliasEvent]:
        tags = self._model(name).tags
        keys = sorted(k for k in tags if k.startswith(EVENT_PREFIX))
        return [AliasEvent(seq=i, name=name, **json.loads(tags[k])) for i, k in enumerate(keys, start=1)]

    def _move(self, name: str, alias: str, version: int, action: str) -> None:
        """Point `alias` at `version` and log the move; nothing happens if it already points there."""
        previous = self.aliases(name).get(alias)
        if previous == version:
            return
        for attempt in range(1, ALIAS_RETRIES + 1):
            try:
                with self._calls(f"setting {name}@{alias}"):
                    self.client.set_registered_model_alias(name, alias, str(version))
                break
            except RegistryError as exc:  # two first sets of one alias: the loser's insert breaks UNIQUE
                if "UNIQUE constraint" not in str(exc):
                    raise
                if attempt == ALIAS_RETRIES:
                    raise RegistryError(f"MLflow server {self.uri!r}, setting {name}@{alias}: another client set this "
                                        f"alias at the same time, {ALIAS_RETRIES} times; try again") from None
                time.sleep(0.05 * attempt)
        self._log(name, alias, action, version, previous)

    def _log(self, name: str, alias: str, action: str, version: int | None, previous: int | None) -> None:
        event = {"alias": alias, "action": action, "version": version, "previous": previous, "at": utc_now()}
        key = f"{EVENT_PREFIX}{time.time_ns():020d}-{secrets.token_hex(4)}"  # sorts by time; never overwritten
        with self._calls(f"logging the move of {name}@{alias}"):
            self.client.set_registered_model_tag(name, key, json.dumps(event, sort_keys=True))

    def _check_reserved(self, alias: str, what: str) -> None:
        """InvalidArgumentError for an alias name MLflow reserves ('latest', 'v1'...), before any request."""
        if RESERVED_ALIAS.fullmatch(alias):
            raise InvalidArgumentError(f"{what} {alias!r} is reserved on the MLflow backend ('latest' and 'v<number>', "
                                       "any case, name versions there); choose another name, e.g. 'production'")

    def _unsupported(self, call: str, instead: str) -> RegistryError:
        return RegistryError(f"{call}() is not supported on the MLflow backend: {instead}")


for _scheme in ("http", "https"):
    BACKENDS[_scheme] = MlflowRegistry


# -- a real mlflow server, started and stopped here ------------------------------------------------------------


class MlflowServer:
    """A running `mlflow server` in its own process group: its URL, folder and log; stop() ends it (Lesson 11, §6)."""

    def __init__(self, popen: subprocess.Popen, url: str, folder: Path):
        self.popen, self.url, self.folder = popen, url, folder
        self.log_path = folder / "server.log"
        self.port = urlsplit(url).port

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"MlflowServer({state})"

    def alive(self) -> bool:
        """True while the server's main process runs (Lesson 11, §6)."""
        return self.popen.poll() is None

    def log(self) -> str:
        """What the server printed so far (Lesson 11, §6)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float = START_TIMEOUT_S) -> "MlflowServer":
        """Wait until /health answers 200; RegistryError (group killed) on exit or timeout (Lesson 11, §6)."""
        check_number(timeout, "timeout", low=0, low_open=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self.stop()
                raise RegistryError(f"the mlflow server in {str(self.folder)!r} exited with code "
                                    f"{self.popen.returncode} before answering; its log ends:\n{self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RegistryError(f"the mlflow server did not answer {self.url}/health within {timeout:g} s (stopped now); "
                            f"its log ends:\n{self.log()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after `timeout` s, wait for the port (Lesson 11, §6)."""
        atexit.unregister(self.stop)
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.popen.pid, sig)  # start_new_session: the group's id is the server's pid
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the main process is gone; anything left of its group goes now
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and _listening("127.0.0.1", self.port):
            time.sleep(0.1)
        return self.popen.returncode

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_mlflow_server(folder: str | os.PathLike, *, port: int = 0, wait: bool = True,
                        timeout: float = START_TIMEOUT_S) -> MlflowServer:
    """Start `mlflow server` on 127.0.0.1 with a SQLite database and artifacts in `folder` (Lesson 11, §6).

    `port` 0 picks a free port. The server runs in a new process group (one uvicorn worker, MLflow's
    job runner off) and is stopped at interpreter exit if stop() was not called. With `wait`, returns
    once /health answers (RegistryError with the log's end after `timeout` s); else call wait() later.
    """
    folder = Path(folder)
    port = check_int(port, "port", low=0, high=65535)
    folder.mkdir(parents=True, exist_ok=True)
    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{(folder / 'mlflow.sqlite').resolve()}",
               "--artifacts-destination", str((folder / "artifacts").resolve())]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    with open(folder / "server.log", "wb") as log:
        popen = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
    server = MlflowServer(popen, f"http://127.0.0.1:{port}", folder)
    atexit.register(server.stop)
    return server.wait(timeout) if wait else server


def _listening(host: str, port: int) -> bool:
    """True when something accepts connections on host:port."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0
