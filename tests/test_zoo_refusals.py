"""Users' scenarios an outside replay found refused with a bare error: int8 weights in safetensors and the
registry, two-input models in predict_logits and save_exported, and checkpoints of DataParallel/DDP wrappers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mvtk.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from mvtk.compress import quantize_int8
from mvtk.errors import ArchitectureMismatchError, InvalidArgumentError
from mvtk.export import load_exported, predict_logits, save_exported
from mvtk.models import MLP
from mvtk.parallel import wrap_data_parallel
from mvtk.registry import Registry

INT8_REFUSAL = r"Int8Tensor.*float model.*quantize"


def float_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class TwoInput(nn.Module):
    """forward(a, b): two tensors in, one out."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


# --- int8 (torchao) weights: safetensors stores plain tensors only ---------------------------------------

def test_save_weights_refuses_an_int8_model_naming_its_tensor_subclass_and_the_fix(tmp_path):
    with pytest.raises(InvalidArgumentError, match=INT8_REFUSAL):
        save_weights(tmp_path / "int8.safetensors", quantize_int8(float_model()))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_the_fixes_it_names_work_float_weights_quantized_after_loading_or_a_checkpoint(tmp_path):
    model, x = float_model(), torch.rand(5, 8)
    save_weights(tmp_path / "float.safetensors", model)
    loaded = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    load_weights(tmp_path / "float.safetensors", loaded)
    assert torch.equal(quantize_int8(loaded)(x), quantize_int8(model)(x))

    int8 = quantize_int8(model)
    save_checkpoint(tmp_path / "int8.pt", int8, epoch=0)
    again = quantize_int8(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    load_checkpoint(tmp_path / "int8.pt", again)
    assert torch.equal(again(x), int8(x))


class Net(nn.Module):
    """A user's model that keeps its constructor argument, so the registry can record how to rebuild it."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("program", [False, True], ids=["weights", "program_example"])
@pytest.mark.parametrize("build", [Net, MLP], ids=["user_class", "course_model"])
def test_the_registry_refuses_int8_weights_naming_the_subclass_not_the_recipe(tmp_path, program, build):
    torch.manual_seed(0)
    int8 = quantize_int8(build())
    example = {"program_example": (torch.rand(2, 1, 8, 8),)} if program else {}
    with Registry(tmp_path / "registry") as registry:
        with pytest.raises(InvalidArgumentError, match=INT8_REFUSAL):
            registry.register("int8", int8, **example)
        with pytest.raises(InvalidArgumentError, match=INT8_REFUSAL):
            registry.register("int8", int8.state_dict())
        assert registry.names() == []
        assert registry.register("float", build(), **example).version == 1  # the fix it names


# --- a model with two inputs ------------------------------------------------------------------------------

def test_predict_logits_refuses_a_two_input_model_naming_its_one_input_assumption():
    with pytest.raises(InvalidArgumentError, match="assume one input tensor"):
        predict_logits(TwoInput(), torch.rand(4, 4))
    with pytest.raises(InvalidArgumentError, match="assume one input tensor"):
        predict_logits(TwoInput(), (torch.rand(4, 4), torch.rand(4, 3)))


def test_save_exported_takes_a_tuple_of_inputs_and_load_exported_runs_it(tmp_path):
    torch.manual_seed(0)
    model, a, b = TwoInput().eval(), torch.rand(4, 4), torch.rand(4, 3)
    path = save_exported(model, (a, b), tmp_path / "two.pt2")
    loaded = load_exported(path)
    torch.testing.assert_close(loaded(a, b), model(a, b))
    torch.testing.assert_close(loaded(a[:3], b[:3]), model(a[:3], b[:3]))  # the batch stays dynamic
    with pytest.raises(InvalidArgumentError, match="example"):
        save_exported(model, (a, "b"), tmp_path / "bad.pt2")


# --- checkpoints of DataParallel / DDP wrappers -----------------------------------------------------------

def test_a_wrapped_models_checkpoint_loads_into_a_plain_model_and_back(tmp_path, mlp):
    x = torch.rand(3, 1, 8, 8)
    wrapped = wrap_data_parallel(mlp, "cpu")  # keys start with 'module.'
    save_checkpoint(tmp_path / "dp.pt", wrapped, epoch=1)
    plain = MLP(hidden=16)
    load_checkpoint(tmp_path / "dp.pt", plain)
    assert torch.equal(plain(x), mlp(x))

    save_checkpoint(tmp_path / "plain.pt", mlp, epoch=1)  # the reverse: plain keys into a wrapper
    target = wrap_data_parallel(MLP(hidden=16), "cpu")
    load_checkpoint(tmp_path / "plain.pt", target)
    assert torch.equal(target(x), mlp(x))


def test_keys_that_fit_as_they_are_are_not_stripped(tmp_path, mlp):
    holder = nn.Module()  # a plain model whose own layer is called `module`
    holder.module = mlp
    save_checkpoint(tmp_path / "holder.pt", holder, epoch=1)
    other = nn.Module()
    other.module = MLP(hidden=16)
    load_checkpoint(tmp_path / "holder.pt", other)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), holder.state_dict().values()))


def test_a_prefixed_checkpoint_of_another_architecture_is_still_refused_with_the_hint(tmp_path, mlp):
    save_checkpoint(tmp_path / "wide.pt", wrap_data_parallel(MLP(hidden=32), "cpu"), epoch=1)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ArchitectureMismatchError, match="hint: keys start with 'module.'"):
        load_checkpoint(tmp_path / "wide.pt", mlp)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
