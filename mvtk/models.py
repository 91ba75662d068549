"""The course's models: an MLP, an MLP v2 with dropout, and a small CNN (Lesson 01).

Layers are named (fc1, fc2, conv1, ...) rather than numbered, so state_dict keys read well
in checkpoints (Lesson 03) and registry diffs (Lesson 04).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune

from mvtk.errors import (InputShapeError, InvalidArgumentError, check_int, check_module, check_number,
                         check_positive_int)

__all__ = [
    "NUM_CLASSES", "MLP", "MLPv2", "SmallCNN", "MODELS", "build_model", "count_parameters", "flatten_size",
    "layer_shapes", "model_device", "eval_mode", "unwrap", "MODULE_PREFIX", "strip_module_prefix", "copy_model",
    "sample_shape", "remember_init_args",
]

NUM_CLASSES = 10  # the digits data set's classes (mvtk.data.NUM_CLASSES; a test keeps the two equal)


def remember_init_args(cls: type) -> type:
    """Class decorator: each instance keeps the arguments it was built with as `init_args` (Lesson 01, §5).

    Opt-in, like Lightning's `save_hyperparameters`: `@remember_init_args` above `class Net(nn.Module)`
    makes `Net(hidden=8).init_args == {"hidden": 8, ...}` (defaults included, positional arguments
    named), which the registry records so `load_model` can rebuild the class (Lesson 04). Only the
    decorated class records: an undecorated subclass gets no `init_args` rather than its parent's.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise InvalidArgumentError(f"remember_init_args decorates an nn.Module class, got {cls!r}")
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is cls:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:  # *args cannot be passed back by name: leave init_args unset rather than wrong
                        return
                else:
                    recorded[name] = value
            self.init_args = recorded

    cls.__init__ = __init__
    return cls


@remember_init_args
class MLP(nn.Module):
    """A one-hidden-layer perceptron: flatten -> Linear(in, hidden) -> ReLU -> Linear(hidden, classes).

    Lesson 01, §5. Input: (N, 1, 8, 8) digits, or anything with `in_features` values per sample.
    """

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        _check_positive(in_features=in_features, hidden=hidden, num_classes=num_classes)
        self.in_features = in_features
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        _check_features(x, self.in_features, type(self).__name__)
        return self.fc2(self.act(self.fc1(x)))


@remember_init_args
class MLPv2(nn.Module):
    """Version 2 of the MLP: wider, two hidden layers, dropout after each (Lesson 01, §5; Lesson 04)."""

    def __init__(self, in_features: int = 64, hidden: int = 256, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.2):
        super().__init__()
        _check_positive(in_features=in_features, hidden=hidden, num_classes=num_classes)
        check_number(dropout, "dropout", low=0, high=1, high_open=True, what="a probability")
        self.in_features = in_features
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, num_classes)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        _check_features(x, self.in_features, type(self).__name__)
        x = self.drop(self.act(self.fc1(x)))
        x = self.drop(self.act(self.fc2(x)))
        return self.fc3(x)


@remember_init_args
class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers, for 1 x 16 x 16 digits.

    Lesson 01, §6. The flatten size is computed from `input_size`, never hard-coded.
    """

    def __init__(self, in_channels: int = 1, input_size: int = 16, num_classes: int = NUM_CLASSES,
                 channels: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, hidden=hidden,
                        conv1_channels=channels[0], conv2_channels=channels[1])
        check_int(input_size, "input_size (pixels per side)", low=2)
        self.input_shape = (in_channels, input_size, input_size)
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1))
        self.features.add_module("relu1", nn.ReLU())
        self.features.add_module("conv2", nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1))
        self.features.add_module("relu2", nn.ReLU())
        self.features.add_module("pool", nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.flat_features = flatten_size(self.features, self.input_shape)
        self.fc1 = nn.Linear(self.flat_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputShapeError(
                f"SmallCNN expects input of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}; build it with in_channels/input_size that match your images")
        x = self.flatten(self.features(x))
        return self.fc2(self.act(self.fc1(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "mlp_v2": MLPv2, "cnn": SmallCNN}


def build_model(name: str, **kwargs) -> nn.Module:
    """A course model by name ('mlp', 'mlp_v2', 'cnn'); kwargs go to its constructor (Lesson 05, §4; Lesson 06, §1)."""
    if name not in MODELS:
        raise InvalidArgumentError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of scalar parameters in `model` (Lesson 01, §3)."""
    return sum(p.numel() for p in check_module(model).parameters() if p.requires_grad or not trainable_only)


def flatten_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many values `features` outputs per sample for one input of `input_shape` (Lesson 01, §6).

    `input_shape` is one sample's shape, without the batch dimension, e.g. (1, 16, 16).
    """
    check_module(features, "features")
    if (not isinstance(input_shape, tuple) or not input_shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)):
        raise InvalidArgumentError(
            f"input_shape must be a tuple of positive ints without the batch dimension, got {input_shape!r}")
    try:
        with torch.no_grad():
            return int(features(torch.zeros(1, *input_shape)).numel())
    except RuntimeError as exc:
        raise InputShapeError(f"features cannot take one input of shape {input_shape}: {exc}") from exc


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, layer type, output shape) for every leaf layer, from one forward pass (Lesson 01, §5, §6).

    `input_shape` includes the batch dimension, e.g. (1, 1, 16, 16).
    """
    check_module(model)
    if not isinstance(input_shape, tuple) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise InvalidArgumentError(f"input_shape must be a tuple of positive ints with the batch first, got {input_shape!r}")
    rows, hooks = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(
                lambda mod, _inp, out, name=name: rows.append((name, type(mod).__name__, tuple(out.shape)))))
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(*input_shape, device=model_device(model)))
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def _check_features(x: torch.Tensor, expected: int, model_name: str) -> None:
    if x.shape[-1] != expected:
        raise InputShapeError(f"{model_name} expects {expected} input features per sample, got {x.shape[-1]} "
                              f"(input flattened to {tuple(x.shape)})")


def _check_positive(**values) -> None:
    for name, value in values.items():
        check_positive_int(value, name)


# -- utilities for any nn.Module, used by every later lesson -------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter or buffer; the CPU for a model that has neither (Lesson 01, §3)."""
    for tensor in (*check_module(model).parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block, then give every submodule back its own train/eval flag (Lesson 01, §3)."""
    modes = [(module, module.training) for module in check_module(model).modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside an nn.DataParallel / DistributedDataParallel wrapper, else `model` (Lesson 05, §3)."""
    while isinstance(check_module(model), (nn.DataParallel, DistributedDataParallel)):
        model = model.module
    return model


MODULE_PREFIX = "module."  # what DataParallel and DDP put in front of every state_dict key


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """A copy of `state_dict` without the `module.` prefix wrappers add; the input is unchanged (Lessons 03, 05)."""
    if not isinstance(state_dict, Mapping):
        raise InvalidArgumentError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    stripped = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # per-module versions load_state_dict reads
        stripped._metadata = OrderedDict(state_dict._metadata)
    consume_prefix_in_state_dict_if_present(stripped, MODULE_PREFIX)  # PyTorch's own fix, applied to the copy
    return stripped


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of `model` that also works for a pruned model after a training step (Lessons 06 and 07).

    A pruned layer's `weight` is recomputed each forward; after a training step it is part of an
    autograd graph, which deepcopy refuses. It is recomputed without gradients first.
    """
    with torch.no_grad():
        for module in check_module(model).modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))
    return copy.deepcopy(model)


def sample_shape(model: nn.Module) -> tuple[int, ...]:
    """One input sample's shape for a course model: SmallCNN's input_shape, or (1, s, s) for an MLP (Lesson 07, §7)."""
    if hasattr(check_module(model), "input_shape"):
        return tuple(model.input_shape)
    features = getattr(model, "in_features", None)
    side = int(round(features ** 0.5)) if isinstance(features, int) else 0
    if side * side != features:
        raise InvalidArgumentError(f"cannot tell the input shape of {type(model).__name__}; pass input_shape=(C, H, W)")
    return (1, side, side)
