"""Lesson 04, §4: a diff names tensors added, removed and reshaped, the relative change, metric and param deltas."""
import pytest
import torch

from mvtk.models import MLP, MLPv2


def test_diff_lists_added_removed_and_reshaped_tensors(registry):
    registry.register("m", MLP())
    registry.register("m", MLPv2())
    diff = registry.diff("m", 1, 2)
    assert diff.added == ["fc3.weight", "fc3.bias"]
    assert diff.reshaped == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert diff.removed == [] and diff.architecture_changed
    assert registry.diff("m", 2, 1).removed == ["fc3.weight", "fc3.bias"]


def test_diff_relative_change_is_the_norm_of_the_change_over_the_norm(registry, mlp):
    before = mlp.fc1.weight.detach().clone()
    registry.register("m", mlp)
    with torch.no_grad():
        mlp.fc1.weight.mul_(1.1)
    registry.register("m", mlp, parent=1)
    diff = registry.diff("m", 1, 2)
    expected = ((mlp.fc1.weight - before).norm() / before.norm()).item()
    assert diff.relative_change["fc1.weight"] == pytest.approx(expected, rel=1e-6)
    assert diff.changed == ["fc1.weight"] and diff.relative_change["fc2.bias"] == 0.0


def test_diff_shows_metric_and_param_deltas(registry, seeded_mlp):
    registry.register("m", seeded_mlp(0), metrics={"acc": 0.90, "loss": 0.4}, params={"lr": 0.01, "opt": "adam"})
    registry.register("m", seeded_mlp(1), metrics={"acc": 0.95}, params={"lr": 0.01, "opt": "sgd"})
    diff = registry.diff("m", 1, 2)
    assert diff.metric_deltas == {"acc": pytest.approx(0.05), "loss": None}
    assert diff.param_changes == {"opt": ("adam", "sgd")}


def test_diff_accepts_alias_names_and_renders_as_text_and_html(three_versions):
    three_versions.set_alias("m", "production", 1)
    diff = three_versions.diff("m", "production", 3)
    text, page = str(diff), diff._repr_html_()
    assert text.startswith("m: v1 -> v3") and "fc1.weight" in text and "rel. change" in text
    assert "<table>" in page and "fc1.weight" in page
