"""Lesson 10's claims about the HTTP service, against a real uvicorn process on a free port of 127.0.0.1.

Nothing is mocked: a registry on disk, ONNX exports, a `python -m mvtk.serve` process, HTTP over
loopback. Every load loop is bounded in count and time; every process is stopped (SIGTERM) or its
whole group killed, and the last test checks that none is left.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from mvtk.data import load_dataset, make_loaders
from mvtk.env import seed_everything
from mvtk.errors import InvalidArgumentError, NotFoundError
from mvtk.export import Predictor
from mvtk.models import MLP
from mvtk.registry import Registry
from mvtk.serve import (MicroBatcher, ServeConfig, ServiceError, create_app, ensure_model, failure_text, load_test,
                        parse_args, parse_metrics, remove_stale_staging, request_bodies, start_service, to_args)
from mvtk.train import fit
from notebook_utils import ROOT

NAME, ALIAS = "digits", "production"
STARTED: list[int] = []  # pids of every service a test started: none may be alive at the end


def trained_mlp(seed: int) -> MLP:
    seed_everything(seed)
    loaders = make_loaders(size=8, seed=seed)
    model = MLP(hidden=32)
    fit(model, loaders.train, loaders.val, epochs=2, progress=False)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry with v1 (production) and v2, both already exported to the ONNX cache."""
    root = tmp_path_factory.mktemp("serve")
    registry = Registry(root / "registry")
    for seed in (1, 2):
        registry.register(NAME, trained_mlp(seed))
    registry.set_alias(NAME, ALIAS, 1)
    for version in (1, 2):  # export once here, so alias moves in the service only verify
        Predictor.from_registry(registry, NAME, version=version, cache_dir=root / "cache", threads=1)
    images = load_dataset("digits", "test").images.numpy()
    return {"root": root, "registry": registry, "images": images}


def config(world, **overrides) -> ServeConfig:
    return ServeConfig(registry=str(world["root"] / "registry"), cache_dir=str(world["root"] / "cache"),
                       port=0, poll_s=0.05, **overrides)


def started(world, name: str, **overrides):
    service = start_service(config(world, **overrides), log_path=world["root"] / f"{name}.log",
                            ready=overrides.get("alias", ALIAS) == ALIAS)
    STARTED.append(service.pid)
    return service


@pytest.fixture(scope="module")
def service(world):
    service = started(world, "main", retry_s=0.3)
    yield service
    code = service.stop()
    assert code in (0, -signal.SIGTERM), service.log()[-2000:]


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=10.0) as client:
        yield client


def post(client, inputs) -> httpx.Response:
    return client.post("/predict", content=json.dumps({"inputs": inputs}))


def wait_until(check, timeout: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout} s")


def metrics(client) -> dict[str, float]:
    return parse_metrics(client.get("/metrics").text)


# -- the endpoints --------------------------------------------------------------------------------------


def test_liveness_readiness_and_model_info_describe_the_aliased_version(world, client):
    assert client.get("/live").json() == {"alive": True}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["in_sync"] and ready.json()["serving_version"] == 1
    info = client.get("/model").json()
    mv = world["registry"].get(NAME, alias=ALIAS)
    assert (info["name"], info["version"], info["alias"], info["sha256"]) == (NAME, 1, f"{NAME}@{ALIAS}", mv.sha256)
    assert re.fullmatch(r"[0-9a-f]{64}", info["onnx_sha256"]) and info["input_shape"] == [1, 8, 8]


def test_predict_answers_one_image_or_a_batch_with_the_version_and_matches_the_predictor(world, client):
    images = world["images"][:5]
    expected = Predictor.from_registry(world["registry"], NAME, version=1, cache_dir=world["root"] / "cache")
    one, batch = post(client, images[0].tolist()).json(), post(client, images.tolist()).json()
    assert one["version"] == batch["version"] == 1 and one["model"] == NAME
    assert batch["labels"] == expected.predict(images).labels.tolist() and one["labels"] == batch["labels"][:1]
    assert np.allclose(np.sum(batch["probabilities"], axis=1), 1, atol=1e-4)


def test_metrics_are_prometheus_text_with_requests_version_and_latency(client):
    post(client, [[[0.0] * 8] * 8])
    values = metrics(client)
    assert values["mvtk_serve_model_version"] == 1 and values["mvtk_serve_ready"] == 1
    assert values['mvtk_serve_requests_total{endpoint="predict",status="200"}'] >= 1
    assert values["mvtk_serve_predict_seconds_count"] >= 1


# -- bad requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, problem", [
    (b"{not json", "not JSON"),
    (b'{"images": []}', "keys ['images']"),
    (json.dumps({"inputs": [[1.0, 2.0], [3.0]]}).encode(), "ragged"),
    (json.dumps({"inputs": [[["a"] * 8] * 8]}).encode(), "strings"),
    (json.dumps({"inputs": [[[True] * 8] * 8]}).encode(), "true/false"),
    (json.dumps({"inputs": [[[0.5] * 4] * 8]}).encode(), "(N, 1, 8, 8), got (1, 8, 4)"),
    (json.dumps({"inputs": [[[255.0] * 8] * 8]}).encode(), "pixel values in [0, 1]"),
    (b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}', "(N, 1, 8, 8)"),
    (json.dumps({"inputs": [[[float(10**40)] * 8] * 8]}).encode(), "NaN/inf"),
    (json.dumps({"inputs": []}).encode(), "(N, 1, 8, 8)"),
    (b'{"inputs": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}", "nested too deeply"),
    (b'{"inputs": ' + b"[" * 100 + b"0" + b"]" * 100 + b"}", "nested too deeply"),
    (b'{"inputs": [[[' + b"9" * 5001 + b"]]]}", "a number too large"),
])
def test_bad_input_gets_422_naming_the_problem_and_the_service_keeps_answering(client, body, problem):
    response = client.post("/predict", content=body)
    assert response.status_code == 422 and problem in response.json()["error"], response.text
    assert client.get("/live").status_code == 200


def test_an_oversized_body_gets_413_declared_or_streamed(client):
    declared = client.post("/predict", content=b" " * (2 << 20))
    streamed = client.post("/predict", content=iter([b" " * (1 << 19)] * 4))  # chunked: no content-length
    assert declared.status_code == streamed.status_code == 413
    assert "over the limit" in declared.json()["error"]


def test_a_body_that_is_not_json_typed_gets_415_and_too_many_rows_get_413_naming_the_limit(client):
    form = client.post("/predict", content=b"inputs=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    typed = client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]}, headers={"content-type": "application/json"})
    assert typed.status_code == 200
    many = post(client, np.zeros((1025, 1, 8, 8)).tolist())
    assert many.status_code == 413 and "max_rows=1024" in many.json()["error"]


def test_every_status_is_counted_and_an_unhandled_error_is_a_json_500_without_a_traceback(world):
    app = create_app(config(world, drift_reference=""))

    async def broken(array):
        raise RuntimeError(f"internal detail at {world['root']}")

    async def scenario():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://test") as client:
            for _ in range(400):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.post("/predict", content=b"{")).status_code == 422
            app.state.batcher.submit = broken
            failures = [await client.post("/predict", json={"inputs": [[[0.0] * 8] * 8]}) for _ in range(3)]
            return failures, parse_metrics((await client.get("/metrics")).text)

    failures, values = asyncio.run(scenario())
    assert all(r.status_code == 500 and r.json()["error"].startswith("internal error (RuntimeError)")
               for r in failures)
    assert str(world["root"]) not in failures[0].text and "Traceback" not in failures[0].text
    assert values['mvtk_serve_requests_total{endpoint="predict",status="500"}'] == 3
    assert values['mvtk_serve_requests_total{endpoint="predict",status="422"}'] == 1


def test_an_unknown_alias_gives_503_on_readiness_naming_what_exists(world):
    service = started(world, "canary", alias="canary")
    try:
        with httpx.Client(base_url=service.url, timeout=10.0) as client:
            ready = wait_until(lambda: (r := client.get("/ready")).json()["polls"] and r, what="a first poll")
            assert ready.status_code == 503 and "production" in ready.json()["problem"]
            assert post(client, [[[0.0] * 8] * 8]).status_code == 503
            assert client.get("/model").status_code == 503
    finally:
        service.stop()


# -- following the alias --------------------------------------------------------------------------------


def test_ten_alias_moves_under_load_drop_no_request_and_serve_only_aliased_versions(world, service, client):
    registry, bodies = world["registry"], request_bodies(world["images"][:64])
    aliased = {registry.get(NAME, alias=ALIAS).version}
    box = {}
    loader = threading.Thread(target=lambda: box.update(result=load_test(
        service.url, bodies, clients=4, requests=4000, time_limit_s=4.0)))
    loader.start()
    for move in range(10):
        time.sleep(0.3)
        mv = registry.set_alias(NAME, ALIAS, 2) if move % 2 == 0 else registry.rollback(NAME, ALIAS)
        aliased.add(mv.version)
    loader.join(60)
    result = box["result"]
    assert result.count >= 20 and result.failed == 0
    assert set(result.versions) <= aliased == {1, 2}
    assert wait_until(lambda: client.get("/ready").json()["in_sync"], what="in sync after the moves")
    assert metrics(client)["mvtk_serve_swaps"] >= 2


def test_a_version_that_fails_verification_is_not_served(world, client):
    registry = world["registry"]
    bad = registry.register(NAME, trained_mlp(3))
    blob = registry.blob_path(bad.sha256)
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")  # the stored weights no longer match their SHA-256
    before = client.get("/ready").json()["serving_version"]
    registry.set_alias(NAME, ALIAS, bad.version)
    ready = wait_until(lambda: (r := client.get("/ready").json())["alias_version"] == bad.version
                       and r["problem"] and r, what="the refusal")
    assert ready["serving_version"] == before and not ready["in_sync"] and f"v{bad.version}" in ready["problem"]
    assert post(client, world["images"][:2].tolist()).json()["version"] == before
    values = metrics(client)
    assert values["mvtk_serve_verification_failures"] >= 1 and values["mvtk_serve_in_sync"] == 0
    registry.set_alias(NAME, ALIAS, before)
    assert wait_until(lambda: client.get("/ready").json()["in_sync"], what="in sync again")


def test_a_refused_version_is_retried_after_a_backoff_and_served_once_repaired(world, service, client):
    registry = world["registry"]
    bad = registry.register(NAME, trained_mlp(4))
    blob = registry.blob_path(bad.sha256)
    good_bytes = blob.read_bytes()
    blob.write_bytes(good_bytes[:-8] + b"tampered")
    before = client.get("/ready").json()["serving_version"]
    registry.set_alias(NAME, ALIAS, bad.version)
    ready = wait_until(lambda: (r := client.get("/ready").json())["alias_version"] == bad.version
                       and r["problem"] and r, what="the refusal")
    assert ready["serving_version"] == before and str(world["root"]) not in json.dumps(ready)  # no paths over HTTP
    blob.write_bytes(good_bytes)  # repaired; the alias does not move
    assert wait_until(lambda: client.get("/ready").json()["serving_version"] == bad.version, timeout=60,
                      what="the retry")
    assert f"retrying {NAME} v{bad.version}" in service.log()
    registry.set_alias(NAME, ALIAS, before)
    assert wait_until(lambda: client.get("/ready").json()["serving_version"] == before, what="back")


# -- live monitoring ------------------------------------------------------------------------------------


def test_drift_alarm_rises_on_a_shifted_stream_and_not_on_a_clean_one(world, client):
    clean = world["images"][:200]
    shifted = np.roll(clean, 1, axis=3)  # a camera that moved one pixel
    for images in np.split(clean, 2):
        assert post(client, images.tolist()).status_code == 200
    assert metrics(client)["mvtk_serve_drift_alarm"] == 0
    for images in np.split(shifted, 2):
        assert post(client, images.tolist()).status_code == 200
    values = metrics(client)
    assert values["mvtk_serve_drift_alarm"] == 1 and values["mvtk_serve_drift_psi"] > 0.2
    assert values["mvtk_serve_drift_enabled"] == 1


# -- shutting down --------------------------------------------------------------------------------------


def test_sigterm_stops_accepting_finishes_in_flight_requests_then_exits(world):
    service = started(world, "sigterm")
    body = json.dumps({"inputs": world["images"][:4].tolist()}).encode()
    release = None

    async def slow_upload():  # half the body now, the rest after SIGTERM: in flight during the shutdown
        yield body[: len(body) // 2]
        await release.wait()
        yield body[len(body) // 2:]

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=service.url, timeout=30.0) as client:
            tasks = [asyncio.create_task(client.post("/predict", content=slow_upload())) for _ in range(4)]
            async with httpx.AsyncClient(base_url=service.url, timeout=5.0) as probe:
                for _ in range(200):
                    if parse_metrics((await probe.get("/metrics")).text)["mvtk_serve_in_flight"] == 4:
                        break
                    await asyncio.sleep(0.05)
            os.kill(service.pid, signal.SIGTERM)
            refused = False
            for _ in range(100):  # a new connection is refused while the four are still in flight
                try:
                    async with httpx.AsyncClient(base_url=service.url, timeout=1.0) as late:
                        await late.get("/live")
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):  # refused or dropped
                    refused = True
                    break
                await asyncio.sleep(0.05)
            release.set()
            return refused, await asyncio.gather(*tasks)

    try:
        refused, responses = asyncio.run(scenario())
        assert refused
        assert [r.status_code for r in responses] == [200] * 4 and {r.json()["version"] for r in responses} == {1}
        assert service.popen.wait(20) in (0, -signal.SIGTERM)
    finally:
        service.stop()


def test_a_service_that_cannot_start_says_why(world, tmp_path):
    with pytest.raises(ServiceError, match="no registry") as caught:
        start_service(ServeConfig(registry=str(tmp_path / "nothing"), port=0), log_path=tmp_path / "log", timeout=60)
    assert "exited with code 2" in str(caught.value) and "--registry" in str(caught.value)
    assert "Traceback" not in str(caught.value) and "--root" not in str(caught.value)


def test_a_bad_setting_on_the_command_line_is_one_argparse_line(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--model", "../evil"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and "error: model must be" in err and "'../evil'" in err


def test_bootstrap_refuses_a_registry_that_holds_other_models(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.register("img", torch.nn.Linear(4, 2), init_args={"in_features": 4, "out_features": 2})
    with pytest.raises(NotFoundError, match="no model named 'imgg'.*holds 'img'"):
        ensure_model(registry, "imgg", ALIAS)
    assert list(registry.names()) == ["img"]


def test_a_failure_shown_over_http_has_no_colour_codes_or_paths_and_keeps_its_cause():
    text = failure_text(ValueError("\x1b[96mcannot export\x1b[0m. Next steps:\n  the cause: /srv/reg/blobs/ab/abc.pt"))
    assert text == "ValueError: cannot export. Next steps: the cause: <path>/abc.pt"


# -- pieces that need no process ------------------------------------------------------------------------


def test_the_command_line_gives_back_the_config():
    original = ServeConfig(registry="r", alias="staging", port=0, batching=False, max_wait_ms=1.5)
    assert parse_args(to_args(original)) == original


def test_the_batcher_answers_every_request_with_its_own_rows_in_fewer_calls():
    calls = []

    def run(arrays):
        calls.append(len(arrays))
        return [a.sum(axis=1) for a in arrays]

    async def main():
        batcher = MicroBatcher(run, max_batch=64, max_wait_s=0.05)
        await batcher.start()
        arrays = [np.full((i % 3 + 1, 2), i, dtype=np.float32) for i in range(20)]
        answers = await asyncio.gather(*(batcher.submit(a) for a in arrays))
        await batcher.stop()
        return arrays, answers

    arrays, answers = asyncio.run(main())
    assert all(np.array_equal(answer, a.sum(axis=1)) for answer, a in zip(answers, arrays))
    assert sum(calls) == 20 and len(calls) < 20


# -- the Dockerfile ---------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_the_dockerfile_pins_its_base_runs_unprivileged_checks_health_and_binds_as_configured():
    steps = dockerfile()
    kinds = [kind for kind, _ in steps]
    base = [args for kind, args in steps if kind == "FROM"]
    assert base and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", b.split()[0])
                        for b in base), base  # an exact release (digest optional), never a moving tag
    users = [args.strip() for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0") and kinds.index("USER") < kinds.index("CMD")
    health = [args for kind, args in steps if kind == "HEALTHCHECK"]
    assert len(health) == 1 and "/live" in health[0]
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert ":latest" not in text and not re.search(r"(?i)(password|secret|token|api_key)\s*=", text)
    cmd = json.loads([args for kind, args in steps if kind == "CMD"][-1])
    assert cmd[:3] == ["python", "-m", "mvtk.serve"] and "--host" in cmd and "--bootstrap" in cmd
    port = cmd[cmd.index("--port") + 1]
    assert f"EXPOSE {port}" in text and f"127.0.0.1:{port}/live" in health[0]
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "MVTK_REGISTRY" in env


def test_input_shape_is_one_samples_shape_and_round_trips_through_the_command_line():
    original = ServeConfig(registry="r", port=0, input_shape="3,32,32")
    assert original.sample_shape == (3, 32, 32) and ServeConfig(port=0).sample_shape is None
    assert parse_args(to_args(original)) == original
    assert parse_args(["--input-shape", "12"]).sample_shape == (12,)
    for bad in ("3,,32", "0,4", "a", "-1"):
        with pytest.raises(InvalidArgumentError, match="input_shape must be one sample's shape"):
            ServeConfig(port=0, input_shape=bad)


def test_a_model_that_is_not_a_course_model_is_ready_with_input_shape_and_fails_fast_without(tmp_path):
    registry = Registry(tmp_path / "registry")
    torch.manual_seed(0)
    registry.register("linear", torch.nn.Linear(12, 3), init_args={"in_features": 12, "out_features": 3})
    registry.set_alias("linear", ALIAS, 1)
    settings = {"registry": str(tmp_path / "registry"), "model": "linear", "port": 0, "poll_s": 0.05,
                "cache_dir": str(tmp_path / "cache"), "drift_reference": ""}
    began = time.monotonic()
    with pytest.raises(ServiceError, match="cannot load its model.*cannot tell the input of Linear"):
        start_service(ServeConfig(**settings), log_path=tmp_path / "no-shape.log", timeout=120)
    assert time.monotonic() - began < 60  # the load error is permanent: no waiting out the 120 s
    with start_service(ServeConfig(**settings, input_shape="12"), log_path=tmp_path / "shape.log",
                       timeout=120) as service:
        STARTED.append(service.pid)
        answer = httpx.post(f"{service.url}/predict", json={"inputs": np.zeros((2, 12)).tolist()}, timeout=30)
    assert answer.status_code == 200 and answer.json()["version"] == 1


# -- a model that is not a course model: refused versions, overflowing outputs, stalled clients -------------


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """A service for 'linear': v1 a 12-feature classifier with all weights 1 (big inputs overflow), v2 a regression."""
    root = tmp_path_factory.mktemp("tabular")
    registry = Registry(root / "registry")
    classifier = torch.nn.Linear(12, 3)
    torch.nn.init.ones_(classifier.weight)
    registry.register("linear", classifier, init_args={"in_features": 12, "out_features": 3})
    registry.register("linear", torch.nn.Linear(12, 1), init_args={"in_features": 12, "out_features": 1})
    registry.set_alias("linear", ALIAS, 1)
    service = start_service(ServeConfig(registry=str(root / "registry"), model="linear", port=0, poll_s=0.05,
                                        cache_dir=str(root / "cache"), drift_reference="", input_shape="12",
                                        body_timeout_s=1.0), log_path=root / "tabular.log", timeout=120)
    STARTED.append(service.pid)
    yield {"registry": registry, "service": service}
    service.stop()


def test_a_version_the_service_cannot_answer_with_fails_verification_and_the_old_one_keeps_answering(tabular):
    registry, url = tabular["registry"], tabular["service"].url
    registry.set_alias("linear", ALIAS, 2)  # outputs (N, 1): not a classifier
    with httpx.Client(base_url=url, timeout=10.0) as client:
        ready = wait_until(lambda: (r := client.get("/ready")).json()["alias_version"] == 2
                           and r.json()["problem"] and r, what="the refusal")
        assert ready.status_code == 200 and ready.json()["serving_version"] == 1 and not ready.json()["in_sync"]
        assert "linear v2 failed verification" in ready.json()["problem"] and "(16, 1)" in ready.json()["problem"]
        answer = client.post("/predict", json={"inputs": np.zeros((2, 12)).tolist()})
        assert answer.status_code == 200 and answer.json()["version"] == 1
        values = parse_metrics(client.get("/metrics").text)
        assert values["mvtk_serve_verification_failures"] == 1 and values["mvtk_serve_in_sync"] == 0
        registry.set_alias("linear", ALIAS, 1)
        wait_until(lambda: client.get("/ready").json()["in_sync"], what="in sync again")


def test_finite_input_whose_output_overflows_gets_422_never_nan_json(tabular):
    with httpx.Client(base_url=tabular["service"].url, timeout=10.0) as client:
        answer = client.post("/predict", json={"inputs": [[0.5] * 12, [3e38] * 12]})
        assert answer.status_code == 422 and "not finite (NaN/inf)" in answer.json()["error"]
        assert "NaN" not in answer.text.replace("NaN/inf", "")
        assert client.post("/predict", json={"inputs": [[0.5] * 12]}).status_code == 200


def test_drift_gauges_say_no_score_when_drift_is_not_computed(tabular):
    with httpx.Client(base_url=tabular["service"].url, timeout=10.0) as client:
        assert client.post("/predict", json={"inputs": np.zeros((150, 12)).tolist()}).status_code == 200
        values = parse_metrics(client.get("/metrics").text)
    assert values["mvtk_serve_drift_enabled"] == 0
    assert np.isnan(values["mvtk_serve_drift_psi"]) and np.isnan(values["mvtk_serve_drift_alarm"])


def test_stale_staging_folders_of_killed_exports_are_removed_and_fresh_ones_kept(tmp_path):
    old, fresh = tmp_path / ".staging-old", tmp_path / ".staging-new"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_stale_staging(tmp_path) == [old] and not old.exists() and fresh.exists()
    assert remove_stale_staging(tmp_path / "missing") == []


def stalled(url: str, declared: int = 1000) -> socket.socket:
    """A raw connection that sends the headers and the start of a body, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n{{\"inputs\": [".encode())
    return sock


def test_a_stalled_upload_gets_408_after_the_body_timeout(tabular):
    began = time.monotonic()
    answer = ""
    with stalled(tabular["service"].url) as sock:
        while "stalled" not in answer and (chunk := sock.recv(4096)):  # headers and body may come apart
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 408") and "stalled" in answer and time.monotonic() - began < 8


def test_sigterm_is_not_held_up_by_a_stalled_client(tabular):
    service = tabular["service"]
    with stalled(service.url):
        time.sleep(0.2)
        began = time.monotonic()
        os.kill(service.pid, signal.SIGTERM)
        assert service.popen.wait(20) in (0, -signal.SIGTERM) and time.monotonic() - began < 10


def test_no_service_process_is_left_behind(service, tabular):
    service.stop()
    tabular["service"].stop()
    for pid in STARTED:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # each service ran in its own session: its group id is its pid
