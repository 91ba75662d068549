"""Lesson 08's target: training with the monitor on takes at most 1.10x the time of training with it off.

Two pairs, each measured side by side in this run (fixed threads, one warm-up each, median of
repeats, the two variants alternating in A B B A order):
  - fit() on the MLP, with `TrainingMonitor` (its defaults: a hook per parameter that takes the gradient
    norm of every batch, scalars and per-layer norms written to TensorBoard after each epoch, histograms
    every 10th), against fit() with no callback;
  - the plain per-batch loop of Lesson 02, with `MetricLogger.update` on every batch and
    `end_epoch` after each epoch, against the same loop keeping its own running sums.
A third row times the plain loop against itself: the measurement's noise floor on this machine.
The target is checked on CPU time (time.process_time: every thread of this process, TensorBoard's
writer thread included), which other processes on a shared machine barely disturb; the wall-clock
ratio is printed beside it for reference.
Exits with status 1 if a ratio misses the target.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import MLP
from mvtk.monitor import MetricLogger, TrainingMonitor
from mvtk.train import fit

TARGET = 1.10   # monitored time / plain time
THREADS = 1     # fixed, so the ratio does not depend on how busy the other core is
EPOCHS = 10     # one histogram round per run with TrainingMonitor's default
REPEATS = 25    # timings per variant, after one warm-up of each


def fit_plain(loaders, _logdir) -> None:
    model = MLP()
    fit(model, loaders.train, loaders.val, epochs=EPOCHS, progress=False)


def fit_monitored(loaders, logdir) -> None:
    model = MLP()
    with SummaryWriter(logdir) as writer:
        fit(model, loaders.train, loaders.val, epochs=EPOCHS, progress=False,
            on_epoch_end=TrainingMonitor(model, writer))  # defaults: histograms every 10th epoch


def loop(loaders, logger: MetricLogger | None) -> None:
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(EPOCHS):
        total, correct, count = 0.0, 0.0, 0
        for inputs, labels in loaders.train:
            optimizer.zero_grad()
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            accuracy = (logits.argmax(1) == labels).float().mean()
            if logger is None:  # the same two numbers, summed by hand with a sync per batch
                total += loss.item() * len(labels)
                correct += accuracy.item() * len(labels)
                count += len(labels)
            else:
                logger.update(len(labels), loss=loss, acc=accuracy)
        if logger is not None:
            logger.end_epoch()


def loop_plain(loaders, _logdir) -> None:
    loop(loaders, None)


def loop_logged(loaders, _logdir) -> None:
    loop(loaders, MetricLogger())


def measure(pair, loaders, logdir) -> list[tuple[float, float]]:
    """Median CPU seconds and median wall seconds of each variant, timed on alternating repeats."""
    cpu = {index: [] for index in range(len(pair))}
    wall = {index: [] for index in range(len(pair))}
    for fn in pair:  # warm-up
        fn(loaders, logdir)
    for repeat in range(REPEATS):
        order = [0, 1] if repeat % 2 == 0 else [1, 0]  # A B, B A, ...: neither variant always goes second
        for index in order:
            seed_everything(0, threads=THREADS)
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            pair[index](loaders, logdir)
            cpu[index].append(time.process_time() - start_cpu)
            wall[index].append(time.perf_counter() - start_wall)
    return [(statistics.median(cpu[i]), statistics.median(wall[i])) for i in range(len(pair))]


def main() -> int:
    seed_everything(0, threads=THREADS)
    loaders = make_loaders(batch_size=32)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as logdir:
        for label, pair, gated in (("fit + TrainingMonitor (TensorBoard)", (fit_plain, fit_monitored), True),
                                   ("loop + MetricLogger per batch", (loop_plain, loop_logged), True),
                                   ("noise floor: loop vs the same loop", (loop_plain, loop_plain), False)):
            (off_cpu, off_wall), (on_cpu, on_wall) = measure(pair, loaders, logdir)
            ratio = on_cpu / off_cpu
            ok &= ratio <= TARGET or not gated
            rows.append((label, off_cpu, on_cpu, ratio, on_wall / off_wall, gated))
    print(f"MLP on digits, {EPOCHS} epochs, batch 32, {THREADS} thread(s), median of {REPEATS} alternating repeats")
    print(f"{'training':38s} {'off cpu s':>9s} {'on cpu s':>9s} {'on/off':>7s} {'target':>7s} {'(wall on/off)':>14s}")
    for label, off, on, ratio, wall_ratio, gated in rows:
        verdict = ("ok" if ratio <= TARGET else "MISSED") if gated else "(no target)"
        print(f"{label:38s} {off:9.3f} {on:9.3f} {ratio:7.3f} {'<= ' + str(TARGET):>7s} {wall_ratio:14.3f}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
