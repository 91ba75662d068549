"""Lesson 02's data claims: the digits load offline, split the same way every time, and bad input is named."""
import pytest
import torch
from torchvision.transforms import v2

from mvtk.data import (ImageDataset, fingerprint, load_dataset, load_digits_tensors, make_loaders,
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
