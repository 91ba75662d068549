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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mvtk.checkpoint._io import check_name, history_dict, writing
from mvtk.checkpoint.core import read_checkpoint, save_checkpoint
from mvtk.checkpoint.crypto import ENCRYPTED_MAGIC, check_key
from mvtk.checkpoint.signing import (check_signing_key, check_verify_key, read_signature, signature_path,
                                     write_signature)
from mvtk.errors import CheckpointError, InvalidArgumentError, SignatureError, check_int, check_module, check_path
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
    `signing_key` (Ed25519, `load_private_key`) signs every file into `<file>.sig`, which is pruned
    with its file; `last.pt` is verified against its target's signature.
    """

    def __init__(self, dirpath: str | os.PathLike, model: nn.Module, optimizer=None, scheduler=None, *,
                 monitor: str | None = "val_loss", mode: str = "min", save_top_k: int = 1, keep_last: int = 1,
                 every_n_epochs: int = 1, save_last: bool = True, loader_generator: torch.Generator | None = None,
                 steps_per_epoch: int = 0, extra: dict | None = None, key: bytes | None = None,
                 name: str | None = None, signing_key=None):
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}")
        if monitor is not None and not (isinstance(monitor, str) and re.fullmatch(r"\w+", monitor)):
            raise InvalidArgumentError(f"monitor must be a metric name such as 'val_loss' or None, got {monitor!r}")
        for label, value, low in (("save_top_k", save_top_k, -1), ("keep_last", keep_last, -1),
                                  ("every_n_epochs", every_n_epochs, 1), ("steps_per_epoch", steps_per_epoch, 0)):
            check_int(value, label, low=low)
        self.dirpath = check_path(dirpath, "dirpath")
        check_module(model)  # every argument save_checkpoint would refuse is refused now, not at the first epoch
        if key is not None:
            check_key(key)
        check_name(name, "name", optional=True)
        check_signing_key(signing_key)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.monitor, self.mode, self.save_top_k, self.keep_last = monitor, mode, save_top_k, keep_last
        self.every_n_epochs, self.save_last, self.steps_per_epoch = every_n_epochs, save_last, steps_per_epoch
        self.loader_generator, self.extra, self.key, self.name = loader_generator, extra, key, name
        self.signing_key = signing_key
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
                        metrics=metrics, extra=self.extra, key=self.key, name=self.name,
                        signing_key=self.signing_key)
        self.saved[path.name] = (epoch, value)
        if self.save_last:
            self._point_last(path)
        self._prune(path.name)
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

    def _prune(self, just_saved: str) -> None:
        by_epoch = sorted(self.saved, key=lambda n: self.saved[n][0])
        keep = set(by_epoch if self.keep_last == -1 else by_epoch[len(by_epoch) - self.keep_last:])
        ranked = self._ranked()
        keep |= set(ranked if self.save_top_k == -1 else ranked[:self.save_top_k])
        if self.save_last and by_epoch:
            keep.add(by_epoch[-1])
            keep.add(just_saved)  # last.pt's target, even when a resumed run re-saves an older epoch
        for file_name in set(self.saved) - keep:
            (self.dirpath / file_name).unlink(missing_ok=True)
            signature_path(self.dirpath / file_name).unlink(missing_ok=True)
            del self.saved[file_name]

    def _point_last(self, target: Path) -> None:
        last, final = self.dirpath / LAST_NAME, None
        with writing(last) as tmp:
            tmp.unlink()  # the link takes the temporary file's name; atomic_write renames it over last.pt
            try:
                os.symlink(target.name, tmp)  # relative, so the folder can be moved
            except (OSError, NotImplementedError):  # no symlinks (Windows without developer mode): a hard link
                final = self._sign_link(target)
                os.link(target, tmp)
        if final:
            write_signature(last, final)
        elif final is not None:
            signature_path(last).unlink(missing_ok=True)  # an unsigned target: the old signature signs nothing here

    def _sign_link(self, target: Path) -> list[dict]:
        """Before a hard link `last.pt` moves to `target`: its signature holds the old and the new records.

        A hard link has no target to find the signature by, so `last.pt.sig` is a copy of the target's.
        Two files change, so in three atomic steps (as `replacing_signed`): `last.pt.sig` holds the
        records of the old and the new target, then `last.pt` is replaced, then only the new target's
        records (returned; [] for an unsigned target) remain. At every instant `last.pt` has a record
        that verifies it.
        """
        if not signature_path(target).exists():
            return []
        records = read_signature(target)
        last = self.dirpath / LAST_NAME
        try:
            previous = read_signature(last) if last.exists() else []
        except SignatureError:
            previous = []
        write_signature(last, previous + [r for r in records if r not in previous])
        return records

    def _scan(self) -> dict[str, tuple[int, float | None]]:
        found = {}
        for path in self.dirpath.iterdir():
            match = self.pattern.fullmatch(path.name)
            if match and path.is_file() and not path.is_symlink():
                found[path.name] = (int(match.group(1)), float(match.group(2)) if self.monitor else None)
        return found


def latest_checkpoint(dirpath: str | os.PathLike, *, key: bytes | None = None,
                      verify_key: Ed25519PublicKey | None = None) -> Path | None:
    """The newest complete checkpoint in `dirpath` (`last.pt` if that is it), else None: where to resume from (Lesson 03, §4).

    `last.pt` is trusted only as far as the files confirm it: a run killed after writing an epoch
    file but before moving `last.pt` left a newer complete file, and that one is returned. Each
    candidate is read and verified (its BLAKE3 checksum, SHA-256 in a format-1 file; with `key`,
    decrypted; with `verify_key`, its signature) and compared by the epoch recorded inside it; an
    encrypted file read without `key` counts by the epoch in its name (atomic writes make every
    named file complete). Signature (`.sig`), temporary and lock (`.name.lock`) files are ignored.
    None means a fresh start (no checkpoint yet); a folder that does not exist, or whose
    checkpoints all fail verification, is a CheckpointError.
    """
    folder = check_path(dirpath, "dirpath")
    if key is not None:
        check_key(key)  # a bad argument is named, not reported as every file failing
    check_verify_key(verify_key)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist (or is not a folder)")
    named = sorted(((int(m.group(1)), p) for p in folder.glob("epoch=*.pt")
                    if (m := re.fullmatch(r"epoch=(\d+)(?:-.*)?\.pt", p.name)) and p.is_file()
                    and not p.is_symlink()), key=lambda item: item[0], reverse=True)
    last, failures = folder / LAST_NAME, []
    last_epoch = _recorded_epoch(last, key, verify_key, failures) if last.exists() else None
    for name_epoch, path in named:
        if last_epoch is not None and name_epoch <= last_epoch:
            break
        epoch = _recorded_epoch(path, key, verify_key, failures)
        if epoch is not None and (last_epoch is None or epoch > last_epoch):
            return path
    if last_epoch is not None:
        return last
    if failures:
        raise CheckpointError(f"no complete checkpoint in {str(folder)!r}: " + "; ".join(failures))
    return None


def _recorded_epoch(path: Path, key, verify_key, failures: list[str]) -> int | None:
    """The epoch recorded in a verified checkpoint file, or None (its reason added to `failures`)."""
    try:
        if key is None and path.read_bytes()[:len(ENCRYPTED_MAGIC)] == ENCRYPTED_MAGIC:
            match = re.match(r"epoch=(\d+)", Path(os.path.realpath(path)).name)
            if match:
                return int(match.group(1))
        return int(read_checkpoint(path, key=key, verify_key=verify_key)["epoch"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
        failures.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
