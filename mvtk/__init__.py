"""mvtk: helpers for the course on keeping PyTorch models alive after training."""

__version__ = "0.1.0"

__all__ = ["__version__"]
