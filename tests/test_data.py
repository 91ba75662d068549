"""Lesson 02's data claims: the digits load offline, split the same way every time, and bad input is named."""
import struct

import pytest
import torch
from torchvision.transforms import v2

from mvtk.data import (ImageDataset, fingerprint, load_dataset, load_digits_tensors, make_loaders, resize,
                       split_indices)
from mvtk.errors import DatasetError, InvalidArgumentError


def test_digits_are_1797_images_of_8x8_in_unit_range():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))


def test_resize_to_16_for_the_cnn():
    images, _ = load_digits_tensors(size=16)
    assert images.shape == (1797, 1, 16, 16)


def test_split_is_deterministic_disjoint_and_complete():
    first, again = split_indices(1797), split_indices(1797)
    assert all(torch.equal(first[k], again[k]) for k in first)
    together = torch.cat(list(first.values()))
    assert sorted(together.tolist()) == list(range(1797))
    assert [len(first[k]) for k in ("train", "val", "test")] == [1258, 270, 269]


def test_another_seed_gives_another_split():
    assert not torch.equal(split_indices(1797, seed=0)["test"], split_indices(1797, seed=1)["test"])


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.0, 0.0, 0.0), (0.8, -0.1, 0.3)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(InvalidArgumentError, match="fractions"):
        split_indices(100, fractions)


def test_dataset_returns_image_label_pairs_with_transform():
    flip = v2.RandomHorizontalFlip(p=1.0)
    plain, flipped = load_dataset(split="val"), load_dataset(split="val", transform=flip)
    image, label = flipped[0]
    assert image.shape == (1, 8, 8) and label.dtype == torch.int64
    assert torch.equal(image, plain[0][0].flip(-1))


def test_loaders_shuffle_the_same_way_for_the_same_seed():
    first = next(iter(make_loaders(seed=3).train))[1]
    again = next(iter(make_loaders(seed=3).train))[1]
    assert torch.equal(first, again)


def test_loaders_cover_train_val_and_test():
    loaders = make_loaders(batch_size=64)
    assert [len(l.dataset) for l in loaders] == [1258, 270, 269]


@pytest.mark.parametrize("name", ["cifar", "MNIST ", ""])
def test_unknown_dataset_is_refused(name):
    with pytest.raises(DatasetError, match="unknown data set"):
        load_dataset(name)


def test_unknown_split_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown split 'training'"):
        load_dataset(split="training")


def test_mnist_without_a_local_copy_never_downloads(tmp_path):
    with pytest.raises(DatasetError, match="never downloads"):
        load_dataset("mnist", root=tmp_path)
    assert list(tmp_path.rglob("*")) == [] or not any(p.suffix == ".gz" for p in tmp_path.rglob("*"))


def test_mnist_needs_a_root():
    with pytest.raises(DatasetError, match="root"):
        load_dataset("mnist")


@pytest.mark.parametrize("size", [0, 3, 65, 8.0, "8"])
def test_bad_image_size_is_refused(size):
    with pytest.raises(InvalidArgumentError, match="size"):
        load_dataset(size=size)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size_is_refused(batch_size):
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        make_loaders(batch_size=batch_size)


def test_malformed_tensors_are_refused():
    with pytest.raises(DatasetError, match="shape"):
        ImageDataset(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DatasetError, match="labels"):
        ImageDataset(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64))


def test_fingerprint_changes_with_the_data():
    train, test = load_dataset(split="train"), load_dataset(split="test")
    assert fingerprint(train) == fingerprint(load_dataset(split="train"))
    assert fingerprint(train) != fingerprint(test)
    with pytest.raises(InvalidArgumentError, match="ImageDataset"):
        fingerprint([1, 2, 3])


def write_fake_mnist(root, n_train=20, n_test=6, side=28):
    """A tiny MNIST copy in torchvision's layout: root/MNIST/raw/*-ubyte, big-endian IDX files."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (torch.arange(n * side * side) % 256).to(torch.uint8).reshape(n, side, side)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        header = struct.pack(">IIII", 0x0803, n, side, side)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.numpy().tobytes())


def test_a_local_mnist_folder_is_read_and_split(tmp_path):
    write_fake_mnist(tmp_path)
    train, val, test = (load_dataset("mnist", split, root=tmp_path, size=16) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (16, 4, 6)  # MNIST's 20 training images split 0.7 : 0.15
    image, label = train[0]
    assert image.shape == (1, 16, 16) and label.dtype == torch.int64 and 0.0 <= image.min() <= image.max() <= 1.0
    assert test.labels.tolist() == [0, 1, 2, 3, 4, 5]
    together = sorted(train.labels.tolist() + val.labels.tolist())
    assert together == sorted(i % 10 for i in range(20))  # train and val split MNIST's training set, no overlap
    again = load_dataset("mnist", "val", root=tmp_path, size=16)
    assert torch.equal(again.images, val.images)


def test_mnist_loaders_keep_the_full_resolution_by_default(tmp_path):
    write_fake_mnist(tmp_path)
    loaders = make_loaders("mnist", root=tmp_path, size=28, batch_size=4)
    assert next(iter(loaders.train))[0].shape == (4, 1, 28, 28)


@pytest.mark.parametrize("images", [torch.zeros(8, 8), torch.zeros(1, 8, 8), [[0.0]]])
def test_resize_refuses_anything_but_a_batch_of_images(images):
    with pytest.raises(InvalidArgumentError, match=r"images must be a tensor of shape \(N, C, H, W\)"):
        resize(images, 16)


@pytest.mark.parametrize("size", [0, 65, 16.0])
def test_resize_refuses_a_bad_size(size):
    with pytest.raises(InvalidArgumentError, match="size"):
        resize(torch.zeros(2, 1, 8, 8), size)


def test_resize_changes_only_the_last_two_dimensions():
    assert resize(torch.rand(2, 1, 8, 8), 16).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_split_seed_is_refused(seed):
    with pytest.raises(InvalidArgumentError, match="seed"):
        split_indices(100, seed=seed)


@pytest.mark.parametrize("eval_batch_size", [0, -1, 2.5, True])
def test_bad_eval_batch_size_is_refused(eval_batch_size):
    with pytest.raises(InvalidArgumentError, match="eval_batch_size"):
        make_loaders(eval_batch_size=eval_batch_size)
