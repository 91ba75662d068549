"""The worker torchrun starts: python -m mvtk.distributed TASK [options] (Lesson 11, §1-§4).

Tasks: train (§1-§2), dcp (§3), fsdp (§4), and pause-save (§3, one process, no torchrun).
Each rank writes what it returns as JSON to OUT/<task>-rank<r>.json (read with `worker_results`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mvtk.distributed import elastic, sharded


def _my_rows(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of `tensor` that Shard(0) gives `rank`: torch.chunk's split, ceil(rows / world) each."""
    size = -(-tensor.shape[0] // world)
    return tensor[rank * size:(rank + 1) * size]


def _dcp(out: Path, checkpoint: Path, size_mb: float, seed: int, repeats: int) -> dict:
    """§3 on every rank: load a checkpoint saved by another number of ranks, each rank its rows; time saves."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    whole = {"model": elastic.tiny_model().state_dict()}  # plain tensors: every rank reads every piece
    sharded.load_sharded(whole, checkpoint)
    rows = sharded.shard_state(sharded.zeros_like_state(whole), mesh)  # DTensors: this rank's rows only
    sharded.load_sharded(rows, checkpoint)  # DCP reads just the byte ranges of this rank's rows
    resharded = all(torch.equal(rows["model"][k].to_local(), _my_rows(v, rank, world)) for k, v in whole["model"].items())
    local_rows = {k: v.to_local().shape[0] for k, v in rows["model"].items()}

    state = sharded.shard_state(sharded.example_state(size_mb, seed), mesh)
    sync, blocked, total = [], [], []
    for i in range(repeats):
        dist.barrier()
        begin = time.perf_counter()
        sharded.save_sharded(state, out, 2 * i + 1)  # returns when every shard and .metadata are written
        sync.append(time.perf_counter() - begin)
        snapshot = {k: v.to_local().clone() for k, v in state["model"].items()}
        dist.barrier()
        begin = time.perf_counter()
        pending = sharded.save_sharded(state, out, 2 * i + 2, asynchronous=True)  # returns after the copy
        blocked.append(time.perf_counter() - begin)
        for tensor in state["model"].values():  # training goes on and changes the weights in place
            tensor.to_local().add_(1.0)
        pending.wait()
        total.append(time.perf_counter() - begin)
    check = sharded.zeros_like_state(state)
    dist.barrier()
    begin = time.perf_counter()
    sharded.load_sharded(check, out)
    load_s = time.perf_counter() - begin
    kept = all(torch.equal(check["model"][k].to_local(), snapshot[k]) for k in snapshot)
    return {"rank": rank, "rows": local_rows, "resharded_equal": resharded, "bytes": sharded.state_bytes(state),
            "sync_s": statistics.median(sync), "async_blocked_s": statistics.median(blocked),
            "async_total_s": statistics.median(total), "load_s": load_s, "async_saved_values_at_call": kept}


def _pause_save(out: Path, size_mb: float, seed: int, pause: float) -> dict:
    """§3: save step 1, then die (the lesson kills us) while step 2 waits before its .metadata."""
    state = sharded.example_state(size_mb, seed)
    sharded.save_sharded(state, out, 1)
    for group in state.values():
        for tensor in group.values():
            tensor.add_(1.0)
    sharded.save_sharded(state, out, 2, pause_before_commit=pause)
    return {"rank": 0}


def main(argv=None) -> int:
    """Run one task in this process: inside torchrun's process group when RANK is set (Lesson 11, §1-§4)."""
    parser = argparse.ArgumentParser(prog="python -m mvtk.distributed",
                                     description="Lesson 11's workers; torchrun starts them (see launch_nodes).")
    parser.add_argument("task", choices=["train", "dcp", "fsdp", "pause-save"])
    parser.add_argument("--out", required=True, help="folder for checkpoints, logs and results")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--fail-at-step", type=int, default=None, metavar="K",
                        help="TEST HOOK: exit during step K on torchrun's first attempt only")
    parser.add_argument("--checkpoint", default=None, help="dcp: the checkpoint to load (a root with `latest`)")
    parser.add_argument("--size-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=60.0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grouped = "RANK" in os.environ
    if grouped:
        dist.init_process_group("gloo")
    try:
        if args.task == "train":
            elastic.train_steps(steps=args.steps, global_batch=args.global_batch, seed=args.seed,
                                samples=args.samples, out=out, save_every=args.save_every,
                                fail_at_step=args.fail_at_step)
            value = {"rank": dist.get_rank() if grouped else 0}
        elif args.task == "dcp":
            value = _dcp(out, Path(args.checkpoint), args.size_mb, args.seed, args.repeats)
        elif args.task == "fsdp":
            from mvtk.distributed.fsdp import train_fsdp

            value = train_fsdp(steps=args.steps, global_batch=args.global_batch, seed=args.seed,
                               samples=args.samples, out=out)
        else:
            value = _pause_save(out, args.size_mb, args.seed, args.pause)
        (out / f"{args.task}-rank{value['rank']}.json").write_text(json.dumps(value))
    finally:
        if grouped:
            sharded.close_async_saves()  # its writer thread and gloo group go before the groups are torn down
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
