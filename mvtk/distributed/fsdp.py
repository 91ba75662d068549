"""Sharded training with FSDP2 (`fully_shard`): each rank keeps 1/N of every parameter (Lesson 11, §4).

DDP keeps a whole copy of the model, its gradients and the optimiser state on every rank. FSDP2 turns
each parameter into a DTensor split by rows over a device mesh: a rank stores its rows only,
gathers a layer's full weights just before using it, and reduce-scatters the gradients so that each
rank updates only its rows. Checkpoints go through DCP: every rank writes its own rows.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mvtk.distributed.elastic import tiny_model, training_parts
from mvtk.distributed.sharded import save_sharded
from mvtk.errors import ParallelError, check_positive_int

__all__ = ["FULL_NAME", "CHECKPOINT_DIR", "local_numel", "shard_model", "train_fsdp"]

FULL_NAME = "fsdp_full.pt"  # rank 0 saves the gathered, unsharded weights there, to compare with
CHECKPOINT_DIR = "fsdp_ckpt"  # the DCP checkpoint of the sharded model and optimiser


def local_numel(tensors) -> tuple[int, int]:
    """(elements this rank stores, elements of the full tensors) over `tensors`: DTensors or plain (Lesson 11, §4)."""
    local = full = 0
    for tensor in tensors:
        full += tensor.numel()
        local += (tensor.to_local() if hasattr(tensor, "to_local") else tensor).numel()
    return local, full


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """fully_shard every Linear layer, then the whole model, over `mesh`; in place (Lesson 11, §4).

    A layer of its own is the unit FSDP2 gathers and frees again; the root call covers what is left.
    """
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_fsdp(*, steps: int = 6, global_batch: int = 32, lr: float = 0.2, seed: int = 0, samples: int = 128,
               out: str | os.PathLike) -> dict:
    """Train `tiny_model` sharded with FSDP2 over every rank; save it with DCP; report the memory (Lesson 11, §4).

    Run it on every rank of a CPU process group (gloo). The recipe is `train_steps`'s (SGD with
    momentum, cosine schedule, the same batches), so one process with `train_steps` must reach the
    same weights. Every rank saves its shards of model and optimiser to OUT/fsdp_ckpt (step folder
    plus `latest`); rank 0 also saves the gathered full weights to OUT/fsdp_full.pt. Returns this
    rank's element counts: parameters and optimiser state, local and full.
    """
    check_positive_int(steps, "steps")
    if not dist.is_initialized():
        raise ParallelError("train_fsdp runs inside a process group: launch it with torchrun")
    rank, world = dist.get_rank(), dist.get_world_size()
    if global_batch % world or samples % global_batch:
        raise ParallelError(f"global_batch {global_batch} must divide over {world} ranks and {samples} samples")
    mesh = init_device_mesh("cpu", (world,))
    model = shard_model(tiny_model(seed), mesh)  # the same initial weights everywhere, then each keeps its rows
    optimizer, schedule, sampler, loader = training_parts(model, lr=lr, steps=steps, seed=seed, samples=samples,
                                                          global_batch=global_batch, world=world, rank=rank)
    per_epoch = samples // global_batch
    batches = None
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        if index == 0:
            sampler.set_epoch(epoch)
            batches = iter(loader)
        features, labels, _ = next(batches)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()  # gradients reduce-scattered (averaged)
        optimizer.step()  # each rank updates its own rows
        schedule.step()
    params = local_numel(model.parameters())
    moments = local_numel(s["momentum_buffer"] for s in optimizer.state.values())
    model_state, optim_state = get_state_dict(model, optimizer)  # DTensors: each rank holds its rows
    save_sharded({"model": model_state, "optim": optim_state}, Path(out) / CHECKPOINT_DIR, steps)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # a collective above gathered every row; rank 0 alone received them
        torch.save(full, Path(out) / FULL_NAME)
    return {"rank": rank, "world": world, "local_params": params[0], "full_params": params[1],
            "local_optim": moments[0], "full_optim": moments[1]}
