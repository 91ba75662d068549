"""Lesson 07's map at full size: every deployment path of the MLP and SmallCNN, measured in one run.

`mvtk.export.deployment_map` (the function behind the lesson's §8 map) trains each course model from 3
seeds for as long as Lesson 02 does, builds every path (fp32, bf16, torch.ao legacy int8, torchao
int8 weight-only / dynamic / compiled, PT2E static int8, QAT, pruning + int8, neurons removed + int8,
ONNX Runtime fp32 / dynamic int8 / static int8, and neurons removed + ONNX Runtime int8, where the
fraction removed is the largest that keeps each seed within 0.5 points of fp32 on VALIDATION data) and
prints, per path: gzip size (like with like), test accuracy (mean and spread over the seeds), latency at
batch 1 and 256 and its ratio to eager fp32, every path timed in alternating warmed-up blocks with fp32
on THREADS threads.

Targets (printed as met/MISSED; only the first decides the exit code, the others are measured, not
asserted): ONNX Runtime >= 1.5x faster than eager PyTorch for the CNN at batch 1; static int8 CNN in ONNX
Runtime faster than fp32 ONNX Runtime at batch 256 with <= 1 point drop; the best CPU int8 path >= 3.9x
smaller than fp32 (gzip) with <= 0.5 point drop, and faster than fp32 at batch 256.
Run: `.venv/bin/python benchmarks/export.py` (several minutes: 6 trainings, 2 compiles).
"""
from __future__ import annotations

import sys
import tempfile

import onnxruntime as ort
import torch
import torchao

from mvtk import export
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import MLP, SmallCNN

THREADS = 2
SEEDS = (0, 1, 2)
REPEATS = 60                  # timed calls per path and batch size, in 3 alternating blocks
TARGET_CNN_BATCH1 = 1.5       # ONNX Runtime speed-up over eager at batch 1, SmallCNN
MODELS = {"mlp": (MLP, 8, 20), "cnn": (SmallCNN, 16, 8)}  # class, image size, epochs (Lesson 02's)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> int:
    seed_everything(0, threads=THREADS)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cls, size, epochs) in MODELS.items():
            entries += export.deployment_map(name, cls, make_loaders(size=size), epochs=epochs, seeds=SEEDS,
                                             folder=tmp, repeats=REPEATS)
    entry = {(e.model, e.path): e for e in entries}

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, onnxruntime {ort.__version__}, {THREADS} threads; "
          f"{len(SEEDS)} seeds; median of {REPEATS} calls per path in 3 alternating blocks with fp32")
    print(export.map_table(entries))

    def drop(model, path):  # points lost against fp32, mean over the seeds
        return 100 * (entry[model, "fp32"].accuracy - entry[model, path].accuracy)

    ort_batch1 = entry["cnn", "ORT fp32"].speedup[1]
    met = ort_batch1 >= TARGET_CNN_BATCH1
    print(f"\ntarget: ONNX Runtime >= {TARGET_CNN_BATCH1}x faster than eager for the CNN at batch 1: "
          f"{ort_batch1:.2f}x -> {verdict(met)}")
    static = entry["cnn", "ORT int8 static"].speedup[256] / entry["cnn", "ORT fp32"].speedup[256]
    print(f"target: static int8 CNN in ONNX Runtime faster than fp32 ONNX Runtime at batch 256 with <= 1 point drop: "
          f"{static:.2f}x, {-drop('cnn', 'ORT int8 static'):+.1f} pts -> "
          f"{verdict(static > 1 and drop('cnn', 'ORT int8 static') <= 1)}")
    for model in MODELS:
        fp32 = entry[model, "fp32"]
        int8 = [e for e in entries if e.model == model and "int8" in e.path and "legacy" not in e.path
                and drop(model, e.path) <= 0.5 and e.speedup[256] > 1]
        if not int8:
            print(f"target ({model}): no maintained int8 path within 0.5 points of fp32 and faster at batch 256 -> MISSED")
            continue
        best = max(int8, key=lambda e: fp32.gzip_bytes / e.gzip_bytes)
        smaller = fp32.gzip_bytes / best.gzip_bytes
        print(f"target ({model}): best CPU int8 path (<= 0.5 point drop, faster than fp32 at batch 256) >= 3.9x "
              f"smaller: {best.path}, {smaller:.2f}x smaller, {-drop(model, best.path):+.1f} pts, "
              f"{best.speedup[256]:.2f}x at batch 256 -> {verdict(smaller >= 3.9)}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
