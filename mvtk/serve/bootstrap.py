"""A first model for an empty registry: train the course MLP, register it, point the alias at it (Lesson 10, §3).

What `make serve` and the container do before serving, so the service has something to serve on
a fresh machine. A registry that already holds the name is left exactly as it is.
"""
from __future__ import annotations

from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import MLP
from mvtk.registry import Registry
from mvtk.train import evaluate, fit

__all__ = ["ensure_model", "BOOTSTRAP_EPOCHS"]

BOOTSTRAP_EPOCHS = 20  # a few seconds on a CPU; about 96% test accuracy on the digits


def ensure_model(registry: Registry, name: str, alias: str, *, epochs: int = BOOTSTRAP_EPOCHS):
    """Register a freshly trained MLP as `name` v1 and set `alias` when `name` is not registered yet (Lesson 10, §3).

    Returns the new ModelVersion, or None when `name` exists (then nothing is changed, even if the
    alias is missing: the service's readiness says so instead of guessing a version).
    """
    if name in registry.names():
        return None
    seed_everything(0)
    loaders = make_loaders(size=8)
    model = MLP()
    fit(model, loaders.train, loaders.val, epochs=epochs, progress=False)
    val = evaluate(model, loaders.val)
    mv = registry.register(name, model, metrics={"val_acc": round(val.accuracy, 4)}, dataset=loaders.train.dataset,
                           notes="trained by mvtk.serve's bootstrap: the registry was empty")
    registry.set_alias(name, alias, mv.version)
    return mv
