"""Lesson 01's model claims: shapes, parameter counts, a computed flatten size and clear shape errors."""
import pytest
import torch

from mvtk.errors import InputShapeError, InvalidArgumentError
from mvtk.models import MLP, MLPv2, SmallCNN, build_model, count_parameters, flatten_size, layer_shapes


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
