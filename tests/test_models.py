"""Lesson 01's model claims: shapes, parameter counts, a computed flatten size and clear shape errors; and the
utilities every later lesson uses on any model: its device, eval mode restored, unwrapping, copying, input shape."""
import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.nn.utils import prune

from mvtk.errors import InputShapeError, InvalidArgumentError
from mvtk.models import (MLP, MLPv2, SmallCNN, build_model, copy_model, count_parameters, eval_mode, flatten_size,
                         layer_shapes, model_device, sample_shape, unwrap)


def test_mlp_maps_digits_to_ten_logits():
    assert MLP()(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_mlp_parameter_count_is_weights_plus_biases():
    assert count_parameters(MLP(hidden=128)) == 64 * 128 + 128 + 128 * 10 + 10


def test_mlp_v2_has_dropout_active_only_in_training():
    model = MLPv2()
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("size", [16, 28])
def test_cnn_flatten_size_follows_the_input_size(size):
    model = SmallCNN(input_size=size)
    assert model.flat_features == 32 * (size // 2) ** 2
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_cnn_names_the_expected_shape_when_fed_the_wrong_one():
    with pytest.raises(InputShapeError, match=r"expects input of shape \(N, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        SmallCNN()(torch.zeros(2, 3, 16, 16))


def test_mlp_names_the_expected_feature_count():
    with pytest.raises(InputShapeError, match="expects 64 input features per sample, got 256"):
        MLP()(torch.zeros(2, 1, 16, 16))


def test_layer_shapes_lists_every_leaf_layer_in_order():
    rows = layer_shapes(SmallCNN(), (1, 1, 16, 16))
    assert [name for name, _, _ in rows][:2] == ["features.conv1", "features.relu1"]
    assert rows[-1] == ("fc2", "Linear", (1, 10))
    assert ("flatten", "Flatten", (1, 2048)) in rows


def test_layer_shapes_keeps_the_training_mode():
    model = MLPv2().train()
    layer_shapes(model, (1, 1, 8, 8))
    assert model.training


def test_build_model_by_name():
    assert isinstance(build_model("cnn", input_size=16), SmallCNN)
    with pytest.raises(InvalidArgumentError, match=r"unknown model 'resnet'; expected one of \['cnn', 'mlp', 'mlp_v2'\]"):
        build_model("resnet")


@pytest.mark.parametrize("kwargs", [{"hidden": 0}, {"hidden": 1.5}, {"in_features": -1}, {"num_classes": True}])
def test_bad_mlp_sizes_are_refused(kwargs):
    with pytest.raises(InvalidArgumentError):
        MLP(**kwargs)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, "0.2"])
def test_bad_dropout_is_refused(dropout):
    with pytest.raises(InvalidArgumentError, match="dropout"):
        MLPv2(dropout=dropout)


def test_bad_cnn_input_size_is_refused():
    with pytest.raises(InvalidArgumentError, match="input_size"):
        SmallCNN(input_size=1)


def test_count_parameters_refuses_non_modules():
    with pytest.raises(InvalidArgumentError, match="torch.nn.Module"):
        count_parameters({"weight": torch.zeros(3)})


def test_layer_shapes_needs_a_batch_shape():
    with pytest.raises(InvalidArgumentError, match="input_shape"):
        layer_shapes(MLP(), [1, 64])


def test_flatten_size_counts_the_features_of_one_sample():
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.MaxPool2d(2))
    assert flatten_size(features, (1, 16, 16)) == 4 * 8 * 8


@pytest.mark.parametrize("features, input_shape, match", [
    (lambda x: x, (1, 16, 16), "features must be a torch.nn.Module"),
    (torch.nn.Flatten(), [1, 16, 16], "input_shape must be a tuple"),
    (torch.nn.Flatten(), (), "input_shape must be a tuple"),
    (torch.nn.Flatten(), (1, 0, 16), "input_shape must be a tuple"),
])
def test_flatten_size_refuses_bad_input(features, input_shape, match):
    with pytest.raises(InvalidArgumentError, match=match):
        flatten_size(features, input_shape)


def test_flatten_size_names_an_input_shape_the_features_cannot_take():
    with pytest.raises(InputShapeError, match=r"cannot take one input of shape \(3, 16, 16\)"):
        flatten_size(torch.nn.Conv2d(1, 4, 3), (3, 16, 16))


# -- utilities for any nn.Module -----------------------------------------------------------------------------

def test_model_device_is_where_the_parameters_are(mlp):
    assert model_device(mlp) == torch.device("cpu")
    assert model_device(mlp.to("meta")) == torch.device("meta")


def test_model_device_of_a_model_without_parameters_or_buffers_is_the_cpu():
    assert model_device(nn.Sequential(nn.ReLU(), nn.Flatten())) == torch.device("cpu")


def test_model_device_finds_a_buffer_when_there_is_no_parameter():
    model = nn.Module()
    model.register_buffer("scale", torch.ones(1, device="meta"))
    assert model_device(model) == torch.device("meta")


def mixed_modes() -> nn.Module:
    """An MLPv2 in training mode whose dropout alone is in eval mode."""
    model = MLPv2(hidden=16).train()
    model.drop.eval()
    return model


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_eval_mode_restores_every_submodules_own_mode():
    model = mixed_modes()
    before = modes(model)
    with eval_mode(model) as inside:
        assert inside is model and not any(modes(model).values())
    assert modes(model) == before and not model.drop.training


def test_eval_mode_restores_the_modes_after_an_exception():
    model = mixed_modes()
    before = modes(model)
    with pytest.raises(RuntimeError, match="failed inside"), eval_mode(model):
        raise RuntimeError("failed inside")
    assert modes(model) == before


def test_unwrap_returns_the_model_inside_nested_wrappers(mlp):
    assert unwrap(nn.DataParallel(nn.DataParallel(mlp))) is mlp
    assert unwrap(mlp) is mlp


def test_copy_model_copies_a_pruned_model_after_a_training_step(mlp):
    prune.l1_unstructured(mlp.fc1, "weight", amount=0.5)
    cross_entropy(mlp(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()  # weight is now in a graph
    copied = copy_model(mlp)
    x = torch.rand(2, 1, 8, 8)
    assert copied is not mlp and torch.equal(copied(x), mlp(x))
    assert torch.equal(copied.fc1.weight_mask, mlp.fc1.weight_mask)
    with torch.no_grad():
        copied.fc1.weight_orig.zero_()
    assert not torch.equal(copied(x), mlp(x))  # its own weights, not the original's


@pytest.mark.parametrize("model, shape", [(MLP(), (1, 8, 8)), (MLP(in_features=256), (1, 16, 16)),
                                          (SmallCNN(in_channels=3, input_size=28), (3, 28, 28))],
                         ids=["mlp", "mlp-16x16", "cnn-3x28x28"])
def test_sample_shape_of_the_course_models(model, shape):
    assert sample_shape(model) == shape


@pytest.mark.parametrize("model", [MLP(in_features=60), nn.Conv2d(1, 4, 3), nn.Sequential(nn.Flatten())],
                         ids=["not-square", "no-in-features", "plain-sequential"])
def test_sample_shape_refuses_a_model_it_cannot_read(model):
    with pytest.raises(InvalidArgumentError, match="cannot tell the input shape"):
        sample_shape(model)


@pytest.mark.parametrize("helper", [model_device, unwrap, copy_model, sample_shape, lambda x: eval_mode(x).__enter__()],
                         ids=["model_device", "unwrap", "copy_model", "sample_shape", "eval_mode"])
def test_the_model_utilities_refuse_something_that_is_not_a_module(helper):
    with pytest.raises(InvalidArgumentError, match="model must be a torch.nn.Module, got dict"):
        helper({"weight": torch.zeros(1)})
