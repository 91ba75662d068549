"""What saving and loading cost (Lesson 03, §8): size and time of each format as a ratio to raw bytes.

For the course's MLP and a ~100 MB model of plain nn.Linear layers, each format is saved and
loaded; the baseline is a raw write (atomic, fsync) and a raw read (into an existing buffer) of
the same number of bytes, measured in the same run. "load" is file -> weights in the model
(torch.load or load_file, then load_state_dict; safetensors maps the file and copies from it).
Reads come from the page cache for every row alike (the files were just written).
Target: safetensors loads within 2x of the raw read of the 100 MB model; the script exits with
status 1 if that is missed.

    .venv/bin/python benchmarks/checkpoint_io.py [--repeats N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from mvtk.checkpoint import load_checkpoint, load_weights, new_key, save_checkpoint, save_weights
from mvtk.files import atomic_write, write_bytes_atomic
from mvtk.models import MLP

THREADS = 1              # fixed, so runs compare; saving and loading are memory- and disk-bound
BIG_LAYERS, BIG_WIDTH = 6, 2048  # 6 x Linear(2048, 2048): 25.2 M parameters, 100.7 MB of float32
TARGET_SAFETENSORS_LOAD = 2.0    # safetensors load time / raw read time, for the ~100 MB model


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_into(path: Path, buffer: bytearray) -> None:
    with open(path, "rb") as handle:
        handle.readinto(buffer)


def torch_save_atomic(path: Path, model: nn.Module) -> None:
    with atomic_write(path) as tmp:  # the same durability (fsync + rename) as every other row
        torch.save(model.state_dict(), tmp)


def safetensors_save_atomic(path: Path, model: nn.Module) -> None:
    with atomic_write(path) as tmp:
        safetensors.torch.save_file(model.state_dict(), tmp)


def measure(label: str, model: nn.Module, folder: Path, repeats: int, key: bytes) -> list[tuple]:
    """Rows of (model, format, size ratio, save ratio, load ratio, save ms, load ms) for one model."""
    raw_bytes = b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())
    folder = folder / label.replace(" ", "_")
    folder.mkdir()
    raw_path = folder / "model.raw"
    raw_save = median_time(lambda: write_bytes_atomic(raw_path, raw_bytes), repeats)
    buffer = bytearray(len(raw_bytes))  # like load_state_dict, the raw read fills memory that already exists
    raw_load = median_time(lambda: read_into(raw_path, buffer), repeats)
    formats = {
        "raw bytes (baseline)": (raw_path, None, None),
        "torch.save/torch.load": (folder / "model.pt", lambda p: torch_save_atomic(p, model),
                                  lambda p: model.load_state_dict(torch.load(p, map_location="cpu",
                                                                             weights_only=True))),
        "safetensors save_file/load_file": (folder / "model.safetensors", lambda p: safetensors_save_atomic(p, model),
                                            lambda p: model.load_state_dict(safetensors.torch.load_file(p))),
        "mvtk save_weights/load_weights": (folder / "weights.safetensors", lambda p: save_weights(p, model),
                                           lambda p: load_weights(p, model)),
        "mvtk save_checkpoint (SHA-256)": (folder / "model.ckpt", lambda p: save_checkpoint(p, model, epoch=1),
                                           lambda p: load_checkpoint(p, model, restore_rng=False)),
        "mvtk checkpoint, AES-GCM": (folder / "model.ckpt.enc", lambda p: save_checkpoint(p, model, epoch=1, key=key),
                                     lambda p: load_checkpoint(p, model, restore_rng=False, key=key)),
    }
    rows = []
    for name, (path, save, load) in formats.items():
        save_s = raw_save if save is None else median_time(lambda: save(path), repeats)
        load_s = raw_load if load is None else median_time(lambda: load(path), repeats)
        rows.append((label, name, path.stat().st_size / len(raw_bytes), save_s / raw_save, load_s / raw_load,
                     save_s * 1e3, load_s * 1e3))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, after a warm-up")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    models = {"course MLP": MLP(),
              "100 MB Linear": nn.Sequential(*[nn.Linear(BIG_WIDTH, BIG_WIDTH) for _ in range(BIG_LAYERS)])}
    key = new_key()
    with tempfile.TemporaryDirectory(prefix="mvtk-bench-") as tmp:
        rows = []
        for label, model in models.items():
            rows += measure(label, model, Path(tmp), args.repeats, key)
    print(f"threads={THREADS}, median of {args.repeats} after a warm-up; ratios are to a raw write (atomic, fsync) "
          "and a raw read of the same bytes; load = file -> weights in the model")
    header = f"{'model':14s} {'format':34s} {'size':>6s} {'save':>7s} {'load':>7s} {'save ms':>9s} {'load ms':>9s}"
    print(header)
    print("-" * len(header))
    for label, name, size, save, load, save_ms, load_ms in rows:
        print(f"{label:14s} {name:34s} {size:5.3f}x {save:6.2f}x {load:6.2f}x {save_ms:9.1f} {load_ms:9.1f}")
    big = next(r for r in rows if r[0] == "100 MB Linear" and r[1].startswith("safetensors"))
    met = big[4] <= TARGET_SAFETENSORS_LOAD
    print(f"\ntarget: safetensors load of the 100 MB model within {TARGET_SAFETENSORS_LOAD:.1f}x of the raw read: "
          f"{big[4]:.2f}x -> {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
