"""The course's data: scikit-learn's bundled digits as a torchvision-style dataset (Lesson 02, §1).

Nothing downloads: the digits (1,797 images, 8x8, 10 classes) ship inside scikit-learn, and a
local MNIST folder is read only if it already exists.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mvtk.errors import DatasetError, InvalidArgumentError, check_int, check_number, check_positive_int

__all__ = [
    "DATASETS", "SPLITS", "DEFAULT_FRACTIONS", "NUM_CLASSES", "ImageDataset", "Loaders", "load_digits_tensors",
    "load_mnist_tensors", "resize", "split_indices", "load_dataset", "make_loaders", "fingerprint",
]

DATASETS = ("digits", "mnist")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test
NUM_CLASSES = 10  # the digits 0-9, in both data sets; the models' default output size


class ImageDataset(Dataset):
    """Images (N x 1 x H x W, float in [0, 1]) with int64 labels; `transform` applies per item.

    Torchvision-style: `ds[i]` returns `(image, label)`. Lesson 02, §1.
    """

    classes = [str(digit) for digit in range(NUM_CLASSES)]

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable | None = None, target_transform: Callable | None = None):
        if images.dim() != 4 or images.shape[1] != 1:
            raise DatasetError(f"images must have shape (N, 1, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DatasetError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image, label = self.images[index], self.labels[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label


class Loaders(NamedTuple):
    """The three DataLoaders of a split (Lesson 02, §1)."""
    train: DataLoader
    val: DataLoader
    test: DataLoader


def load_digits_tensors(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as images (N x 1 x size x size, in [0, 1]) and labels (Lesson 02, §1)."""
    from sklearn.datasets import load_digits

    _check_size(size)
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    return resize(images, size), labels


def load_mnist_tensors(root: str | os.PathLike, size: int = 28, train: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A local MNIST copy (torchvision's folder layout under `root`) as tensors; never downloads (Lesson 02, §1)."""
    from torchvision.datasets import MNIST

    _check_size(size)
    try:
        mnist = MNIST(os.fspath(root), train=train, download=False)
    except RuntimeError as exc:
        raise DatasetError(f"no MNIST copy under {os.fspath(root)!r} (expected {os.fspath(root)}/MNIST/raw/*-ubyte); "
                           "the course never downloads: use name='digits' or copy MNIST there") from exc
    images = mnist.data.unsqueeze(1).float() / 255.0
    return resize(images, size), mnist.targets.long()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch of images (N x C x H x W) to size x size with torchvision's antialiased resize.

    Used through `load_dataset(size=16)`, the CNN's input (Lesson 07, §0).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(f"images must be a tensor of shape (N, C, H, W), got {shape}")
    _check_size(size)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return v2.Resize((size, size), antialias=True)(images)


def split_indices(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """A deterministic shuffled split of range(n) into train/val/test by `fractions` (Lesson 02, §1)."""
    check_int(n, "n", low=len(SPLITS))
    return dict(zip(SPLITS, _shuffled_split(n, _check_fractions(fractions), seed)))


def load_dataset(name: str = "digits", split: str = "train", *, size: int = 8,
                 transform: Callable | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 seed: int = 0, root: str | os.PathLike | None = None) -> ImageDataset:
    """One split of a course data set as an ImageDataset; `size` 16 suits the CNN (Lesson 02, §1).

    The split is the same on every machine for the same `seed` and `fractions`.
    MNIST keeps its own test set; its training set is split into train and val.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown data set {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise InvalidArgumentError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "digits":
        images, labels = load_digits_tensors(size)
        index = split_indices(len(labels), fractions, seed)[split]
    else:
        if root is None:
            raise DatasetError("name='mnist' needs root=<folder holding a local MNIST copy>; nothing is downloaded")
        fractions = _check_fractions(fractions)
        images, labels = load_mnist_tensors(root, size, train=split != "test")
        if split == "test":
            index = torch.arange(len(labels))
        else:  # MNIST's training set split into train and val in the ratio of the first two fractions
            train_share = fractions[0] / (fractions[0] + fractions[1])
            train_index, val_index = _shuffled_split(len(labels), (train_share, 1.0 - train_share), seed)
            index = train_index if split == "train" else val_index
    return ImageDataset(images[index], labels[index], transform=transform)


def make_loaders(name: str = "digits", *, size: int = 8, batch_size: int = 32, seed: int = 0,
                 train_transform: Callable | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 root: str | os.PathLike | None = None, eval_batch_size: int = 512) -> Loaders:
    """Train/val/test DataLoaders: train shuffled by a seeded generator, num_workers=0 (Lesson 02, §1).

    `train_transform` (augmentation) applies to the training split only.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(eval_batch_size, "eval_batch_size")
    common = dict(name=name, size=size, fractions=fractions, seed=seed, root=root)
    train = load_dataset(split="train", transform=train_transform, **common)
    generator = torch.Generator().manual_seed(seed)  # the shuffle order, saved in checkpoints (Lesson 03)
    return Loaders(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0),
        val=DataLoader(load_dataset(split="val", **common), batch_size=eval_batch_size, num_workers=0),
        test=DataLoader(load_dataset(split="test", **common), batch_size=eval_batch_size, num_workers=0),
    )


def fingerprint(dataset: ImageDataset) -> str:
    """A SHA-256 of a dataset's images and labels: the same data gives the same string (Lesson 04, §2)."""
    if not isinstance(dataset, ImageDataset):
        raise InvalidArgumentError(f"dataset must be an mvtk ImageDataset, got {type(dataset).__name__}")
    digest = hashlib.sha256()
    digest.update(dataset.images.contiguous().numpy().tobytes())
    digest.update(dataset.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _shuffled_split(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """range(n) shuffled by `seed` and cut into consecutive parts by `fractions`; the last part takes the rest."""
    check_int(seed, "seed", low=0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions[:-1]:
        stop = start + int(round(fraction * n))
        parts.append(order[start:stop])
        start = stop
    return parts + [order[start:]]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fractions = tuple(fractions)
    if len(fractions) != len(SPLITS):
        raise InvalidArgumentError(f"fractions must be three positive numbers (train, val, test), got {fractions!r}")
    for index, (split, fraction) in enumerate(zip(SPLITS, fractions)):
        check_number(fraction, f"fractions[{index}] ({split})", low=0, low_open=True)
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise InvalidArgumentError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions):.4f})")
    return fractions


def _check_size(size: int) -> None:
    check_int(size, "size (pixels per side)", low=4, high=64)
