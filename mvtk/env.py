"""Seeding, device choice, a versions report and the run folder (Lesson 00).

Everything that makes a notebook's numbers repeatable lives here, in one place.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mvtk.errors import DeviceUnavailableError, InvalidArgumentError, check_int, check_positive_int

__all__ = [
    "DEFAULT_THREADS", "MIN_TORCH", "DEVICE_ENV_VAR", "COURSE_PACKAGES", "GIT_TIMEOUT_S",
    "seed_everything", "pick_device", "available_devices", "versions", "check_torch_version", "run_dir",
    "utc_now", "git_commit",
]

# The course's thread count, not a project's (a project passes threads=None and keeps torch's own): one CPU
# thread, because the course's models are too small to gain from more, results do not depend on the
# machine's core count, and parallel test workers do not fight over cores (2 threads each ran ~20x
# slower than 1 when the 2-core reference machine was busy).
DEFAULT_THREADS = 1
MIN_TORCH = (2, 10)            # older releases have weights_only CVEs
DEVICE_ENV_VAR = "MVTK_DEVICE"  # set to "cpu" to force the CPU (make notebooks does)
COURSE_PACKAGES = ("torch", "torchvision", "numpy", "scikit-learn", "safetensors", "onnx",
                   "onnxscript", "onnxruntime", "torchao", "tensorboard", "cryptography", "scipy",
                   "matplotlib", "ipywidgets", "jupyterlab")


def seed_everything(seed: int = 0, *, deterministic: bool = True,
                    threads: int | None = DEFAULT_THREADS) -> None:
    """Seed python, numpy and torch (every device), pick deterministic kernels, fix the thread count.

    Lesson 00, §4. `threads` defaults to the course's DEFAULT_THREADS (1), which its notebooks rely on;
    `threads=None` leaves torch's own thread count alone (what a project usually wants).
    Deterministic algorithms are asked for with `warn_only=True`: an operation with no deterministic
    kernel only warns and runs anyway, so bit-exact repeats are likely but not guaranteed.
    """
    check_int(seed, "seed", low=0, high=2**32 - 1)
    if threads is not None:
        check_positive_int(threads, "threads (or None)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every accelerator (CUDA, MPS, XPU, ...)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic on CUDA >= 10.2.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: a kernel with no deterministic version warns instead of stopping the lesson; the
        # price is that such a kernel may still change the last digits from run to run.
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(prefer: str | None = None) -> torch.device:
    """Choose the device once: `prefer`, else $MVTK_DEVICE, else torch's accelerator (CUDA, MPS, XPU, ...), else CPU.

    Lesson 00, §3. Asking for a device this machine lacks raises DeviceUnavailableError.
    """
    choice = prefer if prefer is not None else os.environ.get(DEVICE_ENV_VAR, "auto")
    if not isinstance(choice, str):
        raise InvalidArgumentError(f"prefer must be a device name such as 'cpu' or 'cuda', got {choice!r}")
    choice = choice.strip().lower()
    available = available_devices()
    if choice == "auto":
        return torch.device(available[0])
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise InvalidArgumentError(
            f"unknown device {choice!r}; expected 'auto', 'cpu' or an accelerator such as 'cuda', 'cuda:N', "
            "'mps' or 'xpu'") from None
    if device.type not in available:
        raise DeviceUnavailableError(f"device {choice!r} was asked for but this machine has only {available}")
    if device.type != "cpu" and device.index is not None and device.index >= torch.accelerator.device_count():
        raise DeviceUnavailableError(
            f"device {choice!r} was asked for but this machine has {torch.accelerator.device_count()} "
            f"{device.type} device(s)")
    return device


def available_devices() -> list[str]:
    """The kinds of device torch can use here: its accelerator if it has one (CUDA, MPS, XPU, ...), then the CPU.

    Lesson 00, §3. `torch.accelerator` knows every backend torch was built with, so no list of kinds is kept here.
    """
    if torch.accelerator.is_available():
        return [torch.accelerator.current_accelerator().type, "cpu"]
    return ["cpu"]


def versions() -> dict[str, str]:
    """Python, platform, the course's packages, and the CUDA torch was built for beside the devices present.

    Lesson 00, §2. `torch built for CUDA` is a property of the installed wheel; `CUDA GPUs here` and
    `accelerator` say what this machine lets torch use now.
    """
    report = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for name in COURSE_PACKAGES:
        try:
            report[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report[name] = "not installed"
    # What torch was BUILT for is not what this machine HAS: a CUDA wheel on a laptop without an NVIDIA GPU
    # reports a CUDA version and 0 GPUs, and runs on the CPU.
    report["torch built for CUDA"] = torch.version.cuda or ("no (a ROCm build)" if torch.version.hip else "no")
    report["CUDA GPUs here"] = str(torch.cuda.device_count())
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    report["accelerator"] = (f"{accelerator.type} x {torch.accelerator.device_count()}" if accelerator is not None
                             else "none (CPU only)")
    return report


def check_torch_version(version: str | None = None) -> tuple[int, int]:
    """Raise if torch is older than MIN_TORCH (2.10: safe `weights_only` loading); else return (major, minor).

    Lesson 00, §2. `version` defaults to the installed torch.
    """
    text = version if version is not None else torch.__version__
    try:
        major, minor = (int(part) for part in text.split("+")[0].split(".")[:2])
    except ValueError:
        raise InvalidArgumentError(f"torch version {text!r} is not of the form 'MAJOR.MINOR[.PATCH]'") from None
    if (major, minor) < MIN_TORCH:
        raise InvalidArgumentError(
            f"torch {text} is too old: the course needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
            "(older releases can run code while loading a checkpoint); run `make lab` to refresh .venv")
    return major, minor


def run_dir(lesson: str, root: str | os.PathLike = "runs", fresh: bool = True) -> Path:
    """The folder a lesson writes to, `runs/<lesson>` (git-ignored); emptied first when `fresh` (Lesson 00, §5)."""
    if not isinstance(lesson, str) or not lesson or any(sep in lesson for sep in "/\\") or lesson in (".", ".."):
        raise InvalidArgumentError(f"lesson must be a plain folder name such as '03_save_load', got {lesson!r}")
    path = Path(root) / lesson
    if fresh and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the second: what checkpoints and the registry record (Lesson 03, §2)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


GIT_TIMEOUT_S = 2.0  # how long git_commit waits for git


def git_commit() -> str | None:
    """The current folder's git commit, or None without git or a repository (2 s timeout) (Lesson 03, §5).

    Not cached: a commit made between two saves is recorded by the second.
    """
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40,64}", commit) else None
