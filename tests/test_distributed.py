"""Lesson 11's claims, run for real on 127.0.0.1: two nodes, a killed worker, DCP resharding, FSDP2.

Every launch is bounded in time, and the `no_process_left` fixture fails a test that leaves any
agent or worker of its launches running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mvtk import distributed
from mvtk.errors import CheckpointError, InvalidArgumentError, ParallelError

LAUNCH_TIMEOUT = 180  # seconds; a healthy launch takes a few seconds, a loaded 2-core machine 20-30


@pytest.fixture
def no_process_left(monkeypatch):
    """Record the tag of every launch the test makes; afterwards none of their processes may be alive."""
    tags = []
    original = distributed.launch.launch_nodes

    def recording(*args, **kwargs):
        run = original(*args, **kwargs)
        tags.append(run.tag)
        return run

    monkeypatch.setattr(distributed, "launch_nodes", recording)
    yield tags
    left = {tag: distributed.processes_tagged(tag) for tag in tags}
    for tag in tags:
        distributed.stop_tagged(tag)
    assert not any(left.values()), f"processes left running after the test: {left}"


def weights_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    """§2's run: two elastic nodes, node 1's worker dies during step 5, the group restarts and resumes."""
    out = tmp_path_factory.mktemp("elastic")
    run = distributed.launch_nodes(["train", "--out", out, "--steps", 8, "--save-every", 2], nodes=2, nnodes="1:2",
                                   max_restarts=1, node_args={1: ["--fail-at-step", 5]}, timeout=LAUNCH_TIMEOUT)
    return out, run


def test_two_nodes_train_the_same_weights_as_one_process(tmp_path, no_process_left):
    run = distributed.launch_nodes(["train", "--out", tmp_path, "--steps", 6], nodes=2, timeout=LAUNCH_TIMEOUT)
    reference = distributed.train_steps(steps=6)
    two = torch.load(tmp_path / distributed.FINAL_NAME, weights_only=True)
    assert run.returncodes == [0, 0] and len(no_process_left) == 1
    assert {r["world"] for r in distributed.read_log(tmp_path)} == {2}
    assert weights_gap(two, reference.state_dict()) < 1e-6


def test_killed_worker_restarts_resumes_and_ends_equal_to_an_uninterrupted_run(elastic_run, tmp_path):
    out, run = elastic_run
    assert run.lines("--fail-at-step 5"), "the test hook did not kill a worker"
    assert not distributed.processes_tagged(run.tag)
    log = distributed.read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {r["started_at"] for r in log} == {0, 4}  # the new group resumed from the step-4 checkpoint
    uninterrupted = distributed.train_steps(steps=8, out=tmp_path)
    assert [(r["lr"], r["ids"]) for r in log] == [(r["lr"], r["ids"]) for r in distributed.read_log(tmp_path)]
    assert weights_gap(torch.load(out / distributed.FINAL_NAME, weights_only=True), uninterrupted.state_dict()) < 1e-6


def test_a_two_rank_checkpoint_has_a_file_per_rank_and_loads_into_one_process(elastic_run):
    out, _ = elastic_run
    newest = distributed.latest_folder(out / "ckpt")
    assert newest.name == "step-000008"
    assert list(distributed.checkpoint_files(newest)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = {"model": distributed.tiny_model().state_dict(), "step": torch.tensor(0)}
    distributed.load_sharded(state, out / "ckpt")
    assert int(state["step"]) == 8
    assert distributed.state_equal(state["model"], torch.load(out / distributed.FINAL_NAME, weights_only=True))


def test_dcp_reshards_two_ranks_into_three_and_async_save_keeps_the_values_at_the_call(elastic_run, tmp_path,
                                                                                      no_process_left):
    checkpoint, _ = elastic_run
    distributed.launch_nodes(["dcp", "--out", tmp_path, "--checkpoint", checkpoint / "ckpt", "--size-mb", 1,
                              "--repeats", 1], nodes=1, nproc_per_node=3, timeout=LAUNCH_TIMEOUT)
    ranks = distributed.worker_results(tmp_path, "dcp")
    assert [r["rows"]["0.weight"] for r in ranks] == [11, 11, 10]
    assert all(r["resharded_equal"] and r["async_saved_values_at_call"] for r in ranks)
    assert list(distributed.checkpoint_files(distributed.latest_folder(tmp_path))) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    one = distributed.zeros_like_state(distributed.example_state(1))  # 3 ranks saved it; 1 process reads it
    distributed.load_sharded(one, tmp_path)
    assert distributed.state_equal(one["optim"], distributed.example_state(1)["optim"])


def test_fsdp2_trains_like_one_process_and_its_checkpoint_loads_unsharded(tmp_path, no_process_left):
    distributed.launch_nodes(["fsdp", "--out", tmp_path, "--steps", 4], nodes=1, nproc_per_node=2,
                             timeout=LAUNCH_TIMEOUT)
    ranks = distributed.worker_results(tmp_path, "fsdp")
    assert [2 * r["local_params"] for r in ranks] == [r["full_params"] for r in ranks]
    gathered = torch.load(tmp_path / "fsdp_full.pt", weights_only=True)
    assert distributed.state_equal(gathered, distributed.train_steps(steps=4).state_dict(), atol=1e-6)
    plain = {"model": distributed.tiny_model().state_dict()}
    distributed.load_sharded(plain, tmp_path / "fsdp_ckpt")
    assert distributed.state_equal(plain["model"], gathered)


def test_async_save_in_one_process_returns_before_the_write_and_keeps_the_values(tmp_path):
    state = distributed.example_state(1)
    before = state["model"]["weight"].clone()
    pending = distributed.save_sharded(state, tmp_path, 1, asynchronous=True)
    state["model"]["weight"].add_(1.0)
    assert pending.wait().name == "step-000001"
    loaded = distributed.zeros_like_state(state)
    distributed.load_sharded(loaded, tmp_path)
    assert torch.equal(loaded["model"]["weight"], before)


def copied(state: dict) -> dict:
    return {group: {name: t.clone() for name, t in tensors.items()} for group, tensors in state.items()}


def test_async_saves_back_to_back_each_hold_the_values_at_their_call(tmp_path):
    state = distributed.example_state(1)
    first = distributed.save_sharded(state, tmp_path, 1, asynchronous=True)
    at_first = copied(state)
    state["model"]["weight"].add_(1.0)  # training goes on while step 1 is written
    second = distributed.save_sharded(state, tmp_path, 2, asynchronous=True)  # reuses step 1's staging buffers
    at_second = copied(state)
    state["model"]["weight"].add_(1.0)
    assert second.wait().name == "step-000002" and first.finished
    for step, expected in ((1, at_first), (2, at_second)):
        loaded = distributed.zeros_like_state(state)
        distributed.load_sharded(loaded, distributed.step_folder(tmp_path, step))
        assert distributed.state_equal(loaded, expected)
    assert distributed.latest_folder(tmp_path).name == "step-000002"


def test_latest_moves_when_an_async_save_completes_without_wait(tmp_path):
    pending = distributed.save_sharded(distributed.example_state(0.5), tmp_path, 1, asynchronous=True)
    deadline = time.monotonic() + 60
    while not pending.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert distributed.latest_folder(tmp_path).name == "step-000001"


def test_a_failed_async_write_is_raised_by_wait_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    state = distributed.example_state(0.5)
    distributed.save_sharded(state, tmp_path, 1)

    def full_disk(self, metadata, results):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "finish", full_disk)
    pending = distributed.save_sharded(state, tmp_path, 2, asynchronous=True)
    with pytest.raises(CheckpointError, match=r"step-000002' failed on rank\(s\) \[0\]: OSError: .*No space left"):
        pending.wait()
    assert distributed.latest_folder(tmp_path).name == "step-000001"
    with pytest.raises(CheckpointError, match="step-000003' failed"):  # a synchronous save says the same
        distributed.save_sharded(state, tmp_path, 3)


ASYNC_KILLED = """
import sys
from mvtk.distributed import sharded
state = sharded.example_state(0.5)
sharded.save_sharded(state, sys.argv[1], 1)
state["model"]["weight"].add_(1.0)
sharded.save_sharded(state, sys.argv[1], 2, asynchronous=True, pause_before_commit=600)
print("returned", flush=True)
sharded.save_sharded(state, sys.argv[1], 3)  # waits for step 2, which never ends: it is killed first
"""


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    stderr = open(tmp_path / "stderr.txt", "w")  # apart: a warning from the writer thread could split a line
    process = subprocess.Popen([sys.executable, "-c", ASYNC_KILLED, str(tmp_path / "ckpt")], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and distributed.PAUSED_MARK not in lines:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # mid-save: step 2's shards written, its .metadata not
        process.wait()
        process.stdout.close()
        stderr.close()
    assert "returned" in lines and distributed.PAUSED_MARK in lines, (lines, (tmp_path / "stderr.txt").read_text())
    assert distributed.latest_folder(tmp_path / "ckpt").name == "step-000001"
    assert distributed.METADATA not in distributed.checkpoint_files(tmp_path / "ckpt" / "step-000002")
    survivor = distributed.zeros_like_state(distributed.example_state(0.5))
    distributed.load_sharded(survivor, tmp_path / "ckpt")
    assert distributed.state_equal(survivor, distributed.example_state(0.5))


def test_dcp_converts_to_one_torch_save_file_and_back(tmp_path):
    state = distributed.example_state(0.5)
    distributed.save_sharded(state, tmp_path / "ckpt", 3)
    whole = torch.load(distributed.to_torch_save(tmp_path / "ckpt", tmp_path / "one.pt"), weights_only=True)
    assert distributed.state_equal(whole, state)
    back = distributed.zeros_like_state(state)
    distributed.load_sharded(back, distributed.from_torch_save(tmp_path / "one.pt", tmp_path / "back"))
    assert distributed.state_equal(back, state)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    output = distributed.kill_during_save(tmp_path, size_mb=0.5, timeout=120)
    assert output[-1] == distributed.PAUSED_MARK
    assert distributed.latest_folder(tmp_path).name == "step-000001"
    assert distributed.METADATA not in distributed.checkpoint_files(tmp_path / "step-000002")
    survivor = distributed.zeros_like_state(distributed.example_state(0.5))
    distributed.load_sharded(survivor, tmp_path)
    assert distributed.state_equal(survivor, distributed.example_state(0.5))
    with pytest.raises(CheckpointError, match="no complete DCP checkpoint"):
        distributed.load_sharded(survivor, tmp_path / "step-000002")


def test_save_never_overwrites_the_checkpoint_latest_names(tmp_path):
    distributed.save_sharded(distributed.example_state(0.1), tmp_path, 2)
    with pytest.raises(CheckpointError, match="latest"):
        distributed.save_sharded(distributed.example_state(0.1), tmp_path, 2)


def test_a_broken_latest_pointer_is_a_clear_error(tmp_path):
    (tmp_path / distributed.LATEST).write_text("step-000009\n")
    with pytest.raises(CheckpointError, match="step-000009"):
        distributed.latest_folder(tmp_path)


def test_a_launch_that_outlives_its_timeout_is_stopped_with_every_worker(tmp_path):
    tag = f"mvtk-test-{os.getpid()}"
    with pytest.raises(ParallelError, match="still running"):
        distributed.launch_nodes(["pause-save", "--out", tmp_path, "--size-mb", 0.1, "--pause", 600], nodes=1,
                                 nproc_per_node=1, timeout=1, tag=tag)
    assert not distributed.processes_tagged(tag)


def test_uneven_shards_are_refused():
    with pytest.raises(ParallelError, match="equal batches"):
        distributed.train_steps(steps=1, global_batch=48, samples=128)


def test_worker_results_name_the_missing_task(tmp_path):
    with pytest.raises(InvalidArgumentError, match="fsdp"):
        distributed.worker_results(tmp_path, "fsdp")


def test_the_checkpoint_plan_follows_youngs_rule():
    plan = distributed.checkpoint_plan(70e9, 1024, rank_bandwidth=1e9, storage_bandwidth=100e9, blocking_ratio=0.1,
                                       gpu_mtbf_hours=50_000)
    assert plan["size_bytes"] == 70e9 * 14 and plan["storage_bound"] == 1.0
    assert plan["interval_s"] == pytest.approx((2 * plan["blocked_s"] * plan["job_mtbf_s"]) ** 0.5)
    assert json.dumps(distributed.advice(plan))
