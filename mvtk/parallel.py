"""Data parallelism (Lesson 05): DataParallel and its `module.` prefix, and a DistributedDataParallel
training script that torchrun launches.

    torchrun --standalone --nproc_per_node=2 -m mvtk.parallel --epochs 10 --out runs/ddp

The course's models are one example: `launch` and `torchrun_command` run any training script
(`train.py`), module (`pkg.train`) or function (`pkg.train:main`, called as main(rank, world_size,
**kwargs) in a process group that `python -m mvtk.parallel run pkg.train:main` sets up):

    torchrun --standalone --nproc_per_node=2 -m mvtk.parallel run pkg.train:main --kwargs-json '{"epochs": 3}'

Every process trains a replica of the model on its own shard of each batch; gradients are averaged
across processes after every backward pass, so the replicas stay identical. Rank 0 alone saves
checkpoints, with `mvtk.checkpoint.save_checkpoint`; a restarted run (`torchrun --max-restarts=N`)
resumes from the newest complete one in OUT instead of starting over.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pkgutil
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mvtk.checkpoint import (check_state_dict_fits, latest_checkpoint, load_checkpoint, restore_rng_state,
                             rng_state, save_checkpoint)
from mvtk.data import make_loaders
from mvtk.env import pick_device, seed_everything
from mvtk.errors import (CheckpointError, DeviceUnavailableError, InvalidArgumentError, ParallelError,
                         check_positive_int)
from mvtk.models import MODELS, MODULE_PREFIX, build_model, sample_shape, strip_module_prefix, unwrap
from mvtk.train import DEFAULT_LR, History, evaluate, train_one_epoch

__all__ = [
    "BACKENDS", "MODULE_PREFIX", "CHECKPOINT_NAME", "TORCHRUN", "GROUP_TIMEOUT", "FAILURE_LINE",
    "unwrap", "strip_module_prefix", "load_state_dict_any", "wrap_data_parallel", "choose_backend",
    "check_launch", "init_distributed", "shard_loader", "all_reduce_mean", "train_ddp", "torchrun_command",
    "launch", "run_function", "returned_values", "RESULT_PREFIX", "RESULTS_ENV", "build_parser", "main",
    "SCHEDULES", "RESTART_ENV", "free_port", "compare_batch_norm",
]

BACKENDS = ("gloo", "nccl")      # gloo: CPU (and GPU); nccl: NVIDIA GPUs, one GPU per process
CHECKPOINT_NAME = "last.pt"      # rank 0 writes OUT/last.pt after every epoch
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")  # torchrun of this very Python (same venv)
GROUP_TIMEOUT = timedelta(minutes=5)  # how long a collective waits for a missing process
FAILURE_LINE = re.compile(r"^\w[\w.]*(Error|Exception): |: error: ")  # a worker's exception or argparse error
RESULT_PREFIX = "[mvtk.parallel] returned "  # `run` prints each rank's JSON return value after this
RESULTS_ENV = "MVTK_PARALLEL_RESULTS"  # a folder launch() gives `run`: each rank writes rank<r>.json there
SCHEDULES = ("constant", "cosine")  # the script's learning-rate schedules (cosine: CosineAnnealingLR over the epochs)
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun sets it in every worker: 0, then 1 after the first restart...
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # pkg.module:function
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")  # pkg.module


def load_state_dict_any(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state_dict saved from a plain or a wrapped model into a plain or a wrapped `model` (Lesson 05, §3).

    The weights go into the plain model inside any wrapper; keys that do not fit raise ArchitectureMismatchError.
    """
    target, state = unwrap(model), strip_module_prefix(state_dict)
    check_state_dict_fits(target, state)  # names missing, unexpected and reshaped keys before anything changes
    target.load_state_dict(state)
    return model


def wrap_data_parallel(model: nn.Module, device: torch.device | str | None = None) -> nn.DataParallel:
    """Move `model` to `device` first, then wrap it in nn.DataParallel over every visible GPU (Lesson 05, §2).

    With no GPU, DataParallel keeps no device ids and simply calls the model; with one GPU it runs the
    model there; with several it copies the model to each GPU and splits every batch between them.
    """
    device = pick_device() if device is None else torch.device(device)
    model = unwrap(model).to(device)  # parameters must sit on device_ids[0] before wrapping
    if device.type == "cuda":
        first = device.index if device.index is not None else torch.cuda.current_device()
        others = [index for index in range(torch.cuda.device_count()) if index != first]
        return nn.DataParallel(model, device_ids=[first, *others])
    if torch.cuda.is_available():
        raise ParallelError(f"nn.DataParallel cannot keep a model on {device.type!r} while GPUs are visible; "
                            "use device='cuda', or hide the GPUs with CUDA_VISIBLE_DEVICES=")
    return nn.DataParallel(model)


def choose_backend(device: torch.device | str) -> str:
    """The process-group backend for `device`: 'nccl' on CUDA GPUs, 'gloo' everywhere else (Lesson 05, §4)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_launch(backend: str, nproc: int, device: torch.device | str, gpus: int | None = None) -> None:
    """Raise ParallelError unless `nproc` processes per machine can train on `device` with `backend` (Lesson 05, §4).

    `gpus` defaults to the number of CUDA devices this machine has.
    """
    device = torch.device(device)
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if backend not in BACKENDS:
        raise ParallelError(f"unknown backend {backend!r}; expected one of {BACKENDS} "
                            "('gloo' for CPUs, 'nccl' for NVIDIA GPUs)")
    check_positive_int(nproc, "the number of processes (nproc)", ParallelError)
    if backend == "nccl" and device.type != "cuda":
        raise ParallelError(f"backend 'nccl' runs on CUDA GPUs only, but the device is {device.type!r}; "
                            "use --backend gloo on the CPU")
    if device.type == "cuda" and nproc > gpus:
        raise ParallelError(f"{nproc} processes were asked for but this machine has {gpus} GPU(s): DDP needs one "
                            f"GPU per process; use --nproc_per_node={max(gpus, 1)} or --device cpu")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ParallelError("backend 'nccl' is not built into this torch; use --backend gloo")


def init_distributed(backend: str, device: torch.device | str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE...); alone, a group of one (Lesson 05, §4).

    Under torchrun's agent store, the group's keys carry the attempt (TORCHELASTIC_RESTART_COUNT) as a
    prefix, so a restarted group never reads what a dead process of an earlier attempt left in the store.
    Returns (rank, world size, this process's device: cuda:LOCAL_RANK on GPUs).
    """
    device = torch.device(device)
    if dist.is_initialized():
        raise ParallelError("a process group already exists in this process; call dist.destroy_process_group() first")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    restart = os.environ.get(RESTART_ENV)
    if "RANK" in os.environ and restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent serves one store at MASTER_ADDR:MASTER_PORT for every attempt; without a prefix per
        # attempt, a restarted worker can read an address a dead worker of the last attempt left there
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=GROUP_TIMEOUT)
        dist.init_process_group(backend, store=dist.PrefixStore(f"mvtk/attempt_{restart}/", store),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=GROUP_TIMEOUT)
    elif "RANK" in os.environ:  # launched by torchrun or another launcher: rendezvous through env://
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    else:  # plain `python -m mvtk.parallel`: a group of one process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=GROUP_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def shard_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard of `dataset`; call `.sampler.set_epoch(e)` each epoch (Lesson 05, §4).

    `seed` must be the same on every rank so that the shards do not overlap. Without a process group,
    pass `num_replicas` and `rank`.
    """
    check_positive_int(batch_size, "batch_size")
    sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, pin_memory=pin_memory)


def all_reduce_mean(value: float, weight: float = 1.0, device: torch.device | str = "cpu") -> float:
    """The `weight`-weighted mean of `value` over every rank: each rank passes its own (Lesson 05, §4)."""
    totals = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)  # every rank receives the sums
    return (totals[0] / totals[1]).item()


def train_ddp(*, model_name: str = "mlp", epochs: int = 10, batch_size: int = 32, lr: float = DEFAULT_LR,
              seed: int = 0, out: str | os.PathLike = "runs/ddp", device: torch.device | str = "cpu",
              backend: str | None = None, schedule: str = "constant",
              fail_at_epoch: int | None = None) -> dict[str, float]:
    """Train a course model with DDP; rank 0 saves OUT/last.pt every epoch; a restart resumes (Lesson 05, §4-§5).

    Checks the set-up (`check_launch`), joins the process group torchrun describes (a group of one
    without torchrun), trains, and destroys the group again, also on failure. `batch_size` is the
    global batch, split evenly over the processes, so the recipe matches a single process with the
    same batch size. `schedule`: 'constant' or 'cosine' (CosineAnnealingLR over `epochs`).

    Resuming: every rank opens the newest complete checkpoint in `out` (the one rank 0 found, so all
    ranks agree), each with map_location set to its own device, and restores the weights, optimiser,
    scheduler, history, epoch (the DistributedSampler's too, via set_epoch) and its own RNG states:
    rank 0 gathers every rank's RNG states into each checkpoint, because dropout draws differently on
    every rank. A checkpoint of a different recipe (model, seed, batch size, lr, schedule) is refused.
    `fail_at_epoch` K is a test hook: the last rank exits (os._exit(1)) halfway through epoch K, on
    torchrun's first attempt only, so that `--max-restarts=1` restarts the group. Returns the final
    metrics, averaged over ranks with all_reduce.
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if fail_at_epoch is not None:
        check_positive_int(fail_at_epoch, "fail_at_epoch (or None)")
    if model_name not in MODELS:
        raise InvalidArgumentError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    backend = backend or choose_backend(device)
    check_launch(backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
    rank, world, device = init_distributed(backend, device)
    try:
        if batch_size % world:
            raise ParallelError(f"the global batch size {batch_size} must divide evenly over {world} processes")
        recipe = {"model": model_name, "seed": seed, "global_batch_size": batch_size, "lr": lr, "schedule": schedule}
        if schedule == "cosine":
            recipe["epochs"] = epochs  # the schedule's length: another --epochs is another schedule
        seed_everything(seed, threads=None)  # the same seed on every rank: the same initial weights
        model = build_model(model_name).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        seed_everything(seed + rank, threads=None)  # per-rank seed: dropout and augmentation differ by rank
        pin = device.type == "cuda"
        data = make_loaders(size=sample_shape(model)[-1])  # the course's splits and evaluation batch size
        train = shard_loader(data.train.dataset, batch_size // world, shuffle=True, seed=seed, pin_memory=pin)
        val, test = (shard_loader(loader.dataset, loader.batch_size, shuffle=False, pin_memory=pin)
                     for loader in (data.val, data.test))
        optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs) if schedule == "cosine" else None
        attempt = int(os.environ.get(RESTART_ENV, 0))
        _say(f"rank {rank}/{world}: {len(train.sampler)} training samples per epoch in batches of "
             f"{batch_size // world}, seed {seed + rank}, backend {backend}, restart count {attempt}")
        start, history, metrics = _resume(Path(out), model, optimizer, scheduler, rank, world, device, recipe, seed)
        if start >= epochs:
            if rank == 0:
                _say(f"{Path(out) / CHECKPOINT_NAME} already holds epoch {start} of {epochs}: nothing to train")
            return metrics
        throughput = []
        for epoch in range(start, epochs):
            train.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            lr_now = optimizer.param_groups[0]["lr"]
            batches = train
            if fail_at_epoch == epoch + 1 and rank == world - 1 and attempt == 0:
                batches = _dying(train, epoch + 1, rank)
            begin = time.perf_counter()
            local_loss = train_one_epoch(ddp, batches, optimizer, device=device)
            train_loss = all_reduce_mean(local_loss, len(train.sampler), device)
            throughput.append(len(train.sampler) * world / (time.perf_counter() - begin))
            val_loss, val_acc = _evaluate_shards(model, val, device)
            if scheduler is not None:
                scheduler.step()
            for name, value in (("train_loss", train_loss), ("val_loss", val_loss), ("val_acc", val_acc),
                                ("lr", lr_now)):
                getattr(history, name).append(value)
            metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                       "samples_per_s": statistics.median(throughput[1:] or throughput)}  # the first epoch warms up
            states = [None] * world if rank == 0 else None
            dist.gather_object(rng_state(), states, dst=0)  # every rank's RNG states, for an exact resume
            if epoch + 1 == epochs:  # after the RNG states: a longer run would not have drawn for this
                metrics["test_loss"], metrics["test_acc"] = _evaluate_shards(model, test, device)
            if rank == 0:  # one writer: every rank holds the same weights
                save_checkpoint(Path(out) / CHECKPOINT_NAME, model, optimizer, scheduler, epoch=epoch + 1,
                                history=history, metrics=metrics,
                                extra={"world_size": world, "backend": backend, **recipe, "rank_rng": states})
                _say(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                     f"val accuracy {val_acc:.4f}")
            _barrier(device)  # nobody runs ahead (or dies and restarts) while rank 0 writes
        if rank == 0:
            _say(f"test accuracy {metrics['test_acc']:.4f} with {world} processes; "
                 f"rank 0 saved {Path(out) / CHECKPOINT_NAME}")
        return metrics
    finally:
        dist.destroy_process_group()


def compare_batch_norm(rank: int, world_size: int, *, steps: int = 3, global_batch: int = 32,
                       seed: int = 0) -> dict[str, float | str]:
    """How far DDP with BatchNorm drifts from one process on the whole batch; run with launch() (Lesson 05, §4).

    A small net with BatchNorm1d trains `steps` SGD steps on random batches of `global_batch` samples,
    once in one process on whole batches (the reference, on every rank) and once per variant with DDP,
    each rank on its 1/world_size shard. Returns, per variant, the largest absolute difference from
    the reference over every weight and buffer: 'batchnorm' (each rank normalises with its own shard's
    statistics), 'allreduce_batchnorm' (the statistics summed over all ranks with a differentiable
    all_reduce: what SyncBatchNorm computes) and 'sync_batchnorm' (nn.SyncBatchNorm; where torch
    refuses it, as on CPU tensors, the error message instead of a number).
    """
    check_positive_int(steps, "steps")
    check_positive_int(global_batch, "global_batch")
    if global_batch % world_size:
        raise InvalidArgumentError(f"global_batch {global_batch} must divide evenly over {world_size} processes")
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    torch.manual_seed(seed)  # the same data and initial weights on every rank
    inputs, labels = torch.randn(steps, global_batch, 16), torch.randint(0, 4, (steps, global_batch))
    start = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    reference = _sgd_steps(copy.deepcopy(start).to(device), inputs, labels, device).state_dict()
    per_rank = global_batch // world_size
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    variants = {"batchnorm": lambda net: net, "allreduce_batchnorm": _with_all_reduce_batch_norm,
                "sync_batchnorm": nn.SyncBatchNorm.convert_sync_batchnorm}
    gaps: dict[str, float | str] = {}
    for name, convert in variants.items():
        try:
            replica = DistributedDataParallel(convert(copy.deepcopy(start)).to(device),
                                              device_ids=[device.index] if on_gpu else None)
        except ValueError as exc:  # DDP refuses SyncBatchNorm on CPU modules, on every rank alike
            gaps[name] = f"{type(exc).__name__}: {exc}"
            continue
        trained = _sgd_steps(replica, inputs[:, shard], labels[:, shard], device).module.state_dict()
        gaps[name] = max((trained[key].double() - reference[key].double()).abs().max().item() for key in reference)
    return gaps


def torchrun_command(target: str | os.PathLike | Sequence[str] = (), *script_args, nproc: int = 2, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "mvtk", program: Sequence[str] = TORCHRUN,
                     kwargs: Mapping[str, Any] | None = None, max_restarts: int = 0,
                     backend: str | None = None) -> list[str]:
    """The torchrun command that runs `target` in `nproc` processes on each of `nnodes` machines (Lesson 05, §4-§5).

    `target`: a script path ending in .py, a module ('pkg.train'), or a function 'pkg.train:main' (run by
    `python -m mvtk.parallel run`, which sets up the process group and calls main(rank, world_size,
    **kwargs)); `script_args` follow a script or module. A list instead of a target gives the arguments of
    the course's own script, `-m mvtk.parallel`. One machine: --standalone, or a rendezvous at
    `rdzv_endpoint` ('127.0.0.1:PORT'). Several: every machine runs the same command, meeting at
    `rdzv_endpoint`. `max_restarts` N > 0 adds --max-restarts=N: when a process dies, torchrun stops
    the others and starts the whole group again, up to N times (the course's script then resumes).
    `backend` ('gloo' or 'nccl') is a function target's process-group backend (default: nccl with a GPU
    per process, else gloo); a script or module sets up its own group, so it takes none.
    """
    check_positive_int(nproc, "nproc", ParallelError)
    check_positive_int(nnodes, "nnodes", ParallelError)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ParallelError(f"max_restarts must be a whole number >= 0, got {max_restarts!r}")
    command = list(program)
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")  # a private rendezvous on a free local port
    elif rdzv_endpoint is None or ":" not in rdzv_endpoint:
        raise ParallelError(f"a run over {nnodes} machines needs rdzv_endpoint='HOST:PORT' of a machine every node "
                            f"can reach, got {rdzv_endpoint!r}")
    else:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return command + [*restarts, f"--nproc_per_node={nproc}", *_program(target, script_args, kwargs, backend)]


def launch(target: str | os.PathLike | Sequence[str] = (), *script_args, nproc: int = 2,
           cwd: str | os.PathLike | None = None, threads: int | None = None, timeout: float = 600,
           kwargs: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, max_restarts: int = 0,
           rdzv_endpoint: str | None = None, backend: str | None = None) -> subprocess.CompletedProcess:
    """Run `target` under torchrun on this machine in a subprocess and return its output (Lesson 05, §4-§5).

    `target` as in `torchrun_command`: 'train.py' (a script; relative to `cwd`), 'pkg.train' (a module),
    'pkg.train:main' (a function main(rank, world_size, **kwargs), its JSON-able return values read back
    with `returned_values`), or a list of arguments for the course's script. `cwd` is on the workers'
    import path. Each process gets `threads` CPU threads (default: the cores shared out); `env` adds
    environment variables. `max_restarts`, `rdzv_endpoint` (default: --standalone) and `backend` (a
    function target's) as in `torchrun_command`. A failed run raises ParallelError with the workers'
    errors; so does a run still going after `timeout` seconds, once torchrun and every worker (its own
    session) have been killed.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if isinstance(target, (str, os.PathLike)) and _is_script(target) and not (base / target).is_file():
        raise InvalidArgumentError(f"no training script at {str(base / target)!r}: launch runs a .py file, a module "
                                   "'pkg.mod' or a function 'pkg.mod:fn'")
    variables = dict(os.environ)
    variables["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    variables["PYTHONPATH"] = os.pathsep.join([str(base.resolve())] + ([variables["PYTHONPATH"]]
                                                                      if variables.get("PYTHONPATH") else []))
    variables.update(env or {})
    command = torchrun_command(target, *script_args, nproc=nproc, kwargs=kwargs, max_restarts=max_restarts,
                               rdzv_endpoint=rdzv_endpoint, backend=backend)
    with tempfile.TemporaryDirectory(prefix="mvtk-parallel-") as results:
        variables[RESULTS_ENV] = results
        result = _run_in_own_session(command, cwd, variables, timeout)
        result.returned = {}  # rank -> what a function target returned (returned_values)
        for path in Path(results).glob("rank*.json"):
            record = json.loads(path.read_text())
            result.returned[record["rank"]] = record["value"]
    if result.returncode != 0:
        output = result.stdout + result.stderr
        causes = list(dict.fromkeys(line.strip() for line in output.splitlines() if FAILURE_LINE.search(line)))
        raise ParallelError(f"torchrun exited with code {result.returncode}: {' | '.join(causes) or 'see below'}\n"
                            f"its last output:\n{output[-3000:]}")
    return result


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now, for a rendezvous endpoint (Lesson 05, §5).

    The operating system picks it; another program could still take it before torchrun does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run_function(target: str, kwargs: Mapping[str, Any] | None = None, *, backend: str | None = None) -> Any:
    """Join torchrun's process group, call `module:function`(rank, world_size, **kwargs), leave the group (Lesson 05, §4).

    What `python -m mvtk.parallel run pkg.mod:fn --kwargs-json '{...}'` does in every process. The
    backend defaults to nccl when this machine has a GPU for each local process, else gloo; on nccl
    each process's GPU is cuda:LOCAL_RANK. The return value is printed after RESULT_PREFIX as JSON
    (`returned_values` reads it back) and returned.
    """
    function = _import_function(target)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"
    device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
    check_launch(backend, local, device)
    rank, world, _ = init_distributed(backend, device)
    try:
        value = function(rank, world, **dict(kwargs or {}))
        try:
            text = json.dumps({"rank": rank, "value": value})
        except TypeError:
            text = json.dumps({"rank": rank, "value": repr(value)})
        sys.stdout.write(RESULT_PREFIX + text + "\n")  # one write: lines of the ranks do not interleave
        sys.stdout.flush()
        if os.environ.get(RESULTS_ENV):
            (Path(os.environ[RESULTS_ENV]) / f"rank{rank}.json").write_text(text)
        return value
    finally:
        dist.destroy_process_group()


def returned_values(result: subprocess.CompletedProcess | str) -> dict[int, Any]:
    """{rank: return value} of a function run with `launch('pkg.mod:fn')`, or read from its output (Lesson 05, §4)."""
    if isinstance(getattr(result, "returned", None), dict):
        return dict(sorted(result.returned.items()))
    text = result if isinstance(result, str) else result.stdout
    values = {}
    for line in text.splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                record = json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                continue  # a line another rank's output broke into; launch() reads the result files instead
            values[record["rank"]] = record["value"]
    return dict(sorted(values.items()))


def build_parser() -> argparse.ArgumentParser:
    """The command line of the DDP training script (Lesson 05, §4)."""
    parser = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc_per_node=N -m mvtk.parallel",
        description="Train a course model with DistributedDataParallel, one process per CPU share or GPU. "
                    "Each process trains on its shard of every batch; gradients are averaged; rank 0 saves "
                    f"OUT/{CHECKPOINT_NAME} after every epoch (mvtk.checkpoint). A run that finds a checkpoint "
                    "of the same recipe in OUT resumes from it, so torchrun --max-restarts=N continues a run "
                    "instead of starting over. Lesson 05.",
        epilog="Several machines: run on every machine  torchrun --nnodes=2 --nproc_per_node=4 "
               "--rdzv-backend=c10d --rdzv-endpoint=HOST:29400 --rdzv-id=job1 -m mvtk.parallel ...  "
               "Your own function instead of the course's models: torchrun ... -m mvtk.parallel run "
               "pkg.mod:fn --kwargs-json '{\"epochs\": 3}' calls fn(rank, world_size, epochs=3).")
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS), help="course model (default: mlp)")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set (default: 10)")
    parser.add_argument("--batch-size", type=_positive_int, default=32,
                        help="GLOBAL batch size, split evenly over the processes (default: 32)")
    parser.add_argument("--lr", type=_positive_float, default=DEFAULT_LR,
                        help=f"Adam learning rate (default: {DEFAULT_LR})")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="initial weights and shuffle (default: 0); rank r also uses seed+r")
    parser.add_argument("--out", default="runs/ddp", help="folder for rank 0's checkpoint (default: runs/ddp)")
    parser.add_argument("--device", default=None,
                        help="'cpu' or 'cuda' (default: $MVTK_DEVICE, else CUDA when present, else CPU)")
    parser.add_argument("--backend", default=None,
                        help="process-group backend: 'gloo' or 'nccl' (default: nccl on CUDA, gloo otherwise)")
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES,
                        help="learning-rate schedule: constant, or cosine over --epochs (default: constant)")
    parser.add_argument("--fail-at-epoch", type=_positive_int, default=None, metavar="K",
                        help="TEST HOOK: the last rank exits halfway through epoch K on torchrun's first attempt "
                             f"only (${RESTART_ENV} 0), to show --max-restarts resuming (default: off)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `torchrun ... -m mvtk.parallel`: train, or explain a wrong set-up (Lesson 05, §4).

    `train_ddp` checks the set-up (`check_launch`) before it joins a process group; its errors, like a
    device this machine lacks, become a usage message and exit code 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        return _run_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
        train_ddp(model_name=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, out=args.out, device=device, backend=args.backend, schedule=args.schedule,
                  fail_at_epoch=args.fail_at_epoch)
    except (ParallelError, DeviceUnavailableError, InvalidArgumentError, CheckpointError) as exc:
        parser.error(str(exc))  # prints usage and the message, exits with code 2
    return 0


def _run_main(argv: Sequence[str]) -> int:
    """`python -m mvtk.parallel run pkg.mod:fn [--kwargs-json JSON] [--backend B]`: run_function in this process."""
    parser = argparse.ArgumentParser(
        prog="torchrun --standalone --nproc_per_node=N -m mvtk.parallel run",
        description="Call your function fn(rank, world_size, **kwargs) in every process, inside a process group. "
                    "Lesson 05.")
    parser.add_argument("target", help="the function as pkg.module:function (importable from the working folder)")
    parser.add_argument("--kwargs-json", default="{}", help="keyword arguments as a JSON object (default: {})")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="process-group backend (default: nccl with a GPU per process, else gloo)")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs_json)
    except json.JSONDecodeError as exc:
        parser.error(f"--kwargs-json is not valid JSON: {exc}")
    if not isinstance(kwargs, dict):
        parser.error(f"--kwargs-json must be a JSON object of keyword arguments, got {args.kwargs_json}")
    try:
        run_function(args.target, kwargs, backend=args.backend)
    except (ParallelError, InvalidArgumentError) as exc:
        parser.error(str(exc))
    return 0


def _run_in_own_session(command: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` as the leader of a new session; on timeout kill its whole process group (workers too)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and the workers it started: one process group
        except ProcessLookupError:
            pass
        stdout, stderr = process.communicate()
        raise ParallelError(f"torchrun was still running after {timeout:g} s; it and its workers were killed.\n"
                            f"its last output:\n{(stdout + stderr)[-3000:]}") from None
    except BaseException:  # interrupted (Ctrl-C in the notebook): leave no worker behind
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _is_script(target) -> bool:
    return isinstance(target, os.PathLike) or str(target).endswith(".py")


def _program(target, script_args: Sequence, kwargs: Mapping[str, Any] | None,
             backend: str | None = None) -> list[str]:
    """What follows torchrun's own flags: the script, module or function to run, with its arguments."""
    if backend is not None and backend not in BACKENDS:
        raise ParallelError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None "
                            "('gloo' for CPUs, 'nccl' for NVIDIA GPUs)")
    if backend is not None and not (isinstance(target, str) and _FUNCTION.match(target)):
        raise InvalidArgumentError(f"backend= sets the process group of a function target 'pkg.mod:fn'; {target!r} "
                                   "sets up its own: give it the backend in its own arguments")
    if not isinstance(target, (str, os.PathLike)):  # a list of arguments for the course's script
        if script_args or kwargs:
            raise InvalidArgumentError("pass the course script's arguments as one list, e.g. ['--epochs', 3], or "
                                       "name a target ('train.py', 'pkg.mod' or 'pkg.mod:fn') first")
        return ["-m", "mvtk.parallel", *map(str, target)]
    if _is_script(target):
        program = [os.fspath(target)]
    elif _FUNCTION.match(str(target)):
        if script_args:
            raise InvalidArgumentError(f"a function target {target!r} takes keyword arguments (kwargs={{...}}), "
                                       f"not command-line arguments {list(script_args)!r}")
        return ["-m", "mvtk.parallel", "run", str(target), "--kwargs-json", _kwargs_json(kwargs),
                *(["--backend", backend] if backend else [])]
    elif _MODULE.match(str(target)):
        program = ["-m", str(target)]
    else:
        raise InvalidArgumentError(f"target must be a script 'train.py', a module 'pkg.train' or a function "
                                   f"'pkg.train:main', got {target!r}")
    if kwargs:
        raise InvalidArgumentError(f"kwargs go to a function target 'pkg.mod:fn'; pass {target!r} its command-line "
                                   "arguments after the target instead")
    return program + [str(a) for a in script_args]


def _kwargs_json(kwargs: Mapping[str, Any] | None) -> str:
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidArgumentError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
    try:
        return json.dumps(dict(kwargs or {}))
    except TypeError as exc:
        raise InvalidArgumentError(f"kwargs must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from None


def _import_function(target: str):
    """The function `pkg.mod:fn` names, resolved by the standard library's pkgutil.resolve_name."""
    if not isinstance(target, str) or not _FUNCTION.match(target):
        raise InvalidArgumentError(f"target must name a function as 'pkg.module:function', got {target!r}")
    try:
        function = pkgutil.resolve_name(target)
    except ImportError as exc:
        raise InvalidArgumentError(f"cannot import {target!r}: {exc}; run from the folder that holds it, or put it "
                                   "on PYTHONPATH") from exc
    except AttributeError:
        function = None
    if not callable(function):
        raise InvalidArgumentError(f"{target.partition(':')[0]!r} has no function {target.partition(':')[2]!r}; "
                                   "expected fn(rank, world_size, **kwargs)")
    return function


def _evaluate_shards(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Loss and accuracy over every rank's shard, combined with all_reduce (equal shards; see DistributedSampler)."""
    result = evaluate(model, loader, device=device)
    weight = len(loader.sampler)
    return all_reduce_mean(result.loss, weight, device), all_reduce_mean(result.accuracy, weight, device)


def _resume(out: Path, model, optimizer, scheduler, rank: int, world: int, device: torch.device, recipe: dict,
            seed: int) -> tuple[int, History, dict]:
    """(epoch to start from, history, metrics) after loading the newest complete checkpoint in `out`, if any.

    Rank 0 picks the file and broadcasts its path, so every rank loads the same epoch; each rank
    loads it onto its own device. A barrier afterwards keeps rank 0 from overwriting it while a
    slower rank still reads it.
    """
    found = [None]
    if rank == 0 and out.is_dir():
        path = latest_checkpoint(out)
        found = [None if path is None else str(path)]
    dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return 0, History(), {}
    saved = load_checkpoint(found[0], map_location=device)["extra"]  # the metadata alone: nothing restored yet
    changed = [f"{key} {saved.get(key)!r}, now {value!r}" for key, value in recipe.items() if saved.get(key) != value]
    if changed:
        raise ParallelError(f"{found[0]!r} is the checkpoint of another run ({'; '.join(changed)}): use another "
                            "--out folder, or remove that one to start over")
    meta = load_checkpoint(found[0], model, optimizer, scheduler, restore_rng=False, map_location=device)
    states = meta["extra"].get("rank_rng")
    if states is not None and len(states) == world:
        restore_rng_state(_to_cpu(states[rank]))  # this rank's own RNG states: its dropout goes on as before
        how = "its own RNG states"
    else:  # another world size: the shards differ anyway; a fresh, reproducible seed per rank and epoch
        seed_everything(seed + rank + 1000 * meta["epoch"], threads=None)
        how = f"a new seed (the checkpoint is of {meta['extra'].get('world_size')} processes)"
    _say(f"rank {rank}/{world}: resumes after epoch {meta['epoch']} from {Path(found[0]).name} "
         f"(weights, optimizer, scheduler, {how})")
    _barrier(device)  # every rank has read the file before rank 0 writes the next epoch over it
    return meta["epoch"], History.from_dict(meta["history"]), dict(meta["metrics"])


def _to_cpu(value):
    """`value` with every tensor in it moved to the CPU (RNG states loaded onto a rank's GPU)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _dying(loader: DataLoader, epoch: int, rank: int):
    """The batches of `loader`, until halfway through: then this process exits at once (the --fail-at-epoch hook)."""
    for index, batch in enumerate(loader):
        if index == len(loader) // 2:
            _say(f"rank {rank}: --fail-at-epoch {epoch}: exiting halfway through epoch {epoch} (test hook)")
            os._exit(1)  # like a crash: no clean-up, no exception the script could catch
        yield batch


def _sgd_steps(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> nn.Module:
    """One SGD step (lr 0.1, mean cross-entropy) per batch in `inputs`; the model trained, in train mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for batch, targets in zip(inputs, labels):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch.to(device)), targets.to(device)).backward()
        optimizer.step()
    return model


class _AllReduceBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises with the statistics of every rank's samples, like SyncBatchNorm, also on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        total = dist_nn.all_reduce(torch.cat([x.sum(0), count]))  # differentiable: gradients flow to every rank
        n = total[-1]
        mean = total[:-1] / n
        var = dist_nn.all_reduce(((x - mean) ** 2).sum(0)) / n  # biased, for normalising, as BatchNorm does
        with torch.no_grad():  # running statistics as BatchNorm keeps them: unbiased variance, momentum
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _with_all_reduce_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm1d replaced in place by an _AllReduceBatchNorm1d holding the same state."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = _AllReduceBatchNorm1d(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            _with_all_reduce_batch_norm(child)
    return model


def _say(text: str) -> None:
    """Print one line in a single write, so that the lines of several ranks sharing a pipe do not interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _barrier(device: torch.device) -> None:
    if device.type == "cuda":  # NCCL wants to know this process's GPU
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _number(text: str, kind: type, valid, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive whole number")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number >= 0")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


if __name__ == "__main__":
    sys.exit(main())
