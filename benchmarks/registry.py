"""Lesson 04's target: registering and loading the course model each take under 50 ms (median of 20).

Prints the registry's times next to plain PyTorch doing the same job, measured in the same run,
and their ratio. register is compared with a durable torch.save (save, then fsync, as the
registry makes its blobs and index durable), not with a bare torch.save whose bytes may still sit
in the page cache; load is compared with torch.load(weights_only=True). Every registration stores new
weights (a small nudge between repeats), so no repeat is served by the blob store's dedup.
The signed rows register with an Ed25519 signing key and load
with the verify key (a signature over the version's record, checked before the weights are used),
in the same run. Exits 1 if a target is missed. Run: `.venv/bin/python benchmarks/registry.py`.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mvtk.checkpoint.signing import new_signing_key
from mvtk.env import seed_everything
from mvtk.models import MLP
from mvtk.registry import Registry

REPEATS = 20
WARMUP = 3
TARGET_MS = 50.0


def median_ms(action, prepare=lambda i: None) -> float:
    """Median wall time of `action(i)` over REPEATS runs after WARMUP runs; `prepare(i)` is not timed."""
    times = []
    for i in range(WARMUP + REPEATS):
        prepare(i)
        start = time.perf_counter()
        action(i)
        if i >= WARMUP:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def save_durably(state_dict, path: Path) -> None:
    """torch.save, then make the bytes durable as the registry does for its blobs."""
    torch.save(state_dict, path)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def main() -> int:
    seed_everything(0, threads=2)
    model = MLP()
    nudge = lambda i: torch.nn.init.normal_(model.fc2.bias, std=0.01)  # new weights each repeat  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = Registry(tmp / "registry")
        rows = [
            ("register", median_ms(lambda i: registry.register(
                "digits", model, metrics={"test_acc": 0.96}, params={"epochs": 20}), nudge),
             median_ms(lambda i: save_durably(model.state_dict(), tmp / f"plain{i}.pt"), nudge)),
            ("load", median_ms(lambda i: registry.load("digits", version=i + 1)),
             median_ms(lambda i: torch.load(tmp / f"plain{i}.pt", weights_only=True))),
        ]
        private, public = new_signing_key(tmp / "keys" / "registry.key", tmp / "keys" / "registry.pub")
        signed = Registry(tmp / "signed", signing_key=private, verify_key=public)
        rows += [
            ("register signed", median_ms(lambda i: signed.register(
                "digits", model, metrics={"test_acc": 0.96}, params={"epochs": 20}), nudge), rows[0][2]),
            ("load verified", median_ms(lambda i: signed.load("digits", version=i + 1)), rows[1][2]),
        ]
        load_model_ms = median_ms(lambda i: registry.load_model("digits", version=i + 1))
        bare_save_ms = median_ms(lambda i: torch.save(model.state_dict(), tmp / f"bare{i}.pt"), nudge)
    print(f"course model: MLP, {sum(p.numel() for p in model.parameters())} parameters; "
          f"median of {REPEATS} after {WARMUP} warm-up runs, torch threads: {torch.get_num_threads()}")
    print("torch ms: register vs torch.save + fsync (durable, like the registry); load vs torch.load")
    print(f"{'operation':<16}{'registry ms':>12}{'torch ms':>10}{'ratio':>8}{'target':>10}  met")
    missed = []
    for name, ours, plain in rows:
        met = ours < TARGET_MS
        missed += [] if met else [name]
        print(f"{name:<16}{ours:>12.2f}{plain:>10.2f}{ours / plain:>7.1f}x{'< 50 ms':>10}  {'yes' if met else 'NO'}")
    print(f"{'load_model':<16}{load_model_ms:>12.2f}{'':>10}{'':>8}{'-':>10}")
    print(f"for scale: torch.save without fsync {bare_save_ms:.2f} ms; register also fsyncs the index, "
          "hashes the weights and asks git for the commit")
    if missed:
        print(f"target missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
