"""The model a service answers with: a registry version, exported, verified, immutable (Lesson 10, §2).

`load_verified` resolves a version, turns it into an ONNX Runtime `Predictor` through
`Predictor.from_registry` (Lesson 07) and only then checks it: the registry weights are loaded
again (their SHA-256 checked, and their signature when a verify key is given) and the ONNX model
must match them on a fixed probe batch. A `ServedModel` is never changed after that; a new version
is a new object, swapped in whole.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mvtk.export import Predictor, check_parity
from mvtk.files import sha256_file

__all__ = ["ServedModel", "load_verified", "probe_batch", "PROBE_SIZE"]

PROBE_SIZE = 16  # images in the fixed probe batch every version must agree on before it is served


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
    every model is served as a classifier (labels and probabilities).
    """
    predictor = Predictor.from_registry(registry, name, version=version, cache_dir=Path(cache_dir), threads=threads,
                                        input_shape=input_shape, task="classification")
    mv = registry.get(name, version=version)
    model = registry.load_model(name, version=version)  # checksum (and signature) of the weights, again
    parity = check_parity(model, predictor.session, probe_batch(tuple(predictor.input_shape)))
    return ServedModel(predictor, mv.name, mv.version, mv.sha256, sha256_file(predictor.path),
                       parity.max_abs_diff, time.time())
