"""Lesson 04, §2 and §5: versions count up and are never reused, lookups list what exists, lineage follows parents."""
import pickle

import pytest
import torch

from mvtk.errors import InvalidArgumentError, NotFoundError, RegistryError
from mvtk.registry import Registry


def blob_files(reg):
    return sorted(p.name for p in (reg.root / "blobs").glob("*/*.safetensors"))


def test_versions_count_up_from_one_per_name(registry, seeded_mlp):
    numbers = [registry.register("a", seeded_mlp(i)).version for i in range(3)]
    assert numbers == [1, 2, 3]
    assert registry.register("b", seeded_mlp(0)).version == 1
    assert registry.names() == ["a", "b"]


def test_version_numbers_are_never_reused_after_a_delete(registry, seeded_mlp):
    registry.register("a", seeded_mlp(0))
    registry.register("a", seeded_mlp(1))
    registry.delete_version("a", 2)
    assert registry.register("a", seeded_mlp(2)).version == 3
    assert [v.version for v in registry.versions("a")] == [1, 3]


def test_identical_weights_are_stored_once(registry, mlp):
    first = registry.register("a", mlp)
    second = registry.register("b", mlp)
    assert first.sha256 == second.sha256
    assert len(blob_files(registry)) == 1


def test_delete_removes_a_blob_only_when_no_version_uses_it(registry, seeded_mlp):
    registry.register("a", seeded_mlp(0))
    registry.register("b", seeded_mlp(0))
    registry.register("b", seeded_mlp(1))
    registry.delete_version("a", 1)
    assert len(blob_files(registry)) == 2  # b v1 still uses the shared blob
    registry.delete_version("b", 2)
    assert len(blob_files(registry)) == 1


def test_load_returns_the_registered_tensors_in_their_order(registry, mlp):
    state = mlp.state_dict()
    registry.register("m", state)
    loaded = registry.load("m")
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_get_without_version_returns_the_latest(three_versions):
    assert three_versions.get("m").version == 3


def test_get_by_alias_or_name_at_alias(registry, seeded_mlp):
    registry.register("m", seeded_mlp(0))
    registry.register("m", seeded_mlp(1))
    registry.set_alias("m", "production", 1)
    assert registry.get("m", alias="production").version == 1
    assert registry.get("m@production").version == 1
    assert torch.equal(registry.load("m@production")["fc1.weight"], seeded_mlp(0).fc1.weight)


def test_unknown_name_error_lists_the_names(registry, mlp):
    registry.register("digits", mlp)
    with pytest.raises(NotFoundError, match="no model named 'digit'.*names: digits"):
        registry.get("digit")


def test_unknown_version_error_lists_the_versions(three_versions):
    with pytest.raises(NotFoundError, match="no version 7; its versions: 1-3"):
        three_versions.get("m", 7)


def test_unknown_alias_error_lists_the_aliases(registry, mlp):
    registry.register("m", mlp)
    registry.set_alias("m", "staging", 1)
    with pytest.raises(NotFoundError, match=r"no alias 'prod'; its aliases: staging -> v1"):
        registry.get("m", alias="prod")


def test_a_version_and_an_alias_together_are_refused(three_versions):
    three_versions.set_alias("m", "production", 1)
    with pytest.raises(InvalidArgumentError, match="not both"):
        three_versions.get("m", version=1, alias="production")


@pytest.mark.parametrize("version", [0, "2", True])
def test_a_version_that_is_not_a_version_number_is_refused(three_versions, version):
    with pytest.raises(InvalidArgumentError, match=r"version must be a version number \(an int\) in \[1, "):
        three_versions.get("m", version)


def test_lineage_follows_the_parents_oldest_first(three_versions, seeded_mlp):
    three_versions.register("m", seeded_mlp(10), parent=2)
    three_versions.register("m", seeded_mlp(11), parent=4)
    assert [v.version for v in three_versions.lineage("m", 5)] == [2, 4, 5]


def test_a_parent_must_exist(registry, seeded_mlp):
    registry.register("m", seeded_mlp(0))
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.register("m", seeded_mlp(1), parent=9)


def test_a_registry_pickles_as_its_folder_for_worker_processes(three_versions):
    copy = pickle.loads(pickle.dumps(three_versions))
    assert copy.root == three_versions.root and copy.get("m").version == 3


def test_opening_a_folder_without_a_registry_can_be_refused(tmp_path):
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(tmp_path / "nothing", create=False)
