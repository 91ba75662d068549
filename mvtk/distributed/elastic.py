"""A tiny training run that gives the same weights on 1 process or N, and resumes after a crash (Lesson 11, §1-§2).

The recipe fixes what must not depend on the number of processes: the global batch (split evenly
over the ranks), the data order (one shuffled permutation per epoch, `DistributedSampler` with a
shared seed and `set_epoch`), a mean-reduced loss, and no layer that looks across a batch
(BatchNorm) or draws random numbers per rank (dropout). Then DDP's gradient average over the
ranks' half-batches equals the whole batch's gradient, and the weights agree within rounding.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mvtk.distributed.sharded import latest_folder, load_sharded, save_sharded
from mvtk.errors import InvalidArgumentError, ParallelError, check_positive_int

__all__ = ["FEATURES", "CLASSES", "RESTART_ENV", "LOG_NAME", "FINAL_NAME", "tiny_dataset", "tiny_model", "training_parts",
           "train_steps", "read_log"]

FEATURES, CLASSES = 16, 4
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun sets it in every worker: 0, then 1 after a restart...
LOG_NAME = "log.jsonl"     # rank 0 appends one JSON line per step: step, epoch, lr, loss, batch ids, start
FINAL_NAME = "final.pt"    # rank 0 saves the trained weights there (a plain state_dict)


def tiny_dataset(samples: int = 256, seed: int = 0) -> TensorDataset:
    """(features, label, sample id) triples: random points labelled by a random linear teacher (Lesson 11, §1)."""
    check_positive_int(samples, "samples")
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(samples, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    return TensorDataset(features, (features @ teacher).argmax(1), torch.arange(samples))


def tiny_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    """A two-layer MLP with seeded weights: the same on every rank (Lesson 11, §1)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def training_parts(model: nn.Module, *, lr: float, steps: int, seed: int, samples: int, global_batch: int,
                   world: int, rank: int):
    """(SGD with momentum, cosine schedule, this rank's DistributedSampler, its loader) for the tiny run (Lesson 11, §2)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    data = tiny_dataset(samples, seed)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return optimizer, schedule, sampler, DataLoader(data, batch_size=global_batch // world, sampler=sampler)


def train_steps(*, steps: int = 12, global_batch: int = 32, lr: float = 0.2, seed: int = 0, samples: int = 128,
                out: str | os.PathLike | None = None, save_every: int = 0, fail_at_step: int | None = None) -> nn.Module:
    """Train `tiny_model` for `steps` SGD steps on 1 process or on every rank of a group (Lesson 11, §1-§2).

    In a process group the model is wrapped in DDP and each rank takes global_batch / world_size
    samples of every batch. The learning rate follows a cosine schedule over `steps`. With `out`,
    rank 0 appends a line per step to OUT/log.jsonl and saves OUT/final.pt. With `save_every` K,
    every rank saves model, optimiser, schedule and step to OUT/ckpt every K steps (`save_sharded`),
    and a run that finds OUT/ckpt/latest resumes from it: same weights, momentum, learning rate, and
    the same batches, because the sampler is set to the saved epoch and the done batches are
    skipped. `fail_at_step` K (TEST HOOK) makes this process exit during step K on torchrun's first
    attempt only ($TORCHELASTIC_RESTART_COUNT 0). Returns the trained model (unwrapped).
    """
    check_positive_int(steps, "steps")
    check_positive_int(global_batch, "global_batch")
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if global_batch % world or samples % global_batch:
        raise ParallelError(f"global_batch {global_batch} must divide over {world} ranks and the {samples} samples "
                            "into equal batches: unequal shards would weigh samples differently")
    if save_every and out is None:
        raise InvalidArgumentError("save_every needs an out folder for the checkpoints")
    attempt = int(os.environ.get(RESTART_ENV, 0))
    if out is not None and rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed)
    net = DistributedDataParallel(model) if distributed else model
    optimizer, schedule, sampler, loader = training_parts(net, lr=lr, steps=steps, seed=seed, samples=samples,
                                                          global_batch=global_batch, world=world, rank=rank)
    per_epoch = samples // global_batch
    checkpoints = Path(out) / "ckpt" if save_every else None
    start = 0
    if checkpoints is not None and latest_folder(checkpoints) is not None:
        start = _resume(net, optimizer, schedule, checkpoints)
        if rank == 0:
            print(f"rank 0: resumed from {latest_folder(checkpoints).name} at step {start} "
                  f"({RESTART_ENV}={attempt} on its node)", flush=True)
    batches = None
    for step in range(start, steps):
        epoch, index = divmod(step, per_epoch)
        if batches is None or index == 0:
            sampler.set_epoch(epoch)  # this epoch's permutation, the same on every rank and every attempt
            batches = itertools.islice(iter(loader), index, None)  # skip the batches done before a restart
        features, labels, ids = next(batches)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(features), labels)  # the mean over this rank's share
        if fail_at_step == step + 1 and attempt == 0:
            print(f"rank {rank}: --fail-at-step {step + 1}: exiting during step {step + 1} (test hook)", flush=True)
            os._exit(1)  # like a crash: no clean-up, no exception to catch
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        schedule.step()
        record = {"step": step + 1, "epoch": epoch, "lr": lr_now, "loss": _mean(loss.detach(), distributed),
                  "ids": _gather(ids, distributed, world), "started_at": start, "attempt": attempt, "world": world}
        if out is not None and rank == 0:
            with open(Path(out) / LOG_NAME, "a") as log:
                log.write(json.dumps(record) + "\n")
        if save_every and (step + 1) % save_every == 0:
            model_state, optim_state = get_state_dict(net, optimizer)
            save_sharded({"model": model_state, "optim": optim_state, "schedule": schedule.state_dict(),
                          "step": torch.tensor(step + 1)}, checkpoints, step + 1)
    if out is not None and rank == 0:
        torch.save(model.state_dict(), Path(out) / FINAL_NAME)
    return model


def _resume(net, optimizer, schedule, checkpoints: Path) -> int:
    """Load model, optimiser, schedule and step from the checkpoint `latest` names; the step to go on from."""
    model_state, optim_state = get_state_dict(net, optimizer)
    state = {"model": model_state, "optim": optim_state, "schedule": schedule.state_dict(), "step": torch.tensor(0)}
    load_sharded(state, checkpoints)
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def _mean(value: torch.Tensor, distributed: bool) -> float:
    if distributed:
        value = value.clone()
        dist.all_reduce(value)  # a sum (gloo has no average); equal shares make sum / world the batch mean
        value /= dist.get_world_size()
    return value.item()


def _gather(ids: torch.Tensor, distributed: bool, world: int) -> list[int]:
    """The sample ids of the whole global batch, sorted: the same list on 1 process or N."""
    if distributed:
        parts = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(parts, ids)
        ids = torch.cat(parts)
    return sorted(ids.tolist())


def read_log(out: str | os.PathLike) -> list[dict]:
    """The per-step records rank 0 wrote to OUT/log.jsonl, in the order written, restarts included (Lesson 11, §2)."""
    path = Path(out) / LOG_NAME
    if not path.is_file():
        raise InvalidArgumentError(f"no training log at {str(path)!r}: run train_steps with out=... first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
