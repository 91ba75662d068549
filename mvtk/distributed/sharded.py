"""Sharded checkpoints with torch.distributed.checkpoint (DCP): step folders and a `latest` pointer (Lesson 11, §3).

    runs/ckpt/step-000004/__0_0.distcp   what rank 0 holds
    runs/ckpt/step-000004/__1_0.distcp   what rank 1 holds
    runs/ckpt/step-000004/.metadata      which piece of which tensor is where (written last)
    runs/ckpt/latest                     'step-000004', replaced atomically once the folder is complete

Every rank writes its own shards in parallel; any number of processes can load them back, each
reading only the pieces it needs (resharding). A save never touches the folder `latest` names, so
a crash during a save leaves the previous checkpoint loadable.

An asynchronous save blocks training only while the state is copied into CPU buffers that every
later asynchronous save of the process reuses (torch's DefaultStager: no allocation, no page
faults after the first); a background thread writes the copy, over a process group of its own so
its collectives never mix with training's, and moves `latest` once the checkpoint is complete.
One save at a time per process: a save first waits for an asynchronous one still writing.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from mvtk.errors import CheckpointError, InvalidArgumentError, check_int, check_number
from mvtk.files import atomic_write

__all__ = ["LATEST", "METADATA", "PAUSED_MARK", "step_folder", "latest_folder", "save_sharded", "PendingSave",
           "load_sharded", "checkpoint_files", "example_state", "shard_state", "zeros_like_state", "state_equal",
           "to_torch_save", "from_torch_save", "state_bytes", "close_async_saves"]

LATEST = "latest"        # a one-line text file: the name of the newest complete step folder
METADATA = ".metadata"   # DCP writes it last: a folder without it is an unfinished save
PAUSED_MARK = "[mvtk.distributed] paused before the metadata"  # printed by the pause_before_commit test hook
_NO_GROUP = "torch.distributed is disabled"  # DCP's warning when it runs in one process without a group
_stager: DefaultStager | None = None  # the CPU buffers async saves copy into, one per tensor storage, reused
_in_flight: Future | None = None      # the async save still writing from them (and still to move `latest`)
_save_group: tuple = (None, None)     # (the default group, a gloo group of the same ranks for async saves)


def step_folder(root: str | os.PathLike, step: int) -> Path:
    """ROOT/step-000042: the folder one save writes, named so that `ls` sorts it (Lesson 11, §3)."""
    check_int(step, "step", low=0)
    return Path(root) / f"step-{step:06d}"


def latest_folder(root: str | os.PathLike) -> Path | None:
    """The complete step folder ROOT/latest names, or None before the first save (Lesson 11, §3).

    Raises CheckpointError when the pointer names a folder that is missing or has no .metadata.
    """
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(root) / pointer.read_text().strip()
    if not (folder / METADATA).is_file():
        raise CheckpointError(f"{str(pointer)!r} names {folder.name!r}, which is not a complete DCP checkpoint "
                              f"(no {METADATA}); folders there: {sorted(p.name for p in Path(root).iterdir())}")
    return folder


class _PausingWriter(FileSystemWriter):
    """A FileSystemWriter that waits before it writes .metadata: the test hook that lets a lesson kill a save."""

    def __init__(self, path, pause: float, **kwargs):
        super().__init__(path, **kwargs)
        self.pause = pause

    def finish(self, metadata, results) -> None:
        print(PAUSED_MARK, flush=True)  # every shard file is written; .metadata is not
        time.sleep(self.pause)
        super().finish(metadata, results)


class PendingSave:
    """A save in progress; `latest` moves to it once it is complete, and `wait()` blocks until then (Lesson 11, §3)."""

    def __init__(self, root: Path, folder: Path, future: Future | None = None):
        self.root, self.folder, self.future = root, folder, future

    @property
    def finished(self) -> bool:
        """Whether the save has ended (written and committed, or failed: `wait()` says which) (Lesson 11, §3)."""
        return self.future is None or self.future.done()

    def wait(self) -> Path:
        """Block until every rank has written its shards, .metadata exists and `latest` points here (Lesson 11, §3).

        Re-raises the error of a save that failed; `latest` then still names the previous checkpoint.
        """
        if self.future is not None:
            self.future.result()
        return self.folder


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _point_latest(root: Path, folder: Path) -> None:
    if _rank() == 0:  # one writer; the folder is complete (DCP wrote .metadata after every rank's shards)
        with atomic_write(root / LATEST) as tmp:
            tmp.write_text(folder.name + "\n")


def _committed(saving: Future, root: Path, folder: Path) -> Future:
    """A future that ends once `saving` has written the checkpoint and `latest` points at it (or either failed)."""
    done: Future = Future()

    def commit(saved: Future) -> None:  # runs in DCP's writer thread, as soon as the save ends
        try:
            saved.result()
            _point_latest(root, folder)
        except CheckpointException as exc:  # a BaseException: made an mvtk error that `except Exception` catches
            done.set_exception(_save_failed(folder, exc))
        except BaseException as exc:  # handed to whoever waits: PendingSave.wait() re-raises it
            done.set_exception(exc)
        else:
            done.set_result(folder)

    saving.add_done_callback(commit)
    return done


def _save_failed(folder: Path, exc: CheckpointException) -> CheckpointError:
    """DCP's CheckpointException (a BaseException listing each rank's error) as a CheckpointError naming the folder."""
    ranks = sorted(exc.failures)
    first = exc.failures[ranks[0]][0] if ranks else exc
    return CheckpointError(f"the DCP save into {str(folder)!r} failed on rank(s) {ranks}: {type(first).__name__}: "
                           f"{first}; {LATEST!r} still names the previous checkpoint")


def _async_stager() -> DefaultStager:
    """The process's stager: synchronous copies (the state at the call), into buffers kept for the next save."""
    global _stager
    if _stager is None:
        cuda = torch.cuda.is_available()  # pinned buffers and non-blocking copies from the GPU need CUDA
        _stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                               use_async_staging=False, use_non_blocking_copy=cuda))
    return _stager


def _async_group():
    """A gloo group of all ranks for the writer thread's collectives (made once, on every rank); None alone."""
    global _save_group
    if not dist.is_initialized():
        return None
    if _save_group[0] is not dist.group.WORLD:
        _save_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _save_group[1]


def close_async_saves() -> None:
    """Wait for this process's async save, free its staging buffers and its gloo group (Lesson 11, §3).

    Call it on every rank before `dist.destroy_process_group()`, so no writer thread or collective of
    the save group is still alive while the groups are torn down.
    """
    global _in_flight, _stager, _save_group
    if _in_flight is not None:
        wait_for([_in_flight])
        _in_flight = None
    if _stager is not None:
        _stager.close()
        _stager = None
    world, group = _save_group
    if group is not None and dist.is_initialized() and world is dist.group.WORLD:
        dist.destroy_process_group(group)
    _save_group = (None, None)


def save_sharded(state: Mapping[str, Any], root: str | os.PathLike, step: int, *, asynchronous: bool = False,
                 pause_before_commit: float = 0.0) -> PendingSave:
    """Every rank writes its shards of `state` to ROOT/step-NNNNNN with DCP; then ROOT/latest points there (Lesson 11, §3).

    Call it on every rank (or in one process without a group). A leftover folder of the same step
    from a crashed save is replaced; the folder `latest` names is never written over. Synchronous:
    returns when the save is complete. `asynchronous=True` (dcp.async_save) returns as soon as the
    state is copied into CPU buffers (reused by the next asynchronous save); training may then change
    the tensors: the checkpoint holds their values at the call. A background thread writes it and
    moves `latest` when it is complete; `.wait()` blocks until then and re-raises a failed write.
    Any save first waits for an asynchronous save of this process that is still writing.
    `pause_before_commit` S (TEST HOOK) sleeps S seconds after the shards and before .metadata.
    """
    if not isinstance(state, Mapping) or not state:
        raise InvalidArgumentError(f"state must be a non-empty dict of tensors (or nested dicts), got {type(state).__name__}")
    check_number(pause_before_commit, "pause_before_commit", low=0)
    root = Path(root)
    folder = step_folder(root, step)
    global _in_flight
    if _in_flight is not None:  # its buffers are about to be reused, and `latest` must move in order
        wait_for([_in_flight])  # its error, if any, is its PendingSave's to raise
        _in_flight = None
    if _rank() == 0:
        current = latest_folder(root)
        if current is not None and current.resolve() == folder.resolve():
            raise CheckpointError(f"{str(folder)!r} is the checkpoint {LATEST!r} names; save step {step} elsewhere "
                                  "or resume from it instead of saving it again")
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished save of this step from a crashed attempt
        folder.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()  # nobody writes into the folder before rank 0 has cleared it
    options = {"per_thread_copy_ahead": 0} if asynchronous else {}  # a staged state is on the CPU already
    writer = (_PausingWriter(folder, pause_before_commit, **options) if pause_before_commit
              else FileSystemWriter(folder, **options))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        if asynchronous:
            group = _async_group()
            saving = dcp.async_save(dict(state), storage_writer=writer, async_stager=_async_stager(),
                                    process_group=group, no_dist=group is None)
            _in_flight = _committed(saving, root, folder)
            return PendingSave(root, folder, _in_flight)
        try:
            dcp.save(dict(state), storage_writer=writer, no_dist=not dist.is_initialized())
        except CheckpointException as exc:
            raise _save_failed(folder, exc) from None
    _point_latest(root, folder)
    return PendingSave(root, folder)


def load_sharded(state: dict[str, Any], source: str | os.PathLike) -> Path:
    """Fill `state` in place from a DCP checkpoint: ROOT (via `latest`) or a step folder (Lesson 11, §3).

    `state` holds tensors of the right global shapes: plain tensors in one process (no process group
    needed), or DTensors sharded any way over any number of ranks: each rank reads the pieces it
    needs. Returns the folder read. Raises CheckpointError when there is no complete checkpoint.
    """
    source = Path(source)
    folder = latest_folder(source) if (source / LATEST).is_file() else source
    if folder is None or not (folder / METADATA).is_file():
        listing = sorted(p.name for p in source.iterdir()) if source.is_dir() else "no such folder"
        raise CheckpointError(f"{str(source)!r} holds no complete DCP checkpoint (no {LATEST!r} pointer and no "
                              f"{METADATA}); found: {listing}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    return folder


def checkpoint_files(folder: str | os.PathLike) -> dict[str, int]:
    """{file name: bytes} of a checkpoint folder, sorted by name (Lesson 11, §3)."""
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


def example_state(size_mb: float = 4.0, seed: int = 0, width: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    """A model-and-Adam-shaped state of about `size_mb` MB float32, the same for a seed on every rank (Lesson 11, §3).

    {'model': {'weight', 'bias'}, 'optim': {'exp_avg', 'exp_avg_sq'}}: weights plus Adam's two moments,
    so the optimiser holds twice what the model does, as in real training.
    """
    check_number(size_mb, "size_mb", low=0, low_open=True)
    rows = max(3, int(size_mb * 2**20 / 4 / 3 / width))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator)
    return {"model": {"weight": weight, "bias": torch.randn(rows, generator=generator)},
            "optim": {"exp_avg": torch.randn(rows, width, generator=generator),
                      "exp_avg_sq": torch.rand(rows, width, generator=generator)}}


def _map(state, fn):
    return {k: _map(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in state.items()}


def shard_state(state: Mapping[str, Any], mesh) -> dict[str, Any]:
    """Each tensor of `state` as a DTensor split by rows over `mesh`: this rank keeps its rows only (Lesson 11, §3)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return _map(state, lambda t: distribute_tensor(t, mesh, [Shard(0)]))


def zeros_like_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state of zeros with the same structure, shapes and shards as `state`: what `load_sharded` fills (Lesson 11, §3)."""
    return _map(state, torch.zeros_like)


def state_equal(a: Mapping[str, Any], b: Mapping[str, Any], atol: float = 0.0) -> bool:
    """Whether two (nested) states have the same keys and tensors equal within `atol` (Lesson 11, §3-§4)."""
    if set(a) != set(b):
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, Mapping) or isinstance(y, Mapping):
            if not (isinstance(x, Mapping) and isinstance(y, Mapping) and state_equal(x, y, atol)):
                return False
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x.double(), y.double(), rtol=0, atol=atol):
                return False
        elif x != y:
            return False
    return True


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a (nested) state; of this rank's shards for DTensors (Lesson 11, §3)."""
    total = 0
    for value in state.values():
        if isinstance(value, Mapping):
            total += state_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def to_torch_save(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """One torch.save file holding a whole DCP checkpoint, for a single process (Lesson 11, §3).

    Wraps torch.distributed.checkpoint.format_utils.dcp_to_torch_save; the whole state must fit in
    this process's memory. `folder` is a step folder or a ROOT with a `latest` pointer.
    """
    folder = Path(folder)
    if (folder / LATEST).is_file():
        folder = latest_folder(folder)
    if not (folder / METADATA).is_file():
        raise CheckpointError(f"{str(folder)!r} is not a complete DCP checkpoint (no {METADATA})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        dcp_to_torch_save(folder, path)
    return Path(path)


def from_torch_save(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A DCP checkpoint folder made from one torch.save file, so any number of ranks can load it (Lesson 11, §3).

    Wraps format_utils.torch_save_to_dcp (which reads the file with weights_only=False: give it only
    files you trust, such as those `to_torch_save` wrote).
    """
    if not Path(path).is_file():
        raise CheckpointError(f"no torch.save file at {str(path)!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_GROUP)
        torch_save_to_dcp(path, folder)
    return Path(folder)

