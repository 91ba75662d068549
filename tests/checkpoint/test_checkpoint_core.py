"""Lesson 03's claims about mvtk.checkpoint's core: exact resume, safe loading, integrity, atomic writes."""
import base64
import builtins
import errno
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
from torch import nn

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import load_checkpoint, read_checkpoint, remove_stale_temps, save_checkpoint
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import ArchitectureMismatchError, CheckpointError, IntegrityError, InvalidArgumentError
from mvtk.models import MLP, MLPv2
from mvtk.train import History, fit

KILLS = 24  # SIGKILLs of a saving child process
THREADS = 1  # tiny models train fastest on one thread, and a shared CPU stays responsive


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def train_run(epochs_before_crash, total, *, restore_rng=True, folder=None):
    """Loss curve of MLPv2 (dropout) + StepLR: straight, or crash after `epochs_before_crash` and resume."""
    seed_everything(0, threads=THREADS)
    loaders = make_loaders(batch_size=64)
    net = MLPv2(hidden=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    history = fit(net, loaders.train, loaders.val, epochs=epochs_before_crash, optimizer=opt, scheduler=sched,
                  progress=False)
    if epochs_before_crash == total:
        return history
    path = save_checkpoint(Path(folder) / "crash.pt", net, opt, sched, epoch=history.epochs, history=history,
                           loader_generator=loaders.train.generator)
    seed_everything(123, threads=THREADS)  # a new process: everything fresh and differently seeded
    loaders = make_loaders(batch_size=64)
    net = MLPv2(hidden=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    meta = load_checkpoint(path, net, opt, sched, loader_generator=loaders.train.generator, restore_rng=restore_rng)
    return fit(net, loaders.train, loaders.val, epochs=total - meta["epoch"], optimizer=opt, scheduler=sched,
               history=History.from_dict(meta["history"]), progress=False)


# --- a full checkpoint, saved and loaded ---------------------------------------------------

def test_checkpoint_opens_with_plain_torch_load_weights_only(saved):
    payload = torch.load(saved, weights_only=True)
    assert payload["epoch"] == 3 and type(payload["torch_version"]) is str
    assert set(payload["rng"]) == {"torch", "cuda", "python", "numpy", "loader"}


def test_load_restores_model_optimizer_and_scheduler(tmp_path, mlp, loaders):
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fit(mlp, loaders.train, loaders.val, epochs=2, optimizer=opt, scheduler=sched, progress=False)
    path = save_checkpoint(tmp_path / "c.pt", mlp, opt, sched, epoch=2)
    other = MLP(hidden=16)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.01)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, step_size=1, gamma=0.5)
    load_checkpoint(path, other, other_opt, other_sched)
    torch.testing.assert_close(other.state_dict(), mlp.state_dict(), rtol=0, atol=0)
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0025
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert other_sched.state_dict() == sched.state_dict()


def test_load_returns_the_metadata(tmp_path, mlp):
    history = History(train_loss=[1.0, 0.5], val_loss=[1.1, 0.6], val_acc=[0.5, 0.8], lr=[0.1, 0.1])
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=2, step=40, history=history,
                           metrics={"val_loss": 0.6}, extra={"note": "first run", "seed": 0})
    meta = load_checkpoint(path, mlp)
    assert (meta["epoch"], meta["step"], meta["metrics"], meta["extra"]) == (
        2, 40, {"val_loss": 0.6}, {"note": "first run", "seed": 0})
    assert History.from_dict(meta["history"]) == history
    assert meta["torch_version"] == str(torch.__version__) and meta["model_class"] == "MLP"
    assert "model" not in meta and "rng" not in meta


def test_history_may_be_a_plain_dict(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1, history={"train_loss": [0.3]})
    assert load_checkpoint(path)["history"] == {"train_loss": [0.3]}


def test_rng_states_are_restored(tmp_path, mlp, loaders):
    gen = loaders.train.generator
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=0, loader_generator=gen)
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    torch.manual_seed(99), random.seed(99), np.random.seed(99), gen.manual_seed(99)
    load_checkpoint(path, loader_generator=gen)
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3] and torch.equal(got[3], expected[3])


def test_restore_rng_false_leaves_rng_alone(saved):
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    load_checkpoint(saved, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = train_run(4, 4)
    resumed = train_run(2, 4, folder=tmp_path)
    assert resumed.train_loss == straight.train_loss and resumed.val_loss == straight.val_loss
    assert resumed.lr == straight.lr


def test_resume_without_rng_state_differs(tmp_path):
    straight = train_run(4, 4)
    resumed = train_run(2, 4, restore_rng=False, folder=tmp_path)
    assert resumed.train_loss[:2] == straight.train_loss[:2]
    assert resumed.train_loss[2:] != straight.train_loss[2:]


def test_a_generator_asked_for_but_not_saved_is_an_error(saved, loaders):
    with pytest.raises(CheckpointError, match="no DataLoader generator state"):
        load_checkpoint(saved, loader_generator=loaders.train.generator)


def test_an_optimizer_asked_for_but_not_saved_is_an_error(saved, mlp):
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(saved, mlp, torch.optim.SGD(mlp.parameters(), lr=0.1))


def test_an_optimizer_that_does_not_fit_is_an_error(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "c.pt", mlp, torch.optim.Adam(mlp.parameters()), epoch=1)
    wrong = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="optimizer state .* does not fit"):
        load_checkpoint(path, optimizer=wrong)


def test_a_refused_load_changes_nothing(tmp_path, mlp, loaders):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "c.pt", mlp, opt, torch.optim.lr_scheduler.StepLR(opt, 1), epoch=1)
    other = MLP(hidden=16)  # other weights than `mlp`
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="no DataLoader generator state"):
        load_checkpoint(path, other, other_opt, loader_generator=loaders.train.generator)
    with pytest.raises(CheckpointError, match="scheduler state .* does not fit"):
        load_checkpoint(path, other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda e: 1.0))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert other_opt.param_groups[0]["lr"] == 0.5


def test_an_optimizer_that_does_not_fit_leaves_the_scheduler_as_it_was(tmp_path, mlp):
    opt = torch.optim.Adam(mlp.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "c.pt", mlp, opt, sched, epoch=1)
    wrong = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    fresh = torch.optim.lr_scheduler.StepLR(wrong, 1, gamma=0.5)
    with pytest.raises(CheckpointError, match="optimizer state .* does not fit"):
        load_checkpoint(path, optimizer=wrong, scheduler=fresh)
    assert fresh.last_epoch == 0 and fresh.get_last_lr() == [1e-3]


def test_a_newer_format_version_is_refused_naming_both_versions(tmp_path, mlp):
    payload = ckpt.checkpoint_payload(mlp, epoch=1)
    payload["format_version"] = ckpt.FORMAT_VERSION + 1
    (tmp_path / "future.pt").write_bytes(ckpt.seal(torch_bytes(payload)))
    with pytest.raises(CheckpointError, match=rf"future.pt' has format version {ckpt.FORMAT_VERSION + 1}, newer "
                                              rf"than version {ckpt.FORMAT_VERSION} that this mvtk reads"):
        load_checkpoint(tmp_path / "future.pt", mlp)
    payload["format_version"] = "1"
    (tmp_path / "odd.pt").write_bytes(ckpt.seal(torch_bytes(payload)))
    with pytest.raises(CheckpointError, match=r"format_version of checkpoint '.*odd.pt' must be an int >= 1, got '1'"):
        load_checkpoint(tmp_path / "odd.pt", mlp)


# --- format version 2 seals with BLAKE3; version-1 files (SHA-256) still load and verify ------

def version_1_file(path: Path, payload: dict, private=None) -> Path:
    """A checkpoint as mvtk wrote it before format version 2, built by hand with hashlib and cryptography.

    The zip comment is `mvtk-sha256:` + the SHA-256 of the archive up to the comment's length field;
    a signature's record holds the SHA-256 of the whole file, signed as `mvtk-file-sha256:<hex>`.
    """
    payload = dict(payload, format_version=1)
    body = torch_bytes(payload)[:-2]  # the archive without its (empty) comment's length field
    comment = b"mvtk-sha256:" + hashlib.sha256(body).hexdigest().encode()
    path.write_bytes(body + len(comment).to_bytes(2, "little") + comment)
    if private is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        record = {"sha256": digest, "key_id": ckpt.key_id(private),
                  "signature": base64.b64encode(private.sign(b"mvtk-file-sha256:" + digest.encode())).decode()}
        ckpt.signature_path(path).write_text(json.dumps({"algorithm": "ed25519", "records": [record]}))
    return path


def test_a_new_checkpoint_is_sealed_with_blake3_over_the_archive(saved):
    data = saved.read_bytes()
    comment = zipfile.ZipFile(saved).comment
    assert comment == b"mvtk-blake3:" + blake3.blake3(data[:-len(comment) - 2]).hexdigest().encode()
    assert read_checkpoint(saved)["format_version"] == ckpt.FORMAT_VERSION == 2


def test_a_new_signature_signs_the_whole_files_blake3(tmp_path, mlp, keys):
    private, public, _, _ = keys
    path = save_checkpoint(tmp_path / "signed.pt", mlp, epoch=1, signing_key=private)
    (record,) = ckpt.read_signature(path)
    assert record["blake3"] == blake3.blake3(path.read_bytes()).hexdigest() and "sha256" not in record
    public.verify(base64.b64decode(record["signature"]), b"mvtk-file-blake3:" + record["blake3"].encode())


def test_a_version_1_file_still_loads_verified(tmp_path, mlp, keys):
    private, public, _, _ = keys
    path = version_1_file(tmp_path / "v1.pt", ckpt.checkpoint_payload(mlp, epoch=3), private)
    fresh = MLP(hidden=16)
    meta = load_checkpoint(path, fresh, verify_key=public)
    assert meta["format_version"] == 1 and meta["epoch"] == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), mlp.state_dict().values()))
    assert ckpt.verify_file(path, public) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_version_1_file_fails_its_sha256_check(tmp_path, mlp):
    path = version_1_file(tmp_path / "v1.pt", ckpt.checkpoint_payload(mlp, epoch=3))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"v1.pt' failed its SHA-256 check"):
        load_checkpoint(path, mlp)


def test_seal_writes_the_version_1_seal_on_request(tmp_path, mlp):
    payload = dict(ckpt.checkpoint_payload(mlp, epoch=3), format_version=1)
    by_hand = version_1_file(tmp_path / "v1.pt", payload).read_bytes()
    assert ckpt.seal(torch_bytes(payload), "sha256") == by_hand


def test_resaving_over_a_signed_version_1_file_keeps_it_verifiable(tmp_path, mlp, keys):
    private, public, _, _ = keys
    path = version_1_file(tmp_path / "c.pt", ckpt.checkpoint_payload(mlp, epoch=3), private)
    save_checkpoint(path, mlp, epoch=4, signing_key=private)
    assert [set(r) for r in ckpt.read_signature(path)] == [{"blake3", "key_id", "signature"}]
    assert load_checkpoint(path, verify_key=public)["format_version"] == 2


def test_loading_hashes_through_a_memory_map_without_copying_the_file(tmp_path):
    big = nn.Linear(1024, 1024)  # 4 MB of weights
    path = save_checkpoint(tmp_path / "big.pt", big, epoch=1)
    tracemalloc.start()
    try:
        read_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size // 4, f"reading allocated {peak} bytes for a {path.stat().st_size}-byte file"


def load_in_a_child(path, results):
    results.put(read_checkpoint(path)["epoch"])


def test_a_forked_child_loads_after_its_parent_hashed_on_every_core(tmp_path):
    path = save_checkpoint(tmp_path / "big.pt", nn.Linear(1024, 1024), epoch=5)  # > 1 MiB: hashed on every core
    read_checkpoint(path)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=load_in_a_child, args=(path, results))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("a forked child hung hashing a checkpoint (the parent's hashing threads are not in the child)")
    assert child.exitcode == 0 and results.get(timeout=5) == 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(metrics={"val_loss": np.float64(0.5)}), r"checkpoint\['metrics'\]\['val_loss'\] is a numpy.float64"),
    (dict(extra={"config": History()}), r"checkpoint\['extra'\]\['config'\] is a mvtk.train.History"),
    (dict(extra={"when": time}), "is a builtins.module"),
])
def test_values_weights_only_loading_would_refuse_are_rejected_at_save(tmp_path, mlp, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        save_checkpoint(tmp_path / "c.pt", mlp, epoch=1, **kwargs)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(epoch=-1), "epoch must be an int >= 0, got -1"),
    (dict(epoch=1.5), "epoch must be an int >= 0, got 1.5"),
    (dict(epoch=1, step=-2), "step must be an int >= 0, got -2"),
    (dict(epoch=1, history=[1, 2]), "history must be"),
    (dict(epoch=1, metrics=[0.5]), "metrics must be a dict"),
    (dict(epoch=1, loader_generator=3), "loader_generator must be a torch.Generator"),
])
def test_bad_arguments_to_save_are_named(tmp_path, mlp, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        save_checkpoint(tmp_path / "c.pt", mlp, **kwargs)


def test_save_needs_a_module(tmp_path):
    with pytest.raises(InvalidArgumentError, match="model must be a torch.nn.Module"):
        save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1)}, epoch=0)


# --- every bad file kind gets a clear error naming the file ---------------------------------

def corrupt(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    bad = path.with_name(f"{kind}.pt")
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "cut_at_the_end":
        bad.write_bytes(data[:-10])
    elif kind == "bit_flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(flipped))
    elif kind == "flipped_in_a_header":
        flipped = bytearray(data)
        flipped[40] ^= 0x80
        bad.write_bytes(bytes(flipped))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("hello, I am not a checkpoint\n")
    return bad


@pytest.mark.parametrize("kind, error, match", [
    ("truncated", CheckpointError, "is truncated"),
    ("cut_at_the_end", CheckpointError, "is truncated"),
    ("bit_flipped", IntegrityError, "failed its BLAKE3 check"),
    ("flipped_in_a_header", IntegrityError, "failed its BLAKE3 check"),
    ("empty", CheckpointError, r"is empty \(0 bytes\)"),
    ("text", CheckpointError, "is not a checkpoint"),
])
def test_bad_files_get_a_clear_error_naming_the_file(saved, mlp, kind, error, match):
    bad = corrupt(saved, kind)
    with pytest.raises(error, match=match) as info:
        load_checkpoint(bad, mlp)
    assert str(bad) in str(info.value)


def test_an_integrity_error_carries_both_checksums(saved):
    with pytest.raises(IntegrityError) as info:
        load_checkpoint(corrupt(saved, "bit_flipped"))
    assert len(info.value.recorded) == len(info.value.actual) == 64 and info.value.recorded != info.value.actual


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_plain_torch_save_file_is_recognised(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="written by torch.save, not save_checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", mlp)


def test_a_torch_file_that_is_no_mvtk_checkpoint_is_refused(tmp_path, mlp):
    (tmp_path / "other.pt").write_bytes(ckpt.seal(torch_bytes({"weights": mlp.state_dict()})))
    with pytest.raises(CheckpointError, match="not an mvtk checkpoint"):
        load_checkpoint(tmp_path / "other.pt", mlp)


def test_another_architecture_lists_missing_unexpected_and_reshaped_keys(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "v2.pt", MLPv2(hidden=32), epoch=1)
    with pytest.raises(ArchitectureMismatchError) as info:
        load_checkpoint(path, mlp)
    message = str(info.value)
    assert str(path) in message
    assert "unexpected (in the file, not in the model): fc3.weight, fc3.bias" in message
    assert "fc1.weight (32, 64) in the file, (16, 64) in the model" in message


def test_missing_keys_are_listed(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "small.pt", nn.Sequential(), epoch=1)
    with pytest.raises(ArchitectureMismatchError, match=r"missing \(in the model, not in the file\): fc1.weight"):
        load_checkpoint(path, mlp)


def test_a_mismatch_changes_nothing(tmp_path, mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    path = save_checkpoint(tmp_path / "wide.pt", MLP(hidden=32), epoch=1)
    with pytest.raises(ArchitectureMismatchError):
        load_checkpoint(path, mlp)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_a_ddp_prefix_gets_a_hint(tmp_path, mlp):
    wrapper = nn.Module()
    wrapper.module = MLP(hidden=32)  # another architecture: with the prefix stripped it still does not fit
    path = save_checkpoint(tmp_path / "ddp.pt", wrapper, epoch=1)
    with pytest.raises(ArchitectureMismatchError, match="hint: keys start with 'module.'"):
        load_checkpoint(path, mlp)


# --- loading never unpickles arbitrary objects ------------------------------------------------

def test_a_malicious_pickle_is_refused_without_running(planted):
    evil, marker = planted
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


def test_a_malicious_pickle_with_a_valid_checksum_is_refused_without_running(tmp_path, mlp, planted):
    evil, marker = planted
    (tmp_path / "sealed_evil.pt").write_bytes(ckpt.seal(evil.read_bytes()))
    with pytest.raises(CheckpointError, match="safe loading .weights_only=True. refuses"):
        load_checkpoint(tmp_path / "sealed_evil.pt", mlp)
    assert not marker.exists()


def test_the_planted_payload_really_runs_without_weights_only(planted):
    evil, marker = planted
    torch.load(evil, weights_only=False)
    assert marker.exists()  # the danger the two tests above guard against is real


# --- atomic writes: SIGKILL, full disk, read-only folder, stale temps -----------------------

def save_forever(path, start_epoch, model, ready):
    for epoch in itertools.count(start_epoch):
        save_checkpoint(path, model, epoch=epoch)
        ready.set()


def test_sigkill_while_saving_never_breaks_the_previous_checkpoint(tmp_path):
    context = multiprocessing.get_context("fork")  # the child starts in milliseconds, torch already imported
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # ~2 MB: a save takes a while
    path = save_checkpoint(tmp_path / "ckpt.pt", model, epoch=0)
    pick, epoch, killed_mid_write = random.Random(0), 0, 0
    for _ in range(KILLS):
        ready = context.Event()
        child = context.Process(target=save_forever, args=(path, epoch + 1, model, ready))
        child.start()
        assert ready.wait(60), "the child never finished a save"
        time.sleep(pick.uniform(0.0, 0.03))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_mid_write += bool(list(tmp_path.glob(".ckpt.pt.*.tmp")))
        meta = load_checkpoint(path, model)  # verifies the SHA-256
        assert meta["epoch"] > epoch
        epoch = meta["epoch"]
    assert killed_mid_write > 0, "no kill landed during a write: the test did not test atomicity"
    save_checkpoint(path, model, epoch=epoch + 1)
    assert not list(tmp_path.glob(".*.tmp")), "stale temporary files were not cleaned up"


def test_save_removes_stale_temporary_files(tmp_path, mlp, temp_file):
    stale, unrelated = temp_file("c.pt"), temp_file("other.pt")  # left by saves whose process died
    save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    assert not stale.exists() and unrelated.exists()
    assert remove_stale_temps(tmp_path / "other.pt") == [unrelated]


def test_stale_temps_are_matched_by_exact_name(tmp_path, temp_file):
    mine = temp_file("c.pt")
    longer_name = temp_file("c.pt.enc")  # a write of c.pt.enc, not of c.pt
    assert remove_stale_temps(tmp_path / "c.pt") == [mine]
    assert longer_name.exists()


def test_a_temporary_file_of_a_live_process_is_kept(tmp_path, mlp, temp_file):
    in_progress = temp_file("c.pt", pid=os.getpid())  # as if a save of c.pt were under way here
    assert remove_stale_temps(tmp_path / "c.pt") == []
    save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    assert in_progress.exists()


class FullDisk:
    """A file opened for writing on a disk that fills up after `room` bytes."""

    def __init__(self, path, mode, room=1000):
        self.handle, self.room = builtins.open(path, mode), room

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(bytes(data[:self.room]))  # what fitted stays in the temporary file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(saved, mlp, monkeypatch):
    monkeypatch.setattr("mvtk.checkpoint.core.open", FullDisk, raising=False)  # save_checkpoint's open() only
    with pytest.raises(CheckpointError, match=r"the disk is full \(ENOSPC\); the previous file .* is unchanged"):
        save_checkpoint(saved, mlp, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, mlp)["epoch"] == 3
    assert not list(saved.parent.glob(".*.tmp")), "the partial temporary file was left behind"


def test_a_disk_that_fills_up_at_fsync_keeps_the_previous_checkpoint(saved, mlp, monkeypatch):
    def full_at_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_at_fsync)
    with pytest.raises(CheckpointError, match="the disk is full"):
        save_checkpoint(saved, mlp, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, mlp)["epoch"] == 3
    assert not list(saved.parent.glob(".*.tmp"))


def test_a_read_only_folder_is_a_clear_error_and_keeps_the_previous_checkpoint(saved, mlp, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match=r"the folder is not writable \(EACCES\)"):
        save_checkpoint(saved, mlp, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, mlp)["epoch"] == 3


def test_read_checkpoint_gives_the_whole_verified_payload(saved, mlp):
    payload = read_checkpoint(saved)
    assert torch.equal(payload["model"]["fc1.weight"], mlp.fc1.weight.detach())
