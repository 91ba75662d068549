"""Lesson 11's checkpoint numbers, side by side in one run: DCP against torch.save, async against sync.

    .venv/bin/python benchmarks/distributed.py [--size-mb 64] [--repeats 5]

One process, one state of model weights plus Adam's two moments (mvtk.distributed.example_state),
written to a temporary folder. Rows: DCP save and load against torch.save and torch.load of the
same state, and the time an asynchronous DCP save blocks the caller against a synchronous DCP save
(target: at most 0.3x). Times are medians over rounds in which every kind runs once, in turn, after
one warm-up round. An async save copies the state into CPU buffers that later async saves reuse; the
warm-up round's, which allocates them, is printed on a line of its own.
The registry rows time Lesson 11 §6's team registry: register and load_model of the course MLP on a real
`mlflow server` on 127.0.0.1 (started here, about 10-30 s) against a folder registry, in the same rounds
(`--registry-repeats 0` skips them).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mvtk import distributed

TARGET_ASYNC_RATIO = 0.3  # an async save blocks for at most 0.3x a synchronous one
# One process without a group is intended here; DCP's background writer thread would warn about it on every save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def registry_latency(repeats: int) -> dict[str, float]:
    """Median register and load_model seconds of the course MLP on a folder registry and on an MLflow server."""
    from mvtk.models import MLP
    from mvtk.registry import Registry, start_mlflow_server

    times: dict[str, list[float]] = {}
    model = MLP()
    with tempfile.TemporaryDirectory(prefix="mvtk-bench-registry-") as tmp:
        with start_mlflow_server(Path(tmp) / "mlflow") as server:
            backends = {"folder": Registry(Path(tmp) / "folder"), "mlflow": Registry(server.url)}
            for step in range(repeats + 1):  # round 0 warms up; the backends alternate every round
                torch.nn.init.normal_(model.fc2.bias, std=0.01)  # new weights each round: no dedup
                for kind, registry in backends.items():
                    begin = time.perf_counter()
                    mv = registry.register("bench", model)
                    registered = time.perf_counter() - begin
                    begin = time.perf_counter()
                    registry.load_model("bench", mv.version)
                    if step:
                        times.setdefault(f"{kind}_register", []).append(registered)
                        times.setdefault(f"{kind}_load", []).append(time.perf_counter() - begin)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=64.0, help="state size in MB (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kind (default: 5)")
    parser.add_argument("--registry-repeats", type=int, default=5,
                        help="timed register/load calls per registry backend; 0 skips the MLflow server (default: 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = distributed.example_state(args.size_mb)
    size = distributed.state_bytes(state)
    folder = Path(tempfile.mkdtemp(prefix="mvtk-bench-dcp-"))
    times: dict[str, list[float]] = {"dcp_save": [], "torch_save": [], "async_blocked": [], "dcp_load": [],
                                     "torch_load": []}
    target = distributed.zeros_like_state(state)
    try:
        for step in range(args.repeats + 1):  # round 0 warms up and is not counted; kinds alternate every round
            timed = {}
            begin = time.perf_counter()
            distributed.save_sharded(state, folder / "dcp", 2 * step + 1)
            timed["dcp_save"] = time.perf_counter() - begin
            begin = time.perf_counter()
            torch.save(state, folder / "state.pt")
            timed["torch_save"] = time.perf_counter() - begin
            begin = time.perf_counter()
            pending = distributed.save_sharded(state, folder / "dcp", 2 * step + 2, asynchronous=True)
            timed["async_blocked"] = time.perf_counter() - begin  # what the training loop waits for
            pending.wait()  # not timed: the write goes on while training would
            begin = time.perf_counter()
            distributed.load_sharded(target, folder / "dcp")
            timed["dcp_load"] = time.perf_counter() - begin
            begin = time.perf_counter()
            torch.load(folder / "state.pt", weights_only=True)
            timed["torch_load"] = time.perf_counter() - begin
            for old in sorted((folder / "dcp").glob("step-*"))[:-1]:  # keep the disk use bounded
                shutil.rmtree(old)
            if step:
                for key, value in timed.items():
                    times[key].append(value)
            else:
                first_blocked = timed["async_blocked"]  # the first async save also allocates the staging buffers
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    save_dcp, save_torch, blocked, load_dcp, load_torch = (statistics.median(times[k]) for k in times)
    ratio = blocked / save_dcp
    rows = [
        ("DCP save vs torch.save", save_dcp, save_torch, save_dcp / save_torch),
        ("DCP load vs torch.load", load_dcp, load_torch, load_dcp / load_torch),
        ("async DCP save (blocking) vs sync DCP save", blocked, save_dcp, ratio),
    ]
    if args.registry_repeats > 0:
        reg = registry_latency(args.registry_repeats)
        rows += [("registry register: MLflow server vs folder", reg["mlflow_register"], reg["folder_register"],
                  reg["mlflow_register"] / reg["folder_register"]),
                 ("registry load_model: MLflow server vs folder", reg["mlflow_load"], reg["folder_load"],
                  reg["mlflow_load"] / reg["folder_load"])]
    print(f"state: {size / 1e6:.1f} MB (weights + Adam moments), one process, torch {torch.__version__}")
    print(f"{'comparison':<44} {'ms':>9} {'baseline ms':>12} {'ratio':>7}")
    for name, value, baseline, r in rows:
        print(f"{name:<44} {1e3 * value:9.1f} {1e3 * baseline:12.1f} {r:7.2f}x")
    print(f"save bandwidth: DCP {size / save_dcp / 1e9:.2f} GB/s, torch.save {size / save_torch / 1e9:.2f} GB/s")
    verdict = "met" if ratio <= TARGET_ASYNC_RATIO else "NOT met"
    print(f"target: async save blocks <= {TARGET_ASYNC_RATIO}x a synchronous save: {verdict} ({ratio:.2f}x)")
    print(f"the first async save (it allocates the reused buffers) blocked {1e3 * first_blocked:.1f} ms, "
          f"{first_blocked / save_dcp:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
