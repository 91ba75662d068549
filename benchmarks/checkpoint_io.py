"""What saving and loading cost (Lesson 03, §8): size and time of each format as a ratio to raw bytes.

For the course's MLP and a ~100 MB model of plain nn.Linear layers, each format is saved and
loaded; the baseline is a raw write (atomic, fsync) and a raw read (into an existing buffer) of
the same number of bytes, measured in the same run. "load" is file -> weights in the model
(torch.load or load_file, then load_state_dict; safetensors maps the file and copies from it).
Reads come from the page cache for every row alike (the files were just written).
Target: safetensors loads within 2x of the raw read of the 100 MB model; the script exits with
status 1 if that is missed.

A second table puts verification's cost against plain torch: for the same checkpoint state of the
~100 MB model, torch.save/torch.load of that dict versus save_checkpoint (BLAKE3, and + Ed25519
signature) and load_checkpoint (verified: BLAKE3, and + signature; and a format-1 file sealed with
SHA-256, as earlier versions wrote) into the model, against torch.load + load_state_dict, the kinds
taking turns round by round (so load from other work falls on each alike). Reads come from the
page cache. Target there: verified load <= 1.5x torch.load (printed as met or not;
not an exit status). load_checkpoint hashes the file through a read-only memory map (BLAKE3 on
every core: blake3's own threads, whatever torch's thread count), then lets torch.load map the same
file (mmap=True): one read, verify first, and one copy (file pages -> the model's tensors, in
load_state_dict), where torch.load + load_state_dict copies twice (file -> new tensors -> the model's).

    .venv/bin/python benchmarks/checkpoint_io.py [--repeats N]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from mvtk.checkpoint import (checkpoint_payload, load_checkpoint, load_private_key, load_public_key, load_weights,
                             new_key, new_signing_key, read_checkpoint, save_checkpoint, save_weights, seal)
from mvtk.files import atomic_write, write_bytes_atomic
from mvtk.models import MLP

THREADS = 1              # fixed, so runs compare; saving and loading are memory- and disk-bound
BIG_LAYERS, BIG_WIDTH = 6, 2048  # 6 x Linear(2048, 2048): 25.2 M parameters, 100.7 MB of float32
TARGET_SAFETENSORS_LOAD = 2.0    # safetensors load time / raw read time, for the ~100 MB model
TARGET_VERIFIED_LOAD = 1.5       # load_checkpoint (BLAKE3 verified) time / torch.load + load_state_dict, same state


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
        "mvtk save_checkpoint (BLAKE3)": (folder / "model.ckpt", lambda p: save_checkpoint(p, model, epoch=1),
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


def measure_verification(model: nn.Module, folder: Path, repeats: int) -> list[tuple[str, float, float]]:
    """Rows of (what, ms, ratio to the plain torch row) for saving and loading the same checkpoint state."""
    folder = folder / "verification"
    folder.mkdir()
    private, public = (load(p) for load, p in zip((load_private_key, load_public_key),
                                                  new_signing_key(folder / "key.pem", folder / "key.pub")))
    payload = checkpoint_payload(model, epoch=1)
    plain, sealed, signed = folder / "plain.pt", folder / "sealed.pt", folder / "signed.pt"
    version_1 = folder / "version1.pt"  # sealed with SHA-256, as mvtk wrote checkpoints before format version 2
    buffer = io.BytesIO()
    torch.save(dict(payload, format_version=1), buffer)
    version_1.write_bytes(seal(buffer.getvalue(), "sha256"))
    saves = interleaved({
        "save: torch.save (atomic, fsync)": lambda: torch_save_atomic_obj(plain, payload),
        "save: save_checkpoint (BLAKE3)": lambda: save_checkpoint(sealed, model, epoch=1),
        "save: save_checkpoint + Ed25519 signature": lambda: save_checkpoint(signed, model, epoch=1,
                                                                             signing_key=private)}, repeats)
    loads = interleaved({
        "load: torch.load + load_state_dict": lambda: model.load_state_dict(
            torch.load(plain, map_location="cpu", weights_only=True)["model"]),
        "load: load_checkpoint (BLAKE3 verified)": lambda: load_checkpoint(sealed, model),
        "load: load_checkpoint + signature verified": lambda: load_checkpoint(signed, model, verify_key=public),
        "load: load_checkpoint, format 1 (SHA-256)": lambda: load_checkpoint(version_1, model),
        "load: read_checkpoint (verified, tensors mapped)": lambda: read_checkpoint(sealed)}, repeats)
    rows = []
    for timed in (saves, loads):  # each against the first row of its kind: plain torch
        baseline = next(iter(timed.values()))
        rows += [(what, seconds, seconds / baseline) for what, seconds in timed.items()]
    return rows


def interleaved(kinds: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable over `repeats` rounds in which each runs once, in turn, after a warm-up round.

    Taking turns spreads the other work on a shared machine over every kind alike.
    """
    times = {what: [] for what in kinds}
    for round_number in range(repeats + 1):
        for what, fn in kinds.items():
            start = time.perf_counter()
            fn()
            if round_number:
                times[what].append(time.perf_counter() - start)
    return {what: statistics.median(values) for what, values in times.items()}


def torch_save_atomic_obj(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


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
        verification = measure_verification(models["100 MB Linear"], Path(tmp), args.repeats)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work inflates every time)")
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
    print("\nverification's cost, 100 MB Linear, the same checkpoint state; ratio to torch.save / torch.load")
    print(f"{'what':48s} {'ms':>9s} {'ratio':>7s}")
    for what, seconds, ratio in verification:
        print(f"{what:48s} {seconds * 1e3:9.1f} {ratio:6.2f}x")
    verified = next(r[2] for r in verification if r[0].startswith("load: load_checkpoint (BLAKE3"))
    print(f"target: verified load <= {TARGET_VERIFIED_LOAD:.1f}x torch.load: {verified:.2f}x -> "
          f"{'met' if verified <= TARGET_VERIFIED_LOAD else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
