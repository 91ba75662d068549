"""Lesson 05: training throughput of DistributedDataParallel, 1 process against 2, on this machine.

Every configuration is one `torchrun --standalone -m mvtk.parallel` run of the same recipe (SmallCNN, the
digits at 16x16, one global batch size). Rank 0 times each epoch's training; the figure is the median
samples/second over the epochs after the first (a warm-up). Every process runs a fixed number of threads:
the baseline is 1 process with 1 thread; 2 DDP processes with 1 thread each use twice the cores; 1 process
with as many threads as there are cores is shown for comparison. With GPUs present, 1 and 2 GPUs (nccl)
are measured too. Ratios are against the baseline measured in the same run.

Target: DDP's overhead is bounded: 2 CPU processes keep at least CPU_FLOOR of 1 process's throughput.
A speed-up is NOT a target on CPU: on 2 cores shared with other work, two processes compete for the same
cores, and every step adds a gradient all-reduce.

    python benchmarks/parallel.py [--epochs 4] [--model cnn] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from mvtk.checkpoint import load_checkpoint
from mvtk.parallel import CHECKPOINT_NAME, launch

CPU_FLOOR = 0.5  # 2 CPU processes must reach at least half of 1 process's samples/second


def samples_per_second(nproc: int, device: str, threads: int, args, workdir: Path) -> float:
    """Run one torchrun training and read rank 0's measured throughput from its checkpoint."""
    out = workdir / f"{device}-{nproc}x{threads}"
    launch(["--model", args.model, "--epochs", args.epochs, "--batch-size", args.batch_size, "--device", device,
            "--out", out], nproc=nproc, threads=threads, cwd=workdir)
    return load_checkpoint(out / CHECKPOINT_NAME, restore_rng=False)["metrics"]["samples_per_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=_at_least(2, " (the first epoch is an untimed warm-up)"), default=4,
                        help="epochs per run, at least 2: the first is a warm-up, the rest are timed (default 4)")
    parser.add_argument("--model", default="cnn", help="course model (default cnn)")
    parser.add_argument("--batch-size", type=_at_least(1), default=64, help="global batch size (default 64)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    baseline_name, ddp_name = "1 CPU process", "2 CPU processes, DDP (gloo)"
    configs = [(baseline_name, 1, "cpu", 1), (ddp_name, 2, "cpu", 1)]  # (name, processes, device, threads each)
    if cores > 1:
        configs.append((f"1 CPU process, {cores} threads", 1, "cpu", cores))
    if torch.cuda.device_count() >= 1:
        configs.append(("1 GPU", 1, "cuda", 1))
    if torch.cuda.device_count() >= 2:
        configs.append(("2 GPUs, DDP (nccl)", 2, "cuda", 1))
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, nproc, device, threads in configs:
            rates[name] = (nproc, threads, samples_per_second(nproc, device, threads, args, Path(folder)))
    baseline = rates[baseline_name][2]
    print(f"DDP training throughput: {args.model}, global batch {args.batch_size}, {cores} CPU cores, "
          f"median of {args.epochs - 1} epochs after a warm-up")
    print(f"{'configuration':<30} {'processes':>9} {'threads each':>12} {'samples/s':>10} {'vs 1 CPU process':>17}")
    for name, (nproc, threads, rate) in rates.items():
        print(f"{name:<30} {nproc:>9} {threads:>12} {rate:>10.0f} {rate / baseline:>16.2f}x")
    cpu_ratio = rates[ddp_name][2] / baseline
    if "2 GPUs, DDP (nccl)" in rates:
        print(f"2 GPUs vs 1 GPU: {rates['2 GPUs, DDP (nccl)'][2] / rates['1 GPU'][2]:.2f}x")
    elif "1 GPU" not in rates:
        print("no GPU found: only CPU processes were measured")
    print(f"2 CPU processes vs 1 (1 thread each): {cpu_ratio:.2f}x. At best 2x on 2 idle cores; on cores shared "
          "with other work expect little or no speed-up: the processes compete for the same cores and every step "
          "adds a gradient all-reduce. DDP pays off with a device (a GPU, or dedicated cores) per process.")
    threaded = rates.get(f"1 CPU process, {cores} threads")
    if threaded and threaded[2] < 0.5 * baseline:
        print(f"1 process with {cores} threads ran at {threaded[2] / baseline:.2f}x of 1 thread: on busy cores, "
              "OpenMP threads wait for each other; fewer threads can be faster.")
    met = cpu_ratio >= CPU_FLOOR
    print(f"target: 2 CPU processes keep >= {CPU_FLOOR:.2f}x of 1 process's throughput: {'met' if met else 'MISSED'}")
    return 0 if met else 1


def _at_least(minimum: int, why: str = ""):
    """An argparse type: a whole number >= `minimum`, else a clear usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}{why}")
        return value
    return parse


if __name__ == "__main__":
    sys.exit(main())
