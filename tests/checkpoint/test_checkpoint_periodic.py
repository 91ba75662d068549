"""Lesson 03's claims about periodic checkpointing: readable names, the last k and best k kept, where to resume."""
import errno
import os
from pathlib import Path

import pytest
import torch

from mvtk.checkpoint import ModelCheckpoint, latest_checkpoint, load_checkpoint
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import CheckpointError, InvalidArgumentError
from mvtk.models import MLPv2
from mvtk.train import History, fit

THREADS = 1  # tiny models train fastest on one thread, and a shared CPU stays responsive


def history_of(val_losses):
    return History(train_loss=[1.0] * len(val_losses), val_loss=list(val_losses),
                   val_acc=[0.5] * len(val_losses), lr=[0.1] * len(val_losses))


def run_callback(callback, val_losses):
    for epoch in range(1, len(val_losses) + 1):
        assert callback(epoch, history_of(val_losses[:epoch])) is None


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_checkpointer_keeps_the_last_and_the_best_with_readable_names(tmp_path, mlp):
    run_callback(ModelCheckpoint(tmp_path, mlp, save_top_k=2, keep_last=1), [0.9, 0.3, 0.5, 0.2, 0.7])
    assert names(tmp_path) == ["epoch=0002-val_loss=0.3000.pt", "epoch=0004-val_loss=0.2000.pt",
                               "epoch=0005-val_loss=0.7000.pt", "last.pt"]


def test_last_points_at_the_newest_checkpoint(tmp_path, mlp):
    callback = ModelCheckpoint(tmp_path, mlp)
    run_callback(callback, [0.9, 0.3, 0.5])
    assert os.readlink(tmp_path / "last.pt") == "epoch=0003-val_loss=0.5000.pt"
    assert load_checkpoint(tmp_path / "last.pt", mlp)["epoch"] == 3
    assert callback.last_path.name == "epoch=0003-val_loss=0.5000.pt"
    assert callback.best_path.name == "epoch=0002-val_loss=0.3000.pt"


def test_last_falls_back_to_a_hard_link_without_symlinks(tmp_path, mlp, monkeypatch):
    def no_symlinks(*args):
        raise OSError(errno.EPERM, "symlinks not allowed")
    monkeypatch.setattr(os, "symlink", no_symlinks)
    run_callback(ModelCheckpoint(tmp_path, mlp), [0.9, 0.3])
    assert not (tmp_path / "last.pt").is_symlink()
    assert load_checkpoint(tmp_path / "last.pt", mlp)["epoch"] == 2


def test_checkpointer_saves_every_n_epochs(tmp_path, mlp):
    run_callback(ModelCheckpoint(tmp_path, mlp, every_n_epochs=2, save_top_k=-1, monitor=None, save_last=False),
                 [0.9, 0.8, 0.7, 0.6, 0.5])
    assert names(tmp_path) == ["epoch=0002.pt", "epoch=0004.pt"]


def test_checkpointer_mode_max_keeps_the_highest(tmp_path, mlp):
    callback = ModelCheckpoint(tmp_path, mlp, monitor="val_acc", mode="max", keep_last=0, save_last=False)
    for epoch, acc in enumerate([0.5, 0.9, 0.7], start=1):
        callback(epoch, History(train_loss=[1.0] * epoch, val_loss=[1.0] * epoch, val_acc=[0.1] * (epoch - 1) + [acc],
                                lr=[0.1] * epoch))
    assert names(tmp_path) == ["epoch=0002-val_acc=0.9000.pt"]


def test_a_nan_metric_ranks_worst(tmp_path, mlp):
    callback = ModelCheckpoint(tmp_path, mlp, keep_last=0, save_last=False)
    run_callback(callback, [float("nan"), 0.8])
    assert names(tmp_path) == ["epoch=0002-val_loss=0.8000.pt"]


def test_a_resumed_checkpointer_counts_the_files_already_there(tmp_path, mlp):
    run_callback(ModelCheckpoint(tmp_path, mlp, save_top_k=1, keep_last=1), [0.9, 0.2, 0.5])
    (tmp_path / "notes.txt").write_text("mine")
    resumed = ModelCheckpoint(tmp_path, mlp, save_top_k=1, keep_last=1)
    assert resumed.best_path.name == "epoch=0002-val_loss=0.2000.pt"
    resumed(4, history_of([0.9, 0.2, 0.5, 0.6]))
    assert names(tmp_path) == ["epoch=0002-val_loss=0.2000.pt", "epoch=0004-val_loss=0.6000.pt", "last.pt",
                               "notes.txt"]


def test_checkpointer_records_progress_and_rng_for_resuming(tmp_path, mlp, loaders):
    callback = ModelCheckpoint(tmp_path, mlp, loader_generator=loaders.train.generator,
                               steps_per_epoch=len(loaders.train))
    fit(mlp, loaders.train, loaders.val, epochs=2, on_epoch_end=callback, progress=False)
    meta = load_checkpoint(latest_checkpoint(tmp_path), mlp, loader_generator=loaders.train.generator)
    assert meta["epoch"] == 2 and meta["step"] == 2 * len(loaders.train)
    assert set(meta["metrics"]) == {"train_loss", "val_loss", "val_acc", "lr"}


def test_an_unknown_monitor_is_named(tmp_path, mlp):
    with pytest.raises(InvalidArgumentError, match="monitor 'val_f1' is not in the history"):
        ModelCheckpoint(tmp_path, mlp, monitor="val_f1")(1, history_of([0.5]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="lowest"), "mode must be 'min' or 'max'"),
    (dict(every_n_epochs=0), "every_n_epochs must be an int >= 1"),
    (dict(save_top_k=-2), "save_top_k must be an int >= -1"),
    (dict(monitor="val/loss"), "monitor must be a metric name"),
])
def test_bad_checkpointer_settings_are_named(tmp_path, mlp, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ModelCheckpoint(tmp_path, mlp, **kwargs)


def test_latest_checkpoint_without_last_pointer_is_the_newest_epoch(tmp_path, mlp):
    assert latest_checkpoint(tmp_path) is None
    run_callback(ModelCheckpoint(tmp_path, mlp, keep_last=2, save_last=False), [0.3, 0.5])
    assert latest_checkpoint(tmp_path).name == "epoch=0002-val_loss=0.5000.pt"


def test_latest_checkpoint_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder .*no_such_run' does not exist"):
        latest_checkpoint(tmp_path / "no_such_run")


def test_checkpointer_removes_stale_temps_of_its_own_files_only(tmp_path, mlp, temp_file):
    stale = [temp_file("epoch=0007-val_loss=0.1000.pt"), temp_file("last.pt")]  # their saves' process died
    foreign = temp_file("notes.txt")
    run_callback(ModelCheckpoint(tmp_path, mlp), [0.3])
    assert not any(path.exists() for path in stale) and foreign.exists()


def test_checkpointing_every_epoch_does_not_change_training(tmp_path):
    seed_everything(0, threads=THREADS)
    loaders, plain = make_loaders(batch_size=64), MLPv2(hidden=32)
    fit(plain, loaders.train, loaders.val, epochs=3, progress=False)
    seed_everything(0, threads=THREADS)
    loaders, saving = make_loaders(batch_size=64), MLPv2(hidden=32)
    fit(saving, loaders.train, loaders.val, epochs=3, progress=False,
        on_epoch_end=ModelCheckpoint(tmp_path, saving, loader_generator=loaders.train.generator))
    torch.testing.assert_close(saving.state_dict(), plain.state_dict(), rtol=0, atol=0)


