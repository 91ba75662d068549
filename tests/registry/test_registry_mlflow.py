"""The team registry (Lesson 11, §6): Lesson 04's calls on a real `mlflow server` on 127.0.0.1, the service on top."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from mvtk.checkpoint.signing import new_signing_key
from mvtk.errors import IntegrityError, InvalidArgumentError, NotFoundError, RegistryError, SignatureError
from mvtk.files import sha256_file
from mvtk.models import MLP
from mvtk.registry import MlflowRegistry, Registry, start_mlflow_server
from mvtk.serve import ServeConfig, start_service

pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server():
    """One real mlflow server for the module (10-30 s to start); afterwards no process, port or folder is left."""
    folder = Path(tempfile.mkdtemp(prefix="mvtk-test-mlflow-"))
    running = start_mlflow_server(folder, timeout=150)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert not group_alive(running.popen.pid), "the server's process group outlived stop()"
    assert not listening(running.port), f"port {running.port} still accepts connections after stop()"
    assert not folder.exists()


@pytest.fixture(scope="module")
def team(server):
    """The server's registry: 'digits' v1 (seed 0) and v2 (seed 1); production -> v1, staging -> v2."""
    registry = Registry(server.url)
    for seed in (0, 1):
        torch.manual_seed(seed)
        registry.register("digits", MLP(hidden=16), metrics={"val_acc": 0.9 + seed / 100},
                          parent=None if seed == 0 else 1)
    registry.set_alias("digits", "staging", 1)
    registry.promote("digits")
    registry.set_alias("digits", "staging", 2)
    return registry


def test_a_url_opens_the_mlflow_backend_and_a_folder_the_local_one(team, tmp_path):
    assert isinstance(team, MlflowRegistry) and isinstance(team, Registry)
    assert type(Registry(tmp_path / "local")) is Registry


def test_versions_count_up_and_aliases_point_where_they_were_set(team):
    assert [mv.version for mv in team.versions("digits")] == [1, 2]
    assert team.aliases("digits") == {"production": 1, "staging": 2}
    assert team.get("digits@production").version == 1
    assert team.get("digits").version == 2  # no version, no alias: the latest
    assert "digits" in team.names()


def test_load_by_alias_gives_back_the_registered_weights(team):
    torch.manual_seed(1)
    expected = MLP(hidden=16).state_dict()
    loaded = team.load("digits", alias="staging")
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    model = team.load_model("digits@staging")
    assert torch.equal(model.fc1.weight, expected["fc1.weight"]) and not model.training


def test_the_table_lists_versions_metrics_and_aliases(team):
    text = str(team.table("digits"))
    assert "val_acc=0.9000" in text and "production" in text and "staging" in text
    assert "digits" in str(team.table())


def test_promote_history_and_rollback_kept_on_tags(server):
    registry = Registry(server.url)
    for seed in range(3):
        torch.manual_seed(seed)
        registry.register("history", MLP(hidden=8))
    for version in (1, 2, 3):
        registry.set_alias("history", "staging", version)
        registry.promote("history")
    assert registry.rollback("history", "production").version == 2
    assert registry.rollback("history", "production").version == 1
    with pytest.raises(RegistryError, match="nothing left to undo"):
        registry.rollback("history", "production")
    actions = [(e.alias, e.action, e.previous, e.version) for e in registry.alias_history("history", "production")]
    assert actions == [("production", "promote", None, 1), ("production", "promote", 1, 2),
                       ("production", "promote", 2, 3), ("production", "rollback", 3, 2),
                       ("production", "rollback", 2, 1)]
    diff = registry.diff("history", 1, 2)
    assert {c.key for c in diff.tensors} == set(registry.load("history", 1))
    assert [mv.version for mv in registry.lineage("history", 3)] == [3]


def test_a_tampered_artifact_is_refused_on_load(server):
    registry = Registry(server.url)
    torch.manual_seed(5)
    registry.register("tampered", MLP(hidden=8))
    weights = [p for p in (server.folder / "artifacts").rglob("weights.safetensors")]
    target = next(p for p in weights if sha256_file(p) == registry.get("tampered").sha256)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the SHA-256"):
        registry.load_model("tampered")


def test_unknown_names_aliases_and_versions_list_what_exists(team):
    with pytest.raises(NotFoundError, match="no alias 'canary'.*production -> v1"):
        team.get("digits@canary")
    with pytest.raises(NotFoundError, match="no version 9; its versions: 1-2"):
        team.get("digits", 9)
    with pytest.raises(NotFoundError, match="no model named 'nothing'.*digits"):
        team.versions("nothing")


@pytest.mark.parametrize("name", ["x' OR name LIKE '%", "../../etc/passwd", "a@b@c", "", "a/b", "x\nname = 'y'"])
def test_hostile_names_are_refused_before_reaching_the_server(team, name):
    with pytest.raises(InvalidArgumentError):
        team.versions(name)
    with pytest.raises(InvalidArgumentError):
        team.register(name, {"w": torch.zeros(2)})


def test_calls_the_mlflow_backend_cannot_make_are_refused_plainly(team, tmp_path):
    for call in (team.gc, team.check, team.export, lambda: team.export_versions(tmp_path / "b")):
        with pytest.raises(RegistryError, match="not supported on the MLflow backend"):
            call()


def test_an_unreachable_server_fails_at_once_with_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once the socket is closed
    started = time.monotonic()
    with pytest.raises(RegistryError, match="no MLflow server answers"):
        Registry(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 30


def test_a_uri_without_a_backend_is_refused():
    with pytest.raises(InvalidArgumentError, match="no backend for ftp://"):
        Registry("ftp://127.0.0.1/registry")


def test_the_service_serves_name_at_production_from_the_mlflow_registry(team, server, tmp_path):
    config = ServeConfig(registry=server.url, model="digits", alias="production", port=0,
                         cache_dir=str(tmp_path / "cache"), drift_reference="")
    with start_service(config, log_path=tmp_path / "serve.log", timeout=120) as service:
        answer = httpx.post(f"{service.url}/predict", json={"inputs": np.zeros((2, 1, 8, 8)).tolist()}, timeout=30)
        info = httpx.get(f"{service.url}/model", timeout=30).json()
    assert answer.status_code == 200 and answer.json()["version"] == 1
    assert info["sha256"] == team.get("digits@production").sha256


def test_signed_versions_verify_on_load_and_unsigned_ones_are_refused(server, tmp_path):
    private, public = new_signing_key(tmp_path / "key.pem", tmp_path / "key.pub")
    torch.manual_seed(7)
    Registry(server.url, signing_key=private).register("signed", MLP(hidden=8))
    Registry(server.url).register("signed", MLP(hidden=8))  # v2: no signature
    checked = Registry(server.url, verify_key=public)
    assert checked.load("signed", 1)
    with pytest.raises(SignatureError):
        checked.load("signed", 2)
