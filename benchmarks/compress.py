"""Lesson 06 benchmark: every compression variant against the fp32 baseline, measured in one run.

Prints size ratio, accuracy and latency ratio at batch 1 and 256 (CPU, one thread, median after
warm-up; each variant timed in turns with the fp32 baseline, so both see the same machine load) for
each variant, then the lesson's targets; exits 1 if a target is missed.
Run: `.venv/bin/python benchmarks/compress.py` (about a minute on a 2-core CPU).
"""
from __future__ import annotations

import sys
import tempfile

import torch
from torch import nn

from mvtk import compress
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import build_model, copy_model
from mvtk.train import fit

REPEATS, WARMUP = 50, 3


def train_baseline(loaders) -> nn.Module:
    """The lesson's wide MLP: MLP v2 at 1,024 hidden units, 10 epochs, Adam + cosine schedule."""
    model = build_model("mlp_v2", hidden=1024)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, loaders.train, loaders.val, epochs=10, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10), progress=False)
    return model


def fine_tune(model: nn.Module, loaders, epochs: int = 3) -> nn.Module:
    fit(model, loaders.train, loaders.val, epochs=epochs, optimizer=torch.optim.Adam(model.parameters(), lr=3e-4),
        progress=False)
    return model


def variants(baseline: nn.Module, loaders) -> dict[str, nn.Module]:
    """Every model the lesson measures, built the way the notebook builds it."""
    pruned = fine_tune(compress.prune_global(copy_model(baseline), 0.9), loaders)
    slim = copy_model(baseline)
    compress.prune_neurons(slim, "fc1", 0.5)
    compress.prune_neurons(slim, "fc2", 0.5)
    fine_tune(slim, loaders)
    smaller = compress.drop_pruned_neurons(compress.drop_pruned_neurons(slim, "fc1", "fc2"), "fc2", "fc3")
    return {
        "fp32 baseline": baseline,
        "pruned 90% (dense)": compress.make_permanent(copy_model(pruned)),
        "50% neurons removed": smaller,
        "float16": compress.cast(baseline, torch.float16),
        "bfloat16": compress.cast(baseline, torch.bfloat16),
        "int8 torch.ao": compress.quantize_int8(baseline),
        "int8 torchao (eager)": compress.quantize_int8(baseline, backend="torchao"),
        "pruned 90% + int8": compress.quantize_int8(pruned),
        "50% neurons + int8": compress.quantize_int8(smaller),
    }


def check_targets(rows: dict[str, compress.Measurement]) -> list[tuple[str, float, bool]]:
    """(target, measured value, met?) for each target the lesson asserts."""
    base, int8, final, slim = (rows[k] for k in ("fp32 baseline", "int8 torch.ao", "pruned 90% + int8",
                                                 "50% neurons removed"))
    points = lambda row: 100 * (base.accuracy - row.accuracy)  # noqa: E731 - accuracy drop in points
    return [
        ("int8 torch.ao file >= 3.9x smaller", base.file_bytes / int8.file_bytes,
         base.file_bytes / int8.file_bytes >= 3.9),
        ("int8 torch.ao accuracy drop <= 0.5 points", points(int8), points(int8) <= 0.5),
        ("int8 torch.ao faster at batch 256 (ratio > 1)", int8.speedup[256], int8.speedup[256] > 1),
        ("pruned 90% + int8 + gzip >= 10x smaller", base.file_bytes / final.gzip_bytes,
         base.file_bytes / final.gzip_bytes >= 10),
        ("pruned 90% + int8 accuracy drop <= 1 point", points(final), points(final) <= 1.0),
        ("50% neurons removed faster at batch 256 (ratio > 1)", slim.speedup[256], slim.speedup[256] > 1),
    ]


def main() -> int:
    seed_everything(0, threads=1)
    loaders = make_loaders(batch_size=64)
    baseline = train_baseline(loaders)
    with tempfile.TemporaryDirectory() as folder:
        rows = {name: compress.measure(model, loaders.test, folder, name, repeats=REPEATS, warmup=WARMUP,
                                       baseline=None if model is baseline else baseline)
                for name, model in variants(baseline, loaders).items()}
    print(f"CPU, {compress.LATENCY_THREADS} thread, median of {REPEATS} calls in {compress.LATENCY_ROUNDS} blocks "
          f"alternating with the baseline, each block after {WARMUP} warm-up calls; "
          f"'smaller' = fp32 file / variant file, 'faster@b' = fp32 ms / variant ms, timed in turns in one run\n")
    print(compress.report(list(rows.values())))
    print()
    results = check_targets(rows)
    for target, value, met in results:
        print(f"{'PASS' if met else 'FAIL'}  {target}: {value:.2f}")
    return 0 if all(met for _, _, met in results) else 1


if __name__ == "__main__":
    sys.exit(main())
