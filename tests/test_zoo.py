"""Issue 15: mvtk's saving, registry and export helpers on models that are not the course's.

Each model of the zoo goes through save/load, checkpoint and resume, register/load/diff/rollback,
export/import between registries, ONNX export with Runtime parity, and a Predictor. Each step either
works or is refused with an error that names the assumption; each test asserts which. (Training,
compression, distillation and DDP on the zoo: tests/test_zoo_training.py.)
"""
from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from notebook_utils import ROOT
from mvtk.checkpoint import (ModelCheckpoint, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                             save_weights)
from mvtk.errors import ExportError, InvalidArgumentError
from mvtk.export import Prediction, Predictor, check_parity, export_onnx, load_session
from mvtk.models import remember_init_args
from mvtk.registry import Registry


@remember_init_args
class RegressionMLP(nn.Module):
    """A regression net: 6 features in, 1 value out."""

    def __init__(self, features: int = 6, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


@remember_init_args
class BatchNormCNN(nn.Module):
    """A CNN with BatchNorm on 1 x 16 x 16 input, 4 classes."""

    def __init__(self, channels: int = 4, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(channels * 4, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


@remember_init_args
class TiedAutoencoder(nn.Module):
    """Encoder and decoder share one weight matrix (tied weights)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.encoder = nn.Linear(size, size)
        self.decoder = nn.Linear(size, size)
        self.decoder.weight = self.encoder.weight

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


@remember_init_args
class TwoInput(nn.Module):
    """Two inputs: an image-like tensor and a feature vector."""

    def __init__(self, features: int = 3):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(features, 2)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


def sequential():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def resnet18():
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=4)


# name -> (build, example inputs, kind); kind: "classifier" or "regression"
ZOO = {
    "regression_mlp": (RegressionMLP, lambda: (torch.rand(4, 6),), "regression"),
    "sequential": (sequential, lambda: (torch.rand(4, 5),), "classifier"),
    "batchnorm_cnn": (BatchNormCNN, lambda: (torch.rand(4, 1, 16, 16),), "classifier"),
    "tied_weights": (TiedAutoencoder, lambda: (torch.rand(4, 8),), "regression"),
    "two_input": (TwoInput, lambda: (torch.rand(4, 4), torch.rand(4, 3)), "classifier"),
    "resnet18": (resnet18, lambda: (torch.rand(2, 3, 32, 32),), "classifier"),
}
NEEDS_PROGRAM = {"sequential", "resnet18"}  # no record of their constructor arguments: a torch.export program


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]()


def example(name: str) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(100)
    return ZOO[name][1]()


def outputs(model: nn.Module, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*inputs)


def train_step(model: nn.Module, optimizer, inputs) -> None:
    model.train()
    optimizer.zero_grad()
    model(*inputs).float().pow(2).mean().backward()
    optimizer.step()


def register(registry: Registry, name: str, model: nn.Module, **kwargs):
    program = {"program_example": example(name)} if name in NEEDS_PROGRAM else {}
    return registry.register(name, model, **program, **kwargs)


@pytest.mark.parametrize("name", list(ZOO))
def test_save_and_load_restore_the_same_outputs(name, tmp_path):
    model, inputs = build(name), example(name)
    save_checkpoint(tmp_path / "c.pt", model, epoch=1)
    save_weights(tmp_path / "w.safetensors", model)
    for load in (lambda m: load_checkpoint(tmp_path / "c.pt", m), lambda m: load_weights(tmp_path / "w.safetensors", m)):
        fresh = build(name, seed=1)
        load(fresh)
        torch.testing.assert_close(outputs(fresh, inputs), outputs(model, inputs))
    if name == "tied_weights":
        assert fresh.decoder.weight is fresh.encoder.weight  # still tied after loading


@pytest.mark.parametrize("name", list(ZOO))
def test_checkpoint_and_resume_restore_model_and_optimizer(name, tmp_path):
    model, inputs = build(name), example(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    saver = ModelCheckpoint(tmp_path / "ckpt", model, optimizer, monitor=None)
    for epoch in (1, 2):
        train_step(model, optimizer, inputs)
        saver(epoch, {})
    resumed = build(name, seed=1)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    meta = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"), resumed, resumed_opt)
    assert meta["epoch"] == 2
    train_step(model, optimizer, inputs)
    train_step(resumed, resumed_opt, inputs)  # the same step from the restored Adam state
    torch.testing.assert_close(outputs(resumed, inputs), outputs(model, inputs))


@pytest.mark.parametrize("name", list(ZOO))
def test_register_load_diff_rollback(name, tmp_path):
    model, inputs = build(name), example(name)
    with Registry(tmp_path / "reg") as registry:
        v1 = register(registry, name, model)
        with torch.no_grad():
            next(model.parameters()).add_(0.1)
        register(registry, name, model, parent=v1.version)
        registry.set_alias(name, "production", 1)
        registry.set_alias(name, "production", 2)
        assert registry.rollback(name, "production").version == 1
        loaded = registry.load_model(f"{name}@production")
        torch.testing.assert_close(outputs(loaded, inputs), outputs(build(name), inputs))
        diff = registry.diff(name, 1, 2)
        assert len(diff.changed) >= 1 and not diff.architecture_changed and not diff.layers


def test_a_model_without_a_recorded_recipe_needs_a_program(tmp_path):
    with Registry(tmp_path / "reg") as registry:
        with pytest.raises(Exception, match="pass init_args=.*program_example="):
            registry.register("sequential", build("sequential"))


def test_a_diff_shows_a_dropout_added_between_versions(tmp_path):
    x = (torch.rand(2, 5),)
    with Registry(tmp_path / "reg") as registry:
        torch.manual_seed(0)
        registry.register("m", nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2)), program_example=x)
        torch.manual_seed(0)
        registry.register("m", nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.3), nn.Linear(3, 2)), program_example=x)
        diff = registry.diff("m", 1, 2)
        assert diff.architecture_changed and "Dropout(p=0.3" in str(diff)


@pytest.mark.parametrize("name", list(ZOO))
def test_export_and_import_between_registries(name, tmp_path):
    model, inputs = build(name), example(name)
    with Registry(tmp_path / "a") as source, Registry(tmp_path / "b") as target:
        register(source, name, model)
        source.set_alias(name, "production", 1)
        target.register(name, build(name, seed=3).state_dict())  # the target has the name already
        result = target.import_versions(source.export_versions(tmp_path / "bundle"))
        assert result.versions == {name: {1: 2}}
        torch.testing.assert_close(outputs(target.load_model(name, 2), inputs), outputs(model, inputs))


ONE_INPUT = [n for n in ZOO if n != "two_input"]


@pytest.mark.parametrize("name", ONE_INPUT)
def test_onnx_export_agrees_with_onnx_runtime_and_serves_behind_a_predictor(name, tmp_path):
    model, (x,) = build(name), example(name)
    path = export_onnx(model, x, tmp_path / "m.onnx")
    session = load_session(path)
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    assert check_parity(model, session, x).samples == len(x)

    classifier = ZOO[name][2] == "classifier"
    predictor = Predictor(path, task="classification" if classifier else "regression")
    assert predictor.input_shape == tuple(x.shape[1:]) and predictor.value_range is None  # from the example
    predictor.predict(x * 10)  # no [0, 1] range is assumed
    expected = outputs(model, (x,)).numpy()
    np.testing.assert_allclose(predictor.outputs(x), expected, rtol=1e-3, atol=1e-5)  # raw outputs, always
    result = predictor.predict(x)
    if classifier:
        assert isinstance(result, Prediction) and (result.labels == expected.argmax(axis=1)).all()
    else:
        np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-5)


def test_predictor_from_model_records_the_task_in_the_file(tmp_path):
    model, (x,) = build("sequential"), example("sequential")
    Predictor.from_model(model, x, tmp_path / "m.onnx", task="classification")
    served = Predictor(tmp_path / "m.onnx")  # the task comes back from the file
    assert served.task == "classification"
    assert (served.predict(x).labels == outputs(model, (x,)).argmax(1).numpy()).all()
    assert Predictor(tmp_path / "m.onnx", postprocess=None).predict(x).shape == (4, 3)


ONE_INPUT_ASSUMED = (r"TwoInput takes more than one input \((forward\(a, b\)|2 example inputs)\); export_onnx, "
                     r"check_parity and Predictor assume one input tensor: export it with torch.onnx.export")


def test_the_two_input_model_is_refused_by_onnx_export_and_predictor_naming_their_one_input_assumption(tmp_path):
    model, inputs = build("two_input"), example("two_input")
    refusals = {
        "export_onnx, one example": lambda: export_onnx(model, inputs[0], tmp_path / "m.onnx"),
        "export_onnx, both examples": lambda: export_onnx(model, inputs, tmp_path / "m.onnx"),
        "Predictor.from_model": lambda: Predictor.from_model(model, inputs, tmp_path / "m.onnx"),
    }
    with Registry(tmp_path / "reg") as registry:
        registry.register("two", model)
        refusals["Predictor.from_registry"] = lambda: Predictor.from_registry(
            registry, "two", version=1, cache_dir=tmp_path / "cache", example=inputs[0])
        for call in refusals.values():
            with pytest.raises(InvalidArgumentError, match=ONE_INPUT_ASSUMED):
                call()
    assert not list(tmp_path.glob("*.onnx*")) and not list((tmp_path / "cache").glob("*.onnx"))  # nothing written

    # The way the message points to: torch.onnx.export with both inputs. ONNX Runtime runs that graph;
    # mvtk's one-input helpers refuse it by name instead of feeding it one tensor.
    torch.onnx.export(model.eval(), inputs, tmp_path / "two.onnx", dynamo=True, input_names=["a", "b"], verbose=False)
    session = load_session(tmp_path / "two.onnx")
    both = session.run(None, {"a": inputs[0].numpy(), "b": inputs[1].numpy()})[0]
    np.testing.assert_allclose(both, outputs(model, inputs).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ExportError, match=r"two.onnx takes 2 inputs \(a, b\); Predictor serves models with one input"):
        Predictor(tmp_path / "two.onnx")
    with pytest.raises(InvalidArgumentError, match=ONE_INPUT_ASSUMED):
        check_parity(model, session, inputs[0])


def test_predictor_from_registry_needs_an_example_for_a_model_that_is_not_the_courses(tmp_path):
    with Registry(tmp_path / "reg") as registry:
        registry.register("reg", build("regression_mlp"))
        with pytest.raises(InvalidArgumentError, match="pass example="):
            Predictor.from_registry(registry, "reg", version=1, cache_dir=tmp_path / "cache")
        predictor = Predictor.from_registry(registry, "reg", version=1, cache_dir=tmp_path / "cache",
                                            example=example("regression_mlp")[0], value_range=(0, 1))
        assert predictor.task is None and predictor.predict(example("regression_mlp")[0]).shape == (4, 1)


def test_the_readme_section_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use mvtk in your project", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert blocks, "the README's section has no python block"
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # importable, as the registry imports a model's class
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile("\n".join(blocks), "README.md", "exec"), module.__dict__)
