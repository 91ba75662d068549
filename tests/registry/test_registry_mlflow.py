"""The team registry (Lesson 11, §6): Lesson 04's calls on a real `mlflow server` on 127.0.0.1, the service on top."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
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


def test_int8_weights_are_refused_before_reaching_the_server(team):
    """Safetensors stores plain tensors only: both backends check that before anything is uploaded."""
    from mvtk.compress import quantize_int8
    before = len(team.versions("digits"))
    with pytest.raises(InvalidArgumentError, match=r"Int8Tensor.*float model.*quantize"):
        team.register("digits", quantize_int8(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))))
    assert len(team.versions("digits")) == before


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


def test_a_url_with_one_slash_is_refused_and_creates_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for root in ("http:/127.0.0.1", "https:/host:5000/x"):
        with pytest.raises(InvalidArgumentError, match="'http://host:port'"):
            Registry(root)
    assert not list(tmp_path.iterdir())


def test_reserved_and_too_long_aliases_are_refused_before_a_request(team):
    for alias in ("latest", "LATEST", "v1", "V12"):
        with pytest.raises(InvalidArgumentError, match="reserved on the MLflow backend"):
            team.set_alias("digits", alias, 1)
    with pytest.raises(InvalidArgumentError, match="1 to 64 characters"):
        team.set_alias("digits", "a" * 200, 1)


def test_concurrent_first_sets_of_one_alias_all_succeed(server):
    registry = Registry(server.url)
    torch.manual_seed(3)
    registry.register("race", MLP(hidden=8))
    errors = []

    def set_it():
        try:
            Registry(server.url).set_alias("race", "shared", 1)
        except Exception as exc:  # noqa: BLE001 - collected and shown by the assert
            errors.append(exc)

    threads = [threading.Thread(target=set_it) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert registry.aliases("race") == {"shared": 1}


def test_a_damaged_record_is_skipped_in_listings_and_refused_on_get(server):
    registry = Registry(server.url)
    for seed in (0, 1):
        torch.manual_seed(seed)
        registry.register("damaged", MLP(hidden=8))
    registry.client.set_model_version_tag("damaged", "1", "mvtk.record", "{not json")
    with pytest.warns(RuntimeWarning, match="damaged version.*damaged v1"):
        assert [mv.version for mv in registry.versions("damaged")] == [2]
    with pytest.warns(RuntimeWarning):
        assert registry.get("damaged").version == 2
        assert "damaged" in str(registry.table("damaged")) and "damaged" in str(registry.table())
    with pytest.raises(RegistryError, match="not an mvtk record"):
        registry.load("damaged", 1)


def test_a_frozen_server_fails_each_call_within_the_timeout_and_the_environment_is_restored(tmp_path):
    """SIGSTOP the server's group: each call fails after `timeout` s (no retries); SIGCONT, and it answers again."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    with start_mlflow_server(tmp_path / "frozen", timeout=150) as frozen:
        registry = Registry(frozen.url, timeout=2)
        assert registry.names() == []
        os.killpg(frozen.popen.pid, signal.SIGSTOP)
        try:
            for call in (registry.names, lambda: registry.register("cold", {"w": torch.zeros(2)})):
                started = time.monotonic()
                with pytest.raises(RegistryError, match=f"MLflow server '{frozen.url}'.*no answer within 2 s"):
                    call()
                assert time.monotonic() - started < 20
        finally:
            os.killpg(frozen.popen.pid, signal.SIGCONT)
        assert registry.names() == []
    assert {k: os.environ.get(k) for k in before} == before
    with pytest.raises(InvalidArgumentError, match="timeout"):
        Registry("http://127.0.0.1:1", timeout=0)
