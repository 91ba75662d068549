"""Data parallelism (Lesson 05): DataParallel and its `module.` prefix, and a DistributedDataParallel
training script that torchrun launches.

    torchrun --standalone --nproc_per_node=2 -m mvtk.parallel --epochs 10 --out runs/ddp

The course's models are one example: `launch` and `torchrun_command` run any training script
(`train.py`), module (`pkg.train`) or function (`pkg.train:main`, called as main(rank, world_size,
**kwargs) in a process group that `python -m mvtk.parallel run pkg.train:main` sets up):

    torchrun --standalone --nproc_per_node=2 -m mvtk.parallel run pkg.train:main --kwargs-json '{"epochs": 3}'

Every process trains a replica of the model on its own shard of each batch; gradients are averaged
across processes after every backward pass, so the replicas stay identical. Rank 0 alone saves
checkpoints, with `mvtk.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import os
import pkgutil
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mvtk.checkpoint import check_state_dict_fits, save_checkpoint
from mvtk.data import make_loaders
from mvtk.env import pick_device, seed_everything
from mvtk.errors import DeviceUnavailableError, InvalidArgumentError, ParallelError, check_positive_int
from mvtk.models import MODELS, build_model, sample_shape, unwrap
from mvtk.train import DEFAULT_LR, History, evaluate, train_one_epoch

__all__ = [
    "BACKENDS", "MODULE_PREFIX", "CHECKPOINT_NAME", "TORCHRUN", "GROUP_TIMEOUT", "FAILURE_LINE",
    "unwrap", "strip_module_prefix", "load_state_dict_any", "wrap_data_parallel", "choose_backend",
    "check_launch", "init_distributed", "shard_loader", "all_reduce_mean", "train_ddp", "torchrun_command",
    "launch", "run_function", "returned_values", "RESULT_PREFIX", "RESULTS_ENV", "build_parser", "main",
]

BACKENDS = ("gloo", "nccl")      # gloo: CPU (and GPU); nccl: NVIDIA GPUs, one GPU per process
MODULE_PREFIX = "module."        # what DataParallel and DDP put in front of every state_dict key
CHECKPOINT_NAME = "last.pt"      # rank 0 writes OUT/last.pt after every epoch
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")  # torchrun of this very Python (same venv)
GROUP_TIMEOUT = timedelta(minutes=5)  # how long a collective waits for a missing process
FAILURE_LINE = re.compile(r"^\w[\w.]*(Error|Exception): |: error: ")  # a worker's exception or argparse error
RESULT_PREFIX = "[mvtk.parallel] returned "  # `run` prints each rank's JSON return value after this
RESULTS_ENV = "MVTK_PARALLEL_RESULTS"  # a folder launch() gives `run`: each rank writes rank<r>.json there
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # pkg.module:function
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")  # pkg.module


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A copy of `state_dict` without the `module.` prefix wrappers add; the input is unchanged (Lesson 05, §3)."""
    if not isinstance(state_dict, Mapping):
        raise InvalidArgumentError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    stripped = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # per-module versions load_state_dict reads
        stripped._metadata = OrderedDict(state_dict._metadata)
    consume_prefix_in_state_dict_if_present(stripped, MODULE_PREFIX)  # PyTorch's own fix, applied to the copy
    return stripped


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

    Returns (rank, world size, this process's device: cuda:LOCAL_RANK on GPUs).
    """
    device = torch.device(device)
    if dist.is_initialized():
        raise ParallelError("a process group already exists in this process; call dist.destroy_process_group() first")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # launched by torchrun: rendezvous through env://
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
              backend: str | None = None) -> dict[str, float]:
    """Train a course model with DDP; rank 0 saves OUT/last.pt every epoch (Lesson 05, §4).

    Checks the set-up (`check_launch`), joins the process group torchrun describes (a group of one
    without torchrun), trains, and destroys the group again, also on failure. `batch_size` is the
    global batch, split evenly over the processes, so the recipe matches a single process with the
    same batch size. Returns the final metrics, averaged over ranks with all_reduce.
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if model_name not in MODELS:
        raise InvalidArgumentError(f"unknown model {model_name!r}; expected one of {sorted(MODELS)}")
    backend = backend or choose_backend(device)
    check_launch(backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
    rank, world, device = init_distributed(backend, device)
    try:
        if batch_size % world:
            raise ParallelError(f"the global batch size {batch_size} must divide evenly over {world} processes")
        seed_everything(seed, threads=None)  # the same seed on every rank: the same initial weights
        model = build_model(model_name).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        seed_everything(seed + rank, threads=None)  # per-rank seed: dropout and augmentation differ by rank
        pin = device.type == "cuda"
        data = make_loaders(size=sample_shape(model)[-1])  # the course's splits and evaluation batch size
        train = shard_loader(data.train.dataset, batch_size // world, shuffle=True, seed=seed, pin_memory=pin)
        val, test = (shard_loader(loader.dataset, loader.batch_size, shuffle=False, pin_memory=pin)
                     for loader in (data.val, data.test))
        print(f"rank {rank}/{world}: {len(train.sampler)} training samples per epoch in batches of "
              f"{batch_size // world}, seed {seed + rank}, backend {backend}", flush=True)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
        history, throughput = History(), []
        for epoch in range(epochs):
            train.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            start = time.perf_counter()
            local_loss = train_one_epoch(ddp, train, optimizer, device=device)
            train_loss = all_reduce_mean(local_loss, len(train.sampler), device)
            throughput.append(len(train.sampler) * world / (time.perf_counter() - start))
            val_loss, val_acc = _evaluate_shards(model, val, device)
            for name, value in (("train_loss", train_loss), ("val_loss", val_loss), ("val_acc", val_acc), ("lr", lr)):
                getattr(history, name).append(value)
            metrics = {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                       "samples_per_s": statistics.median(throughput[1:] or throughput)}  # epoch 1 warms up
            if epoch + 1 == epochs:
                metrics["test_loss"], metrics["test_acc"] = _evaluate_shards(model, test, device)
            if rank == 0:  # one writer: every rank holds the same weights
                save_checkpoint(Path(out) / CHECKPOINT_NAME, model, optimizer, epoch=epoch + 1, history=history,
                                metrics=metrics, extra={"world_size": world, "backend": backend, "model": model_name,
                                                        "global_batch_size": batch_size, "seed": seed})
                print(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                      f"val accuracy {val_acc:.4f}", flush=True)
            _barrier(device)  # nobody runs ahead while rank 0 writes
        if rank == 0:
            print(f"test accuracy {metrics['test_acc']:.4f} with {world} processes; "
                  f"rank 0 saved {Path(out) / CHECKPOINT_NAME}", flush=True)
        return metrics
    finally:
        dist.destroy_process_group()


def torchrun_command(target: str | os.PathLike | Sequence[str] = (), *script_args, nproc: int = 2, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "mvtk", program: Sequence[str] = TORCHRUN,
                     kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The torchrun command that runs `target` in `nproc` processes on each of `nnodes` machines (Lesson 05, §4-§5).

    `target`: a script path ending in .py, a module ('pkg.train'), or a function 'pkg.train:main' (run by
    `python -m mvtk.parallel run`, which sets up the process group and calls main(rank, world_size,
    **kwargs)); `script_args` follow a script or module. A list instead of a target gives the arguments of
    the course's own script, `-m mvtk.parallel`. One machine: --standalone. Several: every machine runs
    the same command, meeting at `rdzv_endpoint`.
    """
    check_positive_int(nproc, "nproc", ParallelError)
    check_positive_int(nnodes, "nnodes", ParallelError)
    command = list(program)
    if nnodes == 1 and rdzv_endpoint is None:
        command.append("--standalone")  # a private rendezvous on a free local port
    elif rdzv_endpoint is None or ":" not in rdzv_endpoint:
        raise ParallelError(f"a run over {nnodes} machines needs rdzv_endpoint='HOST:PORT' of a machine every node "
                            f"can reach, got {rdzv_endpoint!r}")
    else:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
    return command + [f"--nproc_per_node={nproc}", *_program(target, script_args, kwargs)]


def launch(target: str | os.PathLike | Sequence[str] = (), *script_args, nproc: int = 2,
           cwd: str | os.PathLike | None = None, threads: int | None = None, timeout: float = 600,
           kwargs: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `target` under `torchrun --standalone` in a subprocess and return its output (Lesson 05, §4).

    `target` as in `torchrun_command`: 'train.py' (a script; relative to `cwd`), 'pkg.train' (a module),
    'pkg.train:main' (a function main(rank, world_size, **kwargs), its JSON-able return values read back
    with `returned_values`), or a list of arguments for the course's script. `cwd` is on the workers'
    import path. Each process gets `threads` CPU threads (default: the cores shared out); `env` adds
    environment variables. A failed run raises ParallelError with the workers' errors.
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
    command = torchrun_command(target, *script_args, nproc=nproc, kwargs=kwargs)
    with tempfile.TemporaryDirectory(prefix="mvtk-parallel-") as results:
        variables[RESULTS_ENV] = results
        result = subprocess.run(command, cwd=cwd, env=variables, capture_output=True, text=True, timeout=timeout)
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
                    f"OUT/{CHECKPOINT_NAME} after every epoch (mvtk.checkpoint). Lesson 05.",
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
                  seed=args.seed, out=args.out, device=device, backend=args.backend)
    except (ParallelError, DeviceUnavailableError, InvalidArgumentError) as exc:
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


def _is_script(target) -> bool:
    return isinstance(target, os.PathLike) or str(target).endswith(".py")


def _program(target, script_args: Sequence, kwargs: Mapping[str, Any] | None) -> list[str]:
    """What follows torchrun's own flags: the script, module or function to run, with its arguments."""
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
        return ["-m", "mvtk.parallel", "run", str(target), "--kwargs-json", _kwargs_json(kwargs)]
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
