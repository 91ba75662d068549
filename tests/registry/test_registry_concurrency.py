"""Lesson 04, §2: several processes register at once, and a process killed mid-registration corrupts nothing."""
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from torch import nn

import mvtk.registry.blobs
from mvtk.files import atomic_write
from mvtk.registry import Registry

# Children are forked where the platform allows it, so they start without importing torch again.
CONTEXT = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def linear(seed):
    """A small nn.Linear whose weights are drawn from `seed`: quick to register, and its seed says what to expect."""
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def register_25(root, worker, go):
    go.wait(timeout=120)  # start all four together
    registry = Registry(root)
    for i in range(25):
        seed = worker * 1000 + i
        registry.register("shared", linear(seed), tags={"seed": seed})


@pytest.mark.slow
def test_four_processes_registering_at_once_make_versions_1_to_100_all_loadable(tmp_path):
    root, go = tmp_path / "registry", CONTEXT.Event()
    workers = [CONTEXT.Process(target=register_25, args=(root, w, go)) for w in range(4)]
    for worker in workers:
        worker.start()
    go.set()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    reg = Registry(root)
    versions = reg.versions("shared")
    assert [v.version for v in versions] == list(range(1, 101))
    assert sorted(v.tags["seed"] for v in versions) == sorted(w * 1000 + i for w in range(4) for i in range(25))
    for mv in versions:
        expected = linear(mv.tags["seed"]).state_dict()
        assert all(torch.equal(reg.load("shared", mv.version)[k], expected[k]) for k in expected)
    assert reg.check().ok


# The two children below replace the blob store's writer, `write_bytes_atomic` where mvtk.registry.blobs uses it.

def die_after_the_blob_is_stored(root):
    registry = Registry(root)
    registry.register("m", linear(0))
    write = mvtk.registry.blobs.write_bytes_atomic

    def write_then_die(path, data):
        write(path, data)  # the blob is on disk; the index row is not committed yet
        os.kill(os.getpid(), signal.SIGKILL)

    mvtk.registry.blobs.write_bytes_atomic = write_then_die
    registry.register("m", linear(1))


def die_while_writing_the_blob(root):
    registry = Registry(root)
    registry.register("m", linear(0))

    def half_then_die(path, data):
        with atomic_write(path) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    mvtk.registry.blobs.write_bytes_atomic = half_then_die
    registry.register("m", linear(1))


@pytest.mark.slow
@pytest.mark.parametrize("child,leftover", [(die_after_the_blob_is_stored, "orphans"),
                                            (die_while_writing_the_blob, "temp_files")],
                         ids=["inside-the-transaction", "while-writing-the-blob"])
def test_a_process_killed_while_registering_leaves_the_registry_consistent(tmp_path, child, leftover):
    root = tmp_path / "registry"
    process = CONTEXT.Process(target=child, args=(root,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    reg = Registry(root)
    report = reg.check()
    assert [v.version for v in reg.versions("m")] == [1] and report.ok
    assert len(getattr(report, leftover)) == 1  # harmless: no version refers to it
    assert reg.register("m", linear(5)).version == 2  # the write lock died with the process
    reg.gc()
    assert not reg.check().orphans and not reg.check().temp_files


def register_forever(root):
    registry = Registry(root)
    for seed in range(100_000):
        registry.register("m", linear(seed), tags={"seed": seed})


@pytest.mark.slow
def test_a_process_killed_at_a_random_moment_leaves_every_version_loadable(tmp_path):
    root = tmp_path / "registry"
    process = CONTEXT.Process(target=register_forever, args=(root,))
    process.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (root / "blobs").exists():
        time.sleep(0.01)
    time.sleep(0.2 + random.random() * 0.3)  # somewhere in the middle of a registration
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=60)
    reg = Registry(root)
    versions = reg.versions("m")
    assert len(versions) >= 1 and [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert reg.check().ok
    for mv in versions:
        assert torch.equal(reg.load("m", mv.version)["weight"], linear(mv.tags["seed"]).weight)
