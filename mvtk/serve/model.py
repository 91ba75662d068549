"""The model a service answers with: a registry version, exported, verified, immutable (Lesson 10, §2).

`load_verified` resolves a version, turns it into an ONNX Runtime `Predictor` through
`Predictor.from_registry` (Lesson 07) and only then checks it: the registry weights are loaded
again (their SHA-256 checked, and their signature when a verify key is given) and the ONNX model
must match them on a fixed probe batch. A `ServedModel` is never changed after that; a new version
is a new object, swapped in whole.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mvtk.errors import ExportError
from mvtk.export import Predictor, check_parity
from mvtk.files import sha256_file

__all__ = ["ServedModel", "load_verified", "probe_batch", "PROBE_SIZE", "finite_rows", "failure_text",
           "NOT_FINITE", "remove_stale_staging", "STALE_STAGING_S"]

PROBE_SIZE = 16  # images in the fixed probe batch every version must agree on before it is served
STALE_STAGING_S = 3600.0  # an export's staging folder this old was left by a killed process (an export takes seconds)
NOT_FINITE = "the model's output for this input is not finite (NaN/inf)"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colour codes some libraries put in their messages
PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\][^\s'\"/\\:,;()<>]+){2,}")  # an absolute path, 2+ parts


@dataclass(frozen=True)
class ServedModel:
    """One verified version ready to answer: its predictor and what it is (Lesson 10, §2)."""
    predictor: Predictor
    name: str
    version: int
    sha256: str            # the registry weights' SHA-256
    onnx_sha256: str       # the exported file's SHA-256
    max_abs_diff: float    # ONNX Runtime vs PyTorch on the probe batch
    loaded_at: float       # time.time() when it passed verification

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape, e.g. (1, 8, 8) (Lesson 10, §2)."""
        return tuple(self.predictor.input_shape)

    def info(self) -> dict:
        """What the model endpoint shows: name, version, SHA-256s, input shape (Lesson 10, §3)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "onnx_sha256": self.onnx_sha256, "input_shape": list(self.input_shape),
                "probe_max_abs_diff": self.max_abs_diff}


def probe_batch(input_shape: tuple[int, ...], size: int = PROBE_SIZE, seed: int = 0) -> torch.Tensor:
    """A fixed batch of pixel values in [0, 1]: the same for every version and every run (Lesson 10, §2)."""
    return torch.rand(size, *input_shape, generator=torch.Generator().manual_seed(seed))


def load_verified(registry, name: str, version: int, *, cache_dir: str | os.PathLike,
                  threads: int = 1, input_shape: tuple[int, ...] | None = None) -> ServedModel:
    """Export (or reuse) `name` v`version` as ONNX and verify it against the registry weights (Lesson 10, §2).

    Raises the registry's IntegrityError/SignatureError when the stored weights were changed, and
    ExportError when the ONNX model disagrees with them on the probe batch; nothing is served then.
    `input_shape` (one sample's, no batch dimension) is needed for a model that is not a course model;
    every model is served as a classifier (labels and probabilities): a version whose outputs on the probe
    batch are not (N, classes >= 2) or not finite fails with ExportError too.
    """
    predictor = Predictor.from_registry(registry, name, version=version, cache_dir=Path(cache_dir), threads=threads,
                                        input_shape=input_shape, task="classification")
    mv = registry.get(name, version=version)
    model = registry.load_model(name, version=version)  # checksum (and signature) of the weights, again
    probe = probe_batch(tuple(predictor.input_shape))
    parity = check_parity(model, predictor.session, probe)
    prediction = predictor.predict(probe)  # the service's own path: ExportError when not (N, classes >= 2)
    if not finite_rows(prediction.probabilities).all():
        raise ExportError(f"{predictor.source}'s output on the probe batch is not finite (NaN/inf); "
                          "the service could not answer with it")
    return ServedModel(predictor, mv.name, mv.version, mv.sha256, sha256_file(predictor.path),
                       parity.max_abs_diff, time.time())


def finite_rows(probabilities: np.ndarray) -> np.ndarray:
    """One bool per row: True when all of its probabilities are finite (Lesson 10, §4)."""
    return np.isfinite(probabilities.reshape(len(probabilities), -1)).all(axis=1)


def failure_text(exc: BaseException, limit: int = 600) -> str:
    """An error as one line for HTTP bodies: its type and message, colour codes and file paths removed (Lesson 10, §7)."""
    text = " ".join(line.strip() for line in ANSI.sub("", str(exc)).splitlines() if line.strip())
    text = PATH.sub(lambda m: "<path>/" + re.split(r"[/\\]", m.group())[-1], text)
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def remove_stale_staging(cache_dir: str | os.PathLike, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Delete the cache's `.staging-*` folders older than `older_than_s` (left by a killed export); the removed (Lesson 10, §2).

    A live export's staging folder is seconds old, so it is never touched.
    """
    cache, removed = Path(cache_dir), []
    now = time.time()
    for staging in cache.glob(".staging-*") if cache.is_dir() else ():
        try:
            if staging.is_dir() and now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging)
                removed.append(staging)
        except FileNotFoundError:  # another process removed it first
            continue
    return removed
