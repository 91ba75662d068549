"""A first model for an empty registry: train the course MLP, register it, point the alias at it (Lesson 10, §3).

What `make serve` and the container do before serving, so the service has something to serve on
a fresh machine. Only a registry holding no model at all is written to; one that holds the name is
left as it is, and one that holds other names is refused (a typo in the name must not train a model).
"""
from __future__ import annotations

from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import NotFoundError
from mvtk.models import MLP
from mvtk.registry import Registry
from mvtk.train import evaluate, fit

__all__ = ["ensure_model", "BOOTSTRAP_EPOCHS"]

BOOTSTRAP_EPOCHS = 20  # a few seconds on a CPU; about 96% test accuracy on the digits


def ensure_model(registry: Registry, name: str, alias: str, *, epochs: int = BOOTSTRAP_EPOCHS):
    """Register a freshly trained MLP as `name` v1 and set `alias` when the registry holds no model (Lesson 10, §3).

    Returns the new ModelVersion, or None when `name` exists (then nothing is changed, even if the
    alias is missing: the service's readiness says so instead of guessing a version). Raises
    NotFoundError, changing nothing, when the registry holds other models but not `name`.
    """
    names = list(registry.names())
    if name in names:
        return None
    if names:
        raise NotFoundError(f"the registry holds no model named {name!r}, so there is nothing to serve; it holds "
                            f"{', '.join(map(repr, sorted(names)))}. Pass --model with one of those; --bootstrap "
                            "only trains a model for a registry that holds none")
    seed_everything(0)
    loaders = make_loaders(size=8)
    model = MLP()
    fit(model, loaders.train, loaders.val, epochs=epochs, progress=False)
    val = evaluate(model, loaders.val)
    mv = registry.register(name, model, metrics={"val_acc": round(val.accuracy, 4)}, dataset=loaders.train.dataset,
                           notes="trained by mvtk.serve's bootstrap: the registry was empty")
    registry.set_alias(name, alias, mv.version)
    return mv
