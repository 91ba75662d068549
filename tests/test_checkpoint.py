"""Lesson 03's claims about mvtk.checkpoint: exact resume, safe loading, integrity, atomic writes, encryption."""
import builtins
import errno
import io
import itertools
import multiprocessing
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import (ModelCheckpoint, latest_checkpoint, load_checkpoint, load_key, load_weights, new_key,
                             read_checkpoint, remove_stale_temps, save_checkpoint, save_weights)
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import (ArchitectureMismatchError, CheckpointError, DecryptionError, IntegrityError,
                         InvalidArgumentError)
from mvtk.models import MLP, MLPv2
from mvtk.train import History, fit

KILLS = 24  # SIGKILLs of a saving child process
THREADS = 1  # tiny models train fastest on one thread, and a shared CPU stays responsive


class Plant:
    """A pickle that runs code when loaded: creates `marker` (the attack weights_only=True refuses)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def model():
    seed_everything(0, threads=THREADS)
    return MLP(hidden=16)


@pytest.fixture
def loaders():
    return make_loaders(batch_size=64)


@pytest.fixture
def saved(tmp_path, model):
    """A good checkpoint of `model` at epoch 3."""
    return save_checkpoint(tmp_path / "good.pt", model, epoch=3)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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


def test_load_restores_model_optimizer_and_scheduler(tmp_path, model, loaders):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fit(model, loaders.train, loaders.val, epochs=2, optimizer=opt, scheduler=sched, progress=False)
    path = save_checkpoint(tmp_path / "c.pt", model, opt, sched, epoch=2)
    other = MLP(hidden=16)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.01)
    other_sched = torch.optim.lr_scheduler.StepLR(other_opt, step_size=1, gamma=0.5)
    load_checkpoint(path, other, other_opt, other_sched)
    assert same_weights(model, other)
    assert other_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0025
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert other_sched.state_dict() == sched.state_dict()


def test_load_returns_the_metadata(tmp_path, model):
    history = History(train_loss=[1.0, 0.5], val_loss=[1.1, 0.6], val_acc=[0.5, 0.8], lr=[0.1, 0.1])
    path = save_checkpoint(tmp_path / "c.pt", model, epoch=2, step=40, history=history,
                           metrics={"val_loss": 0.6}, extra={"note": "first run", "seed": 0})
    meta = load_checkpoint(path, model)
    assert (meta["epoch"], meta["step"], meta["metrics"], meta["extra"]) == (
        2, 40, {"val_loss": 0.6}, {"note": "first run", "seed": 0})
    assert History.from_dict(meta["history"]) == history
    assert meta["torch_version"] == str(torch.__version__) and meta["model_class"] == "MLP"
    assert "model" not in meta and "rng" not in meta


def test_history_may_be_a_plain_dict(tmp_path, model):
    path = save_checkpoint(tmp_path / "c.pt", model, epoch=1, history={"train_loss": [0.3]})
    assert load_checkpoint(path)["history"] == {"train_loss": [0.3]}


def test_rng_states_are_restored(tmp_path, model, loaders):
    gen = loaders.train.generator
    path = save_checkpoint(tmp_path / "c.pt", model, epoch=0, loader_generator=gen)
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


def test_an_optimizer_asked_for_but_not_saved_is_an_error(saved, model):
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(saved, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_an_optimizer_that_does_not_fit_is_an_error(tmp_path, model):
    path = save_checkpoint(tmp_path / "c.pt", model, torch.optim.Adam(model.parameters()), epoch=1)
    wrong = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="optimizer state .* does not fit"):
        load_checkpoint(path, optimizer=wrong)


def test_a_refused_load_changes_nothing(tmp_path, model, loaders):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_checkpoint(tmp_path / "c.pt", model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), epoch=1)
    other = MLP(hidden=16)  # other weights than `model`
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="no DataLoader generator state"):
        load_checkpoint(path, other, other_opt, loader_generator=loaders.train.generator)
    with pytest.raises(CheckpointError, match="scheduler state .* does not fit"):
        load_checkpoint(path, other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda e: 1.0))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert other_opt.param_groups[0]["lr"] == 0.5


def test_an_optimizer_that_does_not_fit_leaves_the_scheduler_as_it_was(tmp_path, model):
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "c.pt", model, opt, sched, epoch=1)
    wrong = torch.optim.Adam([nn.Parameter(torch.zeros(2))])
    fresh = torch.optim.lr_scheduler.StepLR(wrong, 1, gamma=0.5)
    with pytest.raises(CheckpointError, match="optimizer state .* does not fit"):
        load_checkpoint(path, optimizer=wrong, scheduler=fresh)
    assert fresh.last_epoch == 0 and fresh.get_last_lr() == [1e-3]


def test_a_newer_format_version_is_refused_naming_both_versions(tmp_path, model):
    payload = ckpt.checkpoint_payload(model, epoch=1)
    payload["format_version"] = ckpt.FORMAT_VERSION + 1
    (tmp_path / "future.pt").write_bytes(ckpt.seal(torch_bytes(payload)))
    with pytest.raises(CheckpointError, match=rf"future.pt' has format version {ckpt.FORMAT_VERSION + 1}, newer "
                                              rf"than version {ckpt.FORMAT_VERSION} that this mvtk reads"):
        load_checkpoint(tmp_path / "future.pt", model)
    payload["format_version"] = "1"
    (tmp_path / "odd.pt").write_bytes(ckpt.seal(torch_bytes(payload)))
    with pytest.raises(CheckpointError, match=r"odd.pt' has no valid format_version \(found '1'\)"):
        load_checkpoint(tmp_path / "odd.pt", model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(metrics={"val_loss": np.float64(0.5)}), r"checkpoint\['metrics'\]\['val_loss'\] is a numpy.float64"),
    (dict(extra={"config": History()}), r"checkpoint\['extra'\]\['config'\] is a mvtk.train.History"),
    (dict(extra={"when": time}), "is a builtins.module"),
])
def test_values_weights_only_loading_would_refuse_are_rejected_at_save(tmp_path, model, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        save_checkpoint(tmp_path / "c.pt", model, epoch=1, **kwargs)
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(epoch=-1), "epoch must be a non-negative int"),
    (dict(epoch=1.5), "epoch must be a non-negative int"),
    (dict(epoch=1, step=-2), "step must be a non-negative int"),
    (dict(epoch=1, history=[1, 2]), "history must be"),
    (dict(epoch=1, metrics=[0.5]), "metrics must be a dict"),
    (dict(epoch=1, loader_generator=3), "loader_generator must be a torch.Generator"),
])
def test_bad_arguments_to_save_are_named(tmp_path, model, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        save_checkpoint(tmp_path / "c.pt", model, **kwargs)


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
    ("bit_flipped", IntegrityError, "failed its SHA-256 check"),
    ("flipped_in_a_header", IntegrityError, "failed its SHA-256 check"),
    ("empty", CheckpointError, r"is empty \(0 bytes\)"),
    ("text", CheckpointError, "is not a checkpoint"),
])
def test_bad_files_get_a_clear_error_naming_the_file(saved, model, kind, error, match):
    bad = corrupt(saved, kind)
    with pytest.raises(error, match=match) as info:
        load_checkpoint(bad, model)
    assert str(bad) in str(info.value)


def test_an_integrity_error_carries_both_checksums(saved):
    with pytest.raises(IntegrityError) as info:
        load_checkpoint(corrupt(saved, "bit_flipped"))
    assert len(info.value.recorded) == len(info.value.actual) == 64 and info.value.recorded != info.value.actual


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt' does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_plain_torch_save_file_is_recognised(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="written by torch.save, not save_checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", model)


def test_a_torch_file_that_is_no_mvtk_checkpoint_is_refused(tmp_path, model):
    (tmp_path / "other.pt").write_bytes(ckpt.seal(torch_bytes({"weights": model.state_dict()})))
    with pytest.raises(CheckpointError, match="not an mvtk checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model)


def test_another_architecture_lists_missing_unexpected_and_reshaped_keys(tmp_path, model):
    path = save_checkpoint(tmp_path / "v2.pt", MLPv2(hidden=32), epoch=1)
    with pytest.raises(ArchitectureMismatchError) as info:
        load_checkpoint(path, model)
    message = str(info.value)
    assert str(path) in message
    assert "unexpected (in the file, not in the model): fc3.weight, fc3.bias" in message
    assert "fc1.weight (32, 64) in the file, (16, 64) in the model" in message


def test_missing_keys_are_listed(tmp_path, model):
    path = save_checkpoint(tmp_path / "small.pt", nn.Sequential(), epoch=1)
    with pytest.raises(ArchitectureMismatchError, match=r"missing \(in the model, not in the file\): fc1.weight"):
        load_checkpoint(path, model)


def test_a_mismatch_changes_nothing(tmp_path, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "wide.pt", MLP(hidden=32), epoch=1)
    with pytest.raises(ArchitectureMismatchError):
        load_checkpoint(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_ddp_prefix_gets_a_hint(tmp_path, model):
    wrapper = nn.Module()
    wrapper.module = MLP(hidden=16)
    path = save_checkpoint(tmp_path / "ddp.pt", wrapper, epoch=1)
    with pytest.raises(ArchitectureMismatchError, match="hint: keys start with 'module.'"):
        load_checkpoint(path, model)


# --- loading never unpickles arbitrary objects ------------------------------------------------

def test_a_malicious_pickle_is_refused_without_running(tmp_path, model):
    marker = tmp_path / "pwned"
    torch.save({"model": model.state_dict(), "x": Plant(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not marker.exists()


def test_a_malicious_pickle_with_a_valid_checksum_is_refused_without_running(tmp_path, model):
    marker = tmp_path / "pwned"
    payload = {"format": ckpt.FORMAT, "model": model.state_dict(), "x": Plant(marker)}
    (tmp_path / "evil.pt").write_bytes(ckpt.seal(torch_bytes(payload)))
    with pytest.raises(CheckpointError, match="safe loading .weights_only=True. refuses"):
        load_checkpoint(tmp_path / "evil.pt", model)
    assert not marker.exists()


def test_the_planted_payload_really_runs_without_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Plant(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()  # the danger the two tests above guard against is real


# --- atomic writes: SIGKILL, full disk, read-only folder, stale temps -----------------------

def _save_forever(path, start_epoch, model, ready):
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
        child = context.Process(target=_save_forever, args=(path, epoch + 1, model, ready))
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


def test_save_removes_stale_temporary_files(tmp_path, model):
    stale = tmp_path / ".c.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / ".other.pt.abc123.tmp"
    unrelated.write_bytes(b"someone else's")
    save_checkpoint(tmp_path / "c.pt", model, epoch=1)
    assert not stale.exists() and unrelated.exists()
    assert remove_stale_temps(tmp_path / "other.pt") == [unrelated]


def test_stale_temps_are_matched_by_exact_name(tmp_path):
    mine = tmp_path / ".c.pt.k3x_9a1q.tmp"
    longer_name = tmp_path / ".c.pt.enc.k3x_9a1q.tmp"  # an in-progress write of c.pt.enc, not of c.pt
    for path in (mine, longer_name):
        path.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path / "c.pt") == [mine]
    assert longer_name.exists()


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


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(saved, model, monkeypatch):
    monkeypatch.setattr(ckpt, "open", FullDisk, raising=False)  # only mvtk.checkpoint's open()
    with pytest.raises(CheckpointError, match=r"the disk is full \(ENOSPC\); the previous file .* is unchanged"):
        save_checkpoint(saved, model, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, model)["epoch"] == 3
    assert not list(saved.parent.glob(".*.tmp")), "the partial temporary file was left behind"


def test_a_full_disk_while_saving_weights_is_a_clear_error_and_keeps_the_previous_file(tmp_path, model,
                                                                                       monkeypatch):
    import safetensors
    import safetensors.torch

    path = save_weights(tmp_path / "w.safetensors", model)
    previous = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):  # safetensors reports ENOSPC as a SafetensorError
        Path(filename).write_bytes(b"\x00" * 100)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"w.safetensors'.*the disk is full \(ENOSPC\); the previous file .* "
                                              r"is unchanged"):
        save_weights(path, MLP(hidden=16))
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert not list(tmp_path.glob(".*.tmp")), "the partial temporary file was left behind"


def test_a_disk_that_fills_up_at_fsync_keeps_the_previous_checkpoint(saved, model, monkeypatch):
    def full_at_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_at_fsync)
    with pytest.raises(CheckpointError, match="the disk is full"):
        save_checkpoint(saved, model, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, model)["epoch"] == 3
    assert not list(saved.parent.glob(".*.tmp"))


def test_a_read_only_folder_is_a_clear_error_and_keeps_the_previous_checkpoint(saved, model, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match=r"the folder is not writable \(EACCES\)"):
        save_checkpoint(saved, model, epoch=4)
    monkeypatch.undo()
    assert load_checkpoint(saved, model)["epoch"] == 3


# --- periodic checkpointing -----------------------------------------------------------------

def history_of(val_losses):
    return History(train_loss=[1.0] * len(val_losses), val_loss=list(val_losses),
                   val_acc=[0.5] * len(val_losses), lr=[0.1] * len(val_losses))


def run_callback(callback, val_losses):
    for epoch in range(1, len(val_losses) + 1):
        assert callback(epoch, history_of(val_losses[:epoch])) is None


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_checkpointer_keeps_the_last_and_the_best_with_readable_names(tmp_path, model):
    run_callback(ModelCheckpoint(tmp_path, model, save_top_k=2, keep_last=1), [0.9, 0.3, 0.5, 0.2, 0.7])
    assert names(tmp_path) == ["epoch=0002-val_loss=0.3000.pt", "epoch=0004-val_loss=0.2000.pt",
                               "epoch=0005-val_loss=0.7000.pt", "last.pt"]


def test_last_points_at_the_newest_checkpoint(tmp_path, model):
    callback = ModelCheckpoint(tmp_path, model)
    run_callback(callback, [0.9, 0.3, 0.5])
    assert os.readlink(tmp_path / "last.pt") == "epoch=0003-val_loss=0.5000.pt"
    assert load_checkpoint(tmp_path / "last.pt", model)["epoch"] == 3
    assert callback.last_path.name == "epoch=0003-val_loss=0.5000.pt"
    assert callback.best_path.name == "epoch=0002-val_loss=0.3000.pt"


def test_last_falls_back_to_a_hard_link_without_symlinks(tmp_path, model, monkeypatch):
    def no_symlinks(*args):
        raise OSError(errno.EPERM, "symlinks not allowed")
    monkeypatch.setattr(os, "symlink", no_symlinks)
    run_callback(ModelCheckpoint(tmp_path, model), [0.9, 0.3])
    assert not (tmp_path / "last.pt").is_symlink()
    assert load_checkpoint(tmp_path / "last.pt", model)["epoch"] == 2


def test_checkpointer_saves_every_n_epochs(tmp_path, model):
    run_callback(ModelCheckpoint(tmp_path, model, every_n_epochs=2, save_top_k=-1, monitor=None, save_last=False),
                 [0.9, 0.8, 0.7, 0.6, 0.5])
    assert names(tmp_path) == ["epoch=0002.pt", "epoch=0004.pt"]


def test_checkpointer_mode_max_keeps_the_highest(tmp_path, model):
    callback = ModelCheckpoint(tmp_path, model, monitor="val_acc", mode="max", keep_last=0, save_last=False)
    for epoch, acc in enumerate([0.5, 0.9, 0.7], start=1):
        callback(epoch, History(train_loss=[1.0] * epoch, val_loss=[1.0] * epoch, val_acc=[0.1] * (epoch - 1) + [acc],
                                lr=[0.1] * epoch))
    assert names(tmp_path) == ["epoch=0002-val_acc=0.9000.pt"]


def test_a_nan_metric_ranks_worst(tmp_path, model):
    callback = ModelCheckpoint(tmp_path, model, keep_last=0, save_last=False)
    run_callback(callback, [float("nan"), 0.8])
    assert names(tmp_path) == ["epoch=0002-val_loss=0.8000.pt"]


def test_a_resumed_checkpointer_counts_the_files_already_there(tmp_path, model):
    run_callback(ModelCheckpoint(tmp_path, model, save_top_k=1, keep_last=1), [0.9, 0.2, 0.5])
    (tmp_path / "notes.txt").write_text("mine")
    resumed = ModelCheckpoint(tmp_path, model, save_top_k=1, keep_last=1)
    assert resumed.best_path.name == "epoch=0002-val_loss=0.2000.pt"
    resumed(4, history_of([0.9, 0.2, 0.5, 0.6]))
    assert names(tmp_path) == ["epoch=0002-val_loss=0.2000.pt", "epoch=0004-val_loss=0.6000.pt", "last.pt",
                               "notes.txt"]


def test_checkpointer_records_progress_and_rng_for_resuming(tmp_path, model, loaders):
    callback = ModelCheckpoint(tmp_path, model, loader_generator=loaders.train.generator,
                               steps_per_epoch=len(loaders.train))
    fit(model, loaders.train, loaders.val, epochs=2, on_epoch_end=callback, progress=False)
    meta = load_checkpoint(latest_checkpoint(tmp_path), model, loader_generator=loaders.train.generator)
    assert meta["epoch"] == 2 and meta["step"] == 2 * len(loaders.train)
    assert set(meta["metrics"]) == {"train_loss", "val_loss", "val_acc", "lr"}


def test_an_unknown_monitor_is_named(tmp_path, model):
    with pytest.raises(InvalidArgumentError, match="monitor 'val_f1' is not in the history"):
        ModelCheckpoint(tmp_path, model, monitor="val_f1")(1, history_of([0.5]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="lowest"), "mode must be 'min' or 'max'"),
    (dict(every_n_epochs=0), "every_n_epochs must be an int >= 1"),
    (dict(save_top_k=-2), "save_top_k must be an int >= -1"),
    (dict(monitor="val/loss"), "monitor must be a metric name"),
])
def test_bad_checkpointer_settings_are_named(tmp_path, model, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ModelCheckpoint(tmp_path, model, **kwargs)


def test_latest_checkpoint_without_last_pointer_is_the_newest_epoch(tmp_path, model):
    assert latest_checkpoint(tmp_path) is None
    run_callback(ModelCheckpoint(tmp_path, model, keep_last=2, save_last=False), [0.3, 0.5])
    assert latest_checkpoint(tmp_path).name == "epoch=0002-val_loss=0.5000.pt"


def test_latest_checkpoint_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder .*no_such_run' does not exist"):
        latest_checkpoint(tmp_path / "no_such_run")


def test_checkpointer_removes_stale_temps_of_its_own_files_only(tmp_path, model):
    stale = [tmp_path / ".epoch=0007-val_loss=0.1000.pt.abc123.tmp", tmp_path / ".last.pt.abc123.tmp"]
    foreign = tmp_path / ".notes.txt.abc123.tmp"
    for path in (*stale, foreign):
        path.write_bytes(b"partial")
    run_callback(ModelCheckpoint(tmp_path, model), [0.3])
    assert not any(path.exists() for path in stale) and foreign.exists()


def test_checkpointing_every_epoch_does_not_change_training(tmp_path):
    seed_everything(0, threads=THREADS)
    loaders, plain = make_loaders(batch_size=64), MLPv2(hidden=32)
    fit(plain, loaders.train, loaders.val, epochs=3, progress=False)
    seed_everything(0, threads=THREADS)
    loaders, saving = make_loaders(batch_size=64), MLPv2(hidden=32)
    fit(saving, loaders.train, loaders.val, epochs=3, progress=False,
        on_epoch_end=ModelCheckpoint(tmp_path, saving, loader_generator=loaders.train.generator))
    assert same_weights(plain, saving)


# --- safetensors ----------------------------------------------------------------------------

def test_safetensors_round_trip_with_metadata(tmp_path, model):
    path = save_weights(tmp_path / "w.safetensors", model, metadata={"dataset": "digits"})
    other = MLP(hidden=16)
    meta = load_weights(path, other)
    assert same_weights(model, other)
    assert meta["torch_version"] == str(torch.__version__) and meta["dataset"] == "digits"
    assert meta["model_class"] == "MLP" and meta["created"].endswith("+00:00")


def test_safetensors_metadata_records_the_git_commit_when_there_is_one(tmp_path, model, monkeypatch):
    monkeypatch.setattr(ckpt, "git_commit", lambda: "a" * 40)
    assert load_weights(save_weights(tmp_path / "w.safetensors", model))["git_commit"] == "a" * 40
    monkeypatch.setattr(ckpt, "git_commit", lambda: None)
    assert "git_commit" not in load_weights(save_weights(tmp_path / "w.safetensors", model))


def test_git_commit_is_none_without_git_or_when_it_hangs(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    assert ckpt.git_commit() is None  # not a repository
    for failure in (FileNotFoundError("git"), subprocess.TimeoutExpired("git", 2.0)):
        monkeypatch.setattr(subprocess, "run", lambda *a, failure=failure, **k: (_ for _ in ()).throw(failure))
        assert ckpt.git_commit() is None


def test_safetensors_for_another_architecture_is_a_mismatch(tmp_path, model):
    path = save_weights(tmp_path / "w.safetensors", MLP(hidden=32))
    with pytest.raises(ArchitectureMismatchError, match="shape mismatch"):
        load_weights(path, model)


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_a_broken_safetensors_file_is_a_clear_error(tmp_path, model, content):
    (tmp_path / "w.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_weights(tmp_path / "w.safetensors", model)


def test_safetensors_metadata_must_be_strings(tmp_path, model):
    with pytest.raises(InvalidArgumentError, match="metadata must map str to str"):
        save_weights(tmp_path / "w.safetensors", model, metadata={"epoch": 3})


# --- encryption at rest ---------------------------------------------------------------------

@pytest.fixture
def key():
    return new_key()


def test_encrypted_round_trip(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.pt.enc", model, epoch=2, key=key, name="digits-mlp")
    other = MLP(hidden=16)
    meta = load_checkpoint(path, other, key=key, name="digits-mlp")
    assert same_weights(model, other) and meta["epoch"] == 2 and meta["encrypted_for"] == "digits-mlp"


def test_an_encrypted_file_does_not_show_the_weights(tmp_path, model, key):
    weight_bytes = model.fc1.weight.detach().numpy().tobytes()[:64]
    plain = save_checkpoint(tmp_path / "c.pt", model, epoch=2)
    encrypted = save_checkpoint(tmp_path / "c.pt.enc", model, epoch=2, key=key)
    assert weight_bytes in plain.read_bytes() and weight_bytes not in encrypted.read_bytes()
    with pytest.raises(Exception):
        torch.load(encrypted, weights_only=True)


def test_every_save_uses_a_fresh_nonce(tmp_path, model, key):
    first = save_checkpoint(tmp_path / "a.enc", model, epoch=1, key=key, name="m").read_bytes()
    second = save_checkpoint(tmp_path / "b.enc", model, epoch=1, key=key, name="m").read_bytes()
    start = len(ckpt.ENCRYPTED_MAGIC) + 2 + 1
    assert first[start:start + ckpt.NONCE_BYTES] != second[start:start + ckpt.NONCE_BYTES]


def test_a_wrong_key_is_refused(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.enc", model, epoch=1, key=key)
    with pytest.raises(DecryptionError, match="wrong key, or the file was changed"):
        load_checkpoint(path, model, key=new_key())


def test_a_tampered_encrypted_file_is_refused(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.enc", model, epoch=1, key=key)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match="AES-GCM authentication failed"):
        load_checkpoint(path, model, key=key)


def test_a_relabelled_encrypted_file_is_refused(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.enc", model, epoch=1, key=key, name="aaa")
    path.write_bytes(path.read_bytes().replace(b"aaa", b"bbb", 1))
    with pytest.raises(DecryptionError, match="authentication failed"):
        load_checkpoint(path, model, key=key, name="bbb")


def test_another_models_file_is_refused(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.enc", model, epoch=1, key=key, name="digits-mlp")
    with pytest.raises(DecryptionError, match="encrypted for model 'digits-mlp', not 'digits-cnn'"):
        load_checkpoint(path, model, key=key, name="digits-cnn")


def test_an_encrypted_file_without_a_key_says_so(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.enc", model, epoch=1, key=key)
    with pytest.raises(DecryptionError, match="is encrypted: pass key="):
        load_checkpoint(path, model)


def test_a_plain_file_put_in_place_of_an_encrypted_one_is_refused(tmp_path, model, key):
    path = save_checkpoint(tmp_path / "c.pt.enc", MLP(hidden=16), epoch=1)  # an attacker's unencrypted file
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DecryptionError, match=r"c.pt.enc' is not encrypted, but a key was given"):
        load_checkpoint(path, model, key=key, name="digits-mlp")
    with pytest.raises(DecryptionError, match="is not encrypted, but a key was given"):
        read_checkpoint(path, key=key)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keys_come_from_a_key_file_or_the_environment(tmp_path, monkeypatch):
    key = new_key(tmp_path / "secret.key")
    assert load_key(tmp_path / "secret.key") == key
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(ckpt.KEY_ENV_VAR, (tmp_path / "secret.key").read_text())
    assert load_key() == key


def test_key_problems_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.KEY_ENV_VAR, raising=False)
    with pytest.raises(InvalidArgumentError, match="no encryption key: set \\$MVTK_CHECKPOINT_KEY"):
        load_key()
    monkeypatch.setenv(ckpt.KEY_ENV_VAR, "c2hvcnQ=")
    with pytest.raises(InvalidArgumentError, match="must be a 16, 24 or 32-byte AES key, got 5"):
        load_key()
    new_key(tmp_path / "k")
    with pytest.raises(InvalidArgumentError, match="already exists; refusing to overwrite"):
        new_key(tmp_path / "k")
    with pytest.raises(InvalidArgumentError, match="key file .* does not exist"):
        load_key(tmp_path / "missing.key")


def test_read_checkpoint_gives_the_whole_verified_payload(saved, model):
    payload = read_checkpoint(saved)
    assert torch.equal(payload["model"]["fc1.weight"], model.fc1.weight.detach())
