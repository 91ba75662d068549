"""Lesson 07's target: ONNX Runtime at batch 1 is at least 1.5x faster than eager PyTorch for the CNN.

One run trains the course's MLP and SmallCNN, exports both, and prints two tables of ratios measured
side by side: eager PyTorch vs ONNX Runtime (fp32) at batch 1 and 256, and ONNX Runtime int8
(`quantize_dynamic` on MatMul/Gemm) vs fp32: file size, test accuracy, latency. Both engines use
2 threads; each latency is the median of REPEATS calls, timed in 3 alternating blocks per engine, each
block after WARMUP untimed calls (mvtk.export.engine_latencies).
Exits 1 if the target is missed. Run: `.venv/bin/python benchmarks/export.py`.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mvtk import export
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import MLP, SmallCNN
from mvtk.train import fit

THREADS = 2
WARMUP = 10
REPEATS = {1: 300, 256: 30}   # timed calls per engine and batch size: many cheap calls, fewer expensive ones
TARGET_CNN_BATCH1 = 1.5       # ONNX Runtime speed-up over eager at batch 1, SmallCNN
MODELS = {"mlp": (MLP, 8, 20), "cnn": (SmallCNN, 16, 8)}  # class, image size, epochs


def train(name: str):
    """The course model trained as in Lesson 02, with its test loader."""
    cls, size, epochs = MODELS[name]
    loaders = make_loaders(size=size)
    model = cls()
    fit(model, loaders.train, loaders.val, epochs=epochs, progress=False)
    test = loaders.test.dataset
    return model.eval(), test


def accuracy(session, test) -> float:
    predicted = export.run_onnx(session, test.images).argmax(axis=1)
    return float(np.mean(predicted == test.labels.numpy()))


def timed(model, sessions: dict, batch: int, sample_shape) -> dict[str, float]:
    """Median seconds per call of eager PyTorch and each ONNX session on one random batch."""
    return export.engine_latencies(torch.rand(batch, *sample_shape), models={"eager": model}, sessions=sessions,
                                   repeats=REPEATS[batch], warmup=WARMUP)


def main() -> int:
    seed_everything(0, threads=THREADS)
    speed_rows, int8_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model, test = train(name)
            sample_shape = tuple(test.images.shape[1:])
            fp32 = export.export_onnx(model, test.images[:2], Path(tmp) / f"{name}.onnx")
            int8 = export.quantize_onnx(fp32, Path(tmp) / f"{name}_int8.onnx")
            sessions = {"fp32": export.load_session(fp32, threads=THREADS),
                        "int8": export.load_session(int8, threads=THREADS)}
            export.check_parity(model, sessions["fp32"], test.images)
            times = {batch: timed(model, sessions, batch, sample_shape) for batch in REPEATS}
            for batch, t in times.items():
                speed_rows.append((name, batch, t["eager"] * 1e3, t["fp32"] * 1e3, t["eager"] / t["fp32"]))
            int8_rows.append((name, export.onnx_size(fp32) / export.onnx_size(int8),
                              accuracy(sessions["fp32"], test), accuracy(sessions["int8"], test),
                              *(times[batch]["int8"] / times[batch]["fp32"] for batch in REPEATS)))

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads each; "
          f"median of {'/'.join(map(str, REPEATS.values()))} calls (batch {'/'.join(map(str, REPEATS))}) "
          f"in 3 alternating blocks, each after {WARMUP} warm-up calls")
    print("\neager PyTorch vs ONNX Runtime (fp32)")
    print(f"{'model':6}{'batch':>6}{'eager ms':>11}{'ORT ms':>10}{'ORT speed-up':>14}")
    for name, batch, eager_ms, ort_ms, speedup in speed_rows:
        print(f"{name:6}{batch:>6}{eager_ms:>11.3f}{ort_ms:>10.3f}{speedup:>13.2f}x")
    print("\nONNX Runtime int8 (quantize_dynamic, MatMul/Gemm) vs fp32")
    print(f"{'model':6}{'size fp32/int8':>16}{'acc fp32':>10}{'acc int8':>10}"
          + "".join(f"{f'time int8/fp32 b{b}':>22}" for b in REPEATS))
    for name, size_ratio, acc32, acc8, *latency_ratios in int8_rows:
        print(f"{name:6}{size_ratio:>15.2f}x{acc32:>10.3f}{acc8:>10.3f}" + "".join(f"{r:>21.2f}x" for r in latency_ratios))

    cnn_speedup = next(row[4] for row in speed_rows if row[0] == "cnn" and row[1] == 1)
    met = cnn_speedup >= TARGET_CNN_BATCH1
    print(f"\ntarget: ONNX Runtime >= {TARGET_CNN_BATCH1}x faster than eager for the CNN at batch 1: "
          f"{cnn_speedup:.2f}x -> {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
