"""Fixtures of the registry tests: an empty registry, one holding three versions, MLPs with other weights."""
from __future__ import annotations

import pytest
import torch

from mvtk.models import MLP
from mvtk.registry import Registry


@pytest.fixture
def seeded_mlp():
    """make(seed): an MLP(hidden=16) like the `mlp` fixture, its weights drawn from `seed` (0: the same weights)."""
    def make(seed: int) -> MLP:
        torch.manual_seed(seed)
        return MLP(hidden=16)
    return make


@pytest.fixture
def registry(tmp_path):
    """An empty registry in a temporary folder, its connection closed afterwards."""
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def three_versions(registry, seeded_mlp):
    """The registry holding 'm' v1, v2, v3: MLPs seeded 0, 1, 2, no aliases."""
    for seed in range(3):
        registry.register("m", seeded_mlp(seed))
    return registry
