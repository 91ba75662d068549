"""Lesson 04, §2: a registration records checksum, code, environment, data and recipe, and refuses bad input."""
import subprocess

import pytest
import torch
from torch import nn

from mvtk.data import fingerprint, load_dataset
from mvtk.errors import ArchitectureMismatchError, InvalidArgumentError, RegistryError
from mvtk.files import sha256_file
from mvtk.models import MLP, MLPv2, SmallCNN


def test_register_records_checksum_versions_time_data_and_notes(registry, mlp):
    train = load_dataset("digits", "train")
    mv = registry.register("digits", mlp, metrics={"acc": 0.9}, params={"lr": 3e-3}, tags={"team": "a"},
                           notes="first", dataset=train)
    assert mv.sha256 == sha256_file(registry.blob_path(mv.sha256))
    assert (mv.torch_version, mv.metrics, mv.params, mv.tags, mv.notes) == (
        torch.__version__, {"acc": 0.9}, {"lr": 3e-3}, {"team": "a"}, "first")
    assert mv.data_fingerprint == fingerprint(train)
    assert mv.mvtk_version and mv.created.endswith("+00:00")
    assert registry.get("digits", 1) == mv


def test_describe_prints_every_field_on_its_own_line(registry, mlp):
    mv = registry.register("digits", mlp, metrics={"acc": 0.9}, notes="first")
    lines = mv.describe().splitlines()
    assert lines[0] == "digits v1" and "  metrics: {\"acc\": 0.9}" in lines and "  parent: -" in lines
    assert len(lines) == 17 and lines[-1] == "  signature: -"  # unsigned: no signing key
    assert "  class_path: mvtk.models:MLP" in lines and "  program_sha256: -" in lines


def test_git_commit_of_the_working_tree_is_recorded(registry, mlp, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "train.py").write_text("print('hi')\n")
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "code"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    assert registry.register("digits", mlp).git_commit == head


def test_git_commit_is_none_outside_a_working_tree(registry, mlp, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    assert registry.register("digits", mlp).git_commit is None


@pytest.mark.parametrize("model", [MLP(hidden=16), MLPv2(hidden=32, dropout=0.1), SmallCNN(channels=(4, 8), hidden=16)],
                         ids=["mlp", "mlp_v2", "cnn"])
def test_architecture_is_inferred_and_load_model_rebuilds_it(registry, model):
    registry.register("m", model)
    loaded = registry.load_model("m")
    x = torch.rand(3, 1, 16, 16) if isinstance(model, SmallCNN) else torch.rand(3, 1, 8, 8)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded(x), model.eval()(x))


def test_a_wrapped_model_is_registered_without_the_module_prefix(registry, mlp):
    registry.register("m", nn.DataParallel(mlp))
    assert list(registry.load("m")) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert registry.get("m").architecture == {"name": "mlp",
                                              "kwargs": {"in_features": 64, "hidden": 16, "num_classes": 10}}


def test_load_model_needs_a_recorded_architecture(registry):
    registry.register("m", nn.Linear(4, 2).state_dict())  # the weights alone: no class, no arguments
    with pytest.raises(RegistryError, match="without an architecture"):
        registry.load_model("m")


def test_a_torch_layer_is_rebuilt_from_the_attributes_it_keeps(registry):
    layer = nn.Linear(4, 2)
    mv = registry.register("m", layer)
    assert (mv.class_path, mv.init_args) == ("torch.nn.modules.linear:Linear", {"in_features": 4, "out_features": 2})
    loaded = registry.load_model("m")
    assert type(loaded) is nn.Linear and torch.equal(loaded.weight, layer.weight)


def test_register_refuses_weights_that_do_not_fit_the_architecture(registry, mlp):
    with pytest.raises(ArchitectureMismatchError, match="fc1.weight"):
        registry.register("m", mlp.state_dict(), architecture={"name": "mlp", "kwargs": {"hidden": 32}})


def test_explicit_architecture_lets_a_state_dict_be_rebuilt(registry, mlp):
    registry.register("m", mlp.state_dict(), architecture={"name": "mlp", "kwargs": {"hidden": 16}})
    assert isinstance(registry.load_model("m"), MLP)


def test_a_fingerprint_string_is_accepted_as_the_dataset(registry, mlp):
    fp = fingerprint(load_dataset("digits", "train"))
    assert registry.register("m", mlp, dataset=fp).data_fingerprint == fp


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a@b", "a/b", " a", 3])
def test_a_bad_model_name_is_refused(registry, mlp, name):
    with pytest.raises(InvalidArgumentError, match="model name"):
        registry.register(name, mlp)


@pytest.mark.parametrize("state,match", [({"epoch": 3}, "expected a tensor"), ({}, "empty"), ("weights", "nn.Module")])
def test_something_other_than_weights_is_refused(registry, state, match):
    with pytest.raises(InvalidArgumentError, match=match):
        registry.register("m", state)


@pytest.mark.parametrize("kwargs,match", [
    ({"metrics": {"acc": "high"}}, "metric 'acc'"), ({"metrics": {"acc": float("nan")}}, "finite"),
    ({"params": {"fn": print}}, "JSON"), ({"tags": ["a"]}, "tags must be a dict"), ({"notes": 3}, "notes"),
    ({"dataset": [1, 2]}, "ImageDataset or its fingerprint"), ({"dataset": "abc"}, "64 lowercase hex digits.*'abc'"),
    ({"parent": 0}, "parent"),
    ({"architecture": {"name": "resnet"}}, "architecture must be"),
    ({"architecture": {"name": "mlp", "kwargs": {"depth": 3}}}, "cannot be built")])
def test_bad_metadata_is_refused(registry, mlp, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        registry.register("m", mlp, **kwargs)
    assert registry.names() == []  # nothing was written
