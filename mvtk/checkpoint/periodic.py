"""Periodic checkpointing during training: ModelCheckpoint and where to resume from (Lesson 03, §3, §4).

`ModelCheckpoint` is fit's `on_epoch_end` callback: it saves with `mvtk.checkpoint.save_checkpoint`
under readable names, keeps the last k and best k, and points `last.pt` at the newest.
`mvtk.checkpoint` re-exports the public names here; import them from there.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from mvtk.checkpoint._io import history_dict, writing
from mvtk.checkpoint.core import save_checkpoint
from mvtk.errors import CheckpointError, InvalidArgumentError, check_int
from mvtk.files import remove_abandoned_temps
from mvtk.train import History

__all__ = ["LAST_NAME", "ModelCheckpoint", "latest_checkpoint"]

LAST_NAME = "last.pt"              # ModelCheckpoint's pointer to the newest checkpoint


class ModelCheckpoint:
    """Save a checkpoint every n epochs as fit's `on_epoch_end`; keep the last k and best k (Lesson 03, §3).

    Files are named like `epoch=0004-val_loss=0.1234.pt`; `last.pt` points at the newest. Files of
    an earlier run in `dirpath` (found by name) count towards the last k / best k, so a resumed
    run carries on pruning where the crashed one stopped. Other files are never touched.

    `monitor` is the history key ranked for the best k (None: the newest counts as best), `mode`
    "min" for a loss or "max" for an accuracy. `save_top_k` best and `keep_last` newest files are
    kept (a file may be both); -1 keeps every file, 0 none of that kind (with `save_last`, the
    newest is kept anyway as `last.pt`'s target). `every_n_epochs` saves on epochs that are its
    multiples. `steps_per_epoch` (usually `len(train_loader)`) gives the step recorded, epoch ×
    steps_per_epoch; 0 records step 0. `loader_generator`, `extra`, `key` and `name` are passed to
    save_checkpoint: the DataLoader's generator to restore its shuffle order, plain values to
    store, and an AES key to encrypt every file for the model `name` (default: its class name).
    """

    def __init__(self, dirpath: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *,
                 monitor: str | None = "val_loss", mode: str = "min", save_top_k: int = 1, keep_last: int = 1,
                 every_n_epochs: int = 1, save_last: bool = True, loader_generator: torch.Generator | None = None,
                 steps_per_epoch: int = 0, extra: dict | None = None, key: bytes | None = None,
                 name: str | None = None):
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}")
        if monitor is not None and not (isinstance(monitor, str) and re.fullmatch(r"\w+", monitor)):
            raise InvalidArgumentError(f"monitor must be a metric name such as 'val_loss' or None, got {monitor!r}")
        for label, value, low in (("save_top_k", save_top_k, -1), ("keep_last", keep_last, -1),
                                  ("every_n_epochs", every_n_epochs, 1), ("steps_per_epoch", steps_per_epoch, 0)):
            check_int(value, label, low=low)
        self.dirpath = Path(dirpath)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.monitor, self.mode, self.save_top_k, self.keep_last = monitor, mode, save_top_k, keep_last
        self.every_n_epochs, self.save_last, self.steps_per_epoch = every_n_epochs, save_last, steps_per_epoch
        self.loader_generator, self.extra, self.key, self.name = loader_generator, extra, key, name
        self.pattern = re.compile(r"epoch=(\d+)" + (rf"-{monitor}=([-+]?(?:\d+\.\d+|nan|inf))" if monitor else "")
                                  + r"\.pt")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.saved: dict[str, tuple[int, float | None]] = self._scan()

    def __call__(self, epoch: int, history: History | dict) -> None:
        """Save if `epoch` is a multiple of every_n_epochs, prune, move `last.pt` (Lesson 03, §3)."""
        if epoch % self.every_n_epochs:
            return None
        metrics = {k: float(v[-1]) for k, v in history_dict(history).items() if v}
        if self.monitor is not None and self.monitor not in metrics:
            raise InvalidArgumentError(f"monitor {self.monitor!r} is not in the history; it has {sorted(metrics)}")
        value = metrics.get(self.monitor) if self.monitor else None
        path = self.dirpath / self.filename(epoch, value)
        remove_abandoned_temps(self.dirpath, self.pattern.fullmatch)  # saves of any epoch a crash interrupted
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, epoch=epoch,
                        step=epoch * self.steps_per_epoch, history=history, loader_generator=self.loader_generator,
                        metrics=metrics, extra=self.extra, key=self.key, name=self.name)
        self.saved[path.name] = (epoch, value)
        if self.save_last:
            self._point_last(path)
        self._prune()
        return None

    def filename(self, epoch: int, value: float | None = None) -> str:
        """The readable file name for an epoch, e.g. `epoch=0004-val_loss=0.1234.pt` (Lesson 03, §3)."""
        return f"epoch={epoch:04d}" + (f"-{self.monitor}={value:.4f}" if self.monitor else "") + ".pt"

    @property
    def best_path(self) -> Path | None:
        """The kept checkpoint with the best value (ties: the earliest; no monitor: the newest) (Lesson 03, §3)."""
        ranked = self._ranked()
        return self.dirpath / ranked[0] if ranked else None

    @property
    def last_path(self) -> Path | None:
        """The newest kept checkpoint file, or None before the first save (Lesson 03, §3)."""
        if not self.saved:
            return None
        return self.dirpath / max(self.saved, key=lambda n: self.saved[n][0])

    def _ranked(self) -> list[str]:
        if self.monitor is None:  # as in Lightning: without a monitor, the newest counts as best
            return sorted(self.saved, key=lambda n: -self.saved[n][0])
        sign = 1.0 if self.mode == "min" else -1.0

        def score(name):
            epoch, value = self.saved[name]
            return (math.isnan(value), sign * value if not math.isnan(value) else 0.0, epoch)
        return sorted(self.saved, key=score)

    def _prune(self) -> None:
        by_epoch = sorted(self.saved, key=lambda n: self.saved[n][0])
        keep = set(by_epoch if self.keep_last == -1 else by_epoch[len(by_epoch) - self.keep_last:])
        ranked = self._ranked()
        keep |= set(ranked if self.save_top_k == -1 else ranked[:self.save_top_k])
        if self.save_last and by_epoch:
            keep.add(by_epoch[-1])
        for file_name in set(self.saved) - keep:
            (self.dirpath / file_name).unlink(missing_ok=True)
            del self.saved[file_name]

    def _point_last(self, target: Path) -> None:
        with writing(self.dirpath / LAST_NAME) as tmp:
            tmp.unlink()  # the link takes the temporary file's name; atomic_write renames it over last.pt
            try:
                os.symlink(target.name, tmp)  # relative, so the folder can be moved
            except (OSError, NotImplementedError):  # no symlinks (Windows without developer mode): a hard link
                os.link(target, tmp)

    def _scan(self) -> dict[str, tuple[int, float | None]]:
        found = {}
        for path in self.dirpath.iterdir():
            match = self.pattern.fullmatch(path.name)
            if match and path.is_file() and not path.is_symlink():
                found[path.name] = (int(match.group(1)), float(match.group(2)) if self.monitor else None)
        return found


def latest_checkpoint(dirpath: str | os.PathLike) -> Path | None:
    """`last.pt` in `dirpath`, else its newest `epoch=NNNN*.pt`, else None: where to resume from (Lesson 03, §4).

    None means a fresh start (the folder has no checkpoint yet); a folder that does not exist is
    a CheckpointError, since it is more likely a wrong path than a first run.
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist (or is not a folder)")
    if (folder / LAST_NAME).exists():
        return folder / LAST_NAME
    epochs = [(int(m.group(1)), p) for p in folder.glob("epoch=*.pt") if (m := re.match(r"epoch=(\d+)", p.name))]
    return max(epochs)[1] if epochs else None

