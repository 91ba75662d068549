"""Issue 15: mvtk's training and compression helpers on models that are not the course's.

A zoo — a regression MLP, a plain nn.Sequential classifier, a CNN with BatchNorm on 1x16x16, a model
with tied weights, a two-input model, torchvision's resnet18 — each through fit/evaluate, pruning,
int8 and distillation. Each helper either works or refuses with an error naming what it assumes.
The 2-process DDP run of a user's function through the launcher is in test_parallel.py
(test_two_process_ddp_of_a_users_function_through_the_launcher: the regression MLP of this zoo).
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mvtk import compress
from mvtk.errors import InvalidArgumentError
from mvtk.train import evaluate, fit


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TiedLM(nn.Module):
    """A tiny next-token model whose output layer shares the embedding's weight (tied weights)."""

    def __init__(self, vocab=12, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.relu(self.hidden(self.embed(tokens))))


class TwoInputs(nn.Module):
    """Two inputs (features and a second view), one classification output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, y):
        return self.head(torch.relu(self.a(x) + self.b(y)))


def regression_mlp(hidden=16):
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def sequential_classifier(hidden=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def bn_cnn(channels=8):
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(channels * 8 * 8, 10))


def resnet18():
    from torchvision.models import resnet18 as build
    return build(weights=None, num_classes=10)


def loader_of(*tensors, batch_size=16):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def data_for(name, n=48):
    g = torch.Generator().manual_seed(1)
    if name == "regression_mlp":
        x = torch.randn(n, 8, generator=g)
        return loader_of(x, x[:, :4].sum(dim=1))                       # float targets (N,)
    if name == "sequential":
        x = torch.rand(n, 1, 8, 8, generator=g)
        return loader_of(x, (x.mean(dim=(1, 2, 3)) * 20).long().clamp(0, 9))
    if name == "bn_cnn":
        x = torch.rand(n, 1, 16, 16, generator=g)
        return loader_of(x, (x[:, 0, :8].mean(dim=(1, 2)) * 20).long().clamp(0, 9))
    if name == "tied":
        tokens = torch.randint(0, 12, (n,), generator=g)
        return loader_of(tokens, (tokens + 1) % 12)                     # integer inputs
    if name == "two_inputs":
        x, y = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
        labels = (x[:, 0] + y[:, 0] > 0).long() + (x[:, 1] > 1).long()
        return DataLoader([((x[i], y[i]), labels[i]) for i in range(n)], batch_size=16)
    if name == "resnet18":
        return loader_of(torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), batch_size=2)
    raise KeyError(name)


ZOO = {"regression_mlp": regression_mlp, "sequential": sequential_classifier, "bn_cnn": bn_cnn, "tied": TiedLM,
       "two_inputs": TwoInputs, "resnet18": resnet18}
TASK = {name: "classification" for name in ZOO} | {"regression_mlp": "regression"}


def outputs(model, loader):
    inputs = next(iter(loader))[0]
    with torch.no_grad():
        return model.eval()(*inputs) if isinstance(inputs, (tuple, list)) else model.eval()(inputs)


# --- fit and evaluate -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_trains_with_fit_and_reports_its_tasks_metrics(name):
    model, loader = ZOO[name](), data_for(name)
    epochs = 1 if name == "resnet18" else 8
    history = fit(model, loader, loader, epochs=epochs, progress=False,
                  optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    result = evaluate(model, loader)
    assert result.task == TASK[name] and history.epochs == epochs
    if TASK[name] == "regression":
        assert history.val_acc == [] and result.accuracy is None and history.val_mse[-1] < history.val_mse[0]
    else:
        assert history.val_mse == [] and 0 <= result.accuracy <= 1 and result.mse is None
        if name != "resnet18":
            assert history.train_loss[-1] < history.train_loss[0]


def test_a_classifier_given_float_targets_is_refused_by_name():
    loader = loader_of(torch.rand(8, 1, 8, 8), torch.rand(8, 1))
    with pytest.raises(InvalidArgumentError, match=r"regression outputs of shape \(8, 10\) do not match targets"):
        evaluate(sequential_classifier(), loader)


# --- pruning and int8 -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_prunes_and_keeps_working(name):
    model, loader = ZOO[name](), data_for(name)
    compress.make_permanent(compress.prune_global(model, 0.5))
    assert compress.sparsity(model) > 0.3
    assert torch.isfinite(outputs(model, loader)).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_quantizes_its_linear_layers_to_int8(name):
    model, loader = ZOO[name](), data_for(name)
    expected = outputs(model, loader)
    int8 = compress.quantize_int8(model)
    got = outputs(int8, loader)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max() + 0.05
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in int8.modules() if isinstance(m, nn.Linear))


def test_pruning_a_tied_weight_masks_every_layer_that_holds_it_and_keeps_them_tied():
    model = TiedLM()
    compress.prune_layer(model, "out", 0.5)
    assert torch.equal(model.embed.weight, model.out.weight) and (model.out.weight == 0).float().mean() == 0.5
    compress.make_permanent(model)
    assert model.embed.weight is model.out.weight  # one parameter again, as before pruning
    assert len(list(model.parameters())) == len(list(TiedLM().parameters()))


def test_global_pruning_ranks_a_tied_weight_once():
    model = TiedLM()
    compress.make_permanent(compress.prune_global(model, 0.5))
    assert model.embed.weight is model.out.weight
    weights = torch.cat([model.embed.weight.flatten(), model.hidden.weight.flatten()])
    assert (weights == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_drop_pruned_neurons_takes_the_activation_between_the_layers():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    compress.prune_neurons(model, "0", 0.5)
    x = torch.randn(5, 8)
    smaller = compress.drop_pruned_neurons(model, "0", "2", activation=torch.tanh)
    assert smaller[0].out_features == 8 and torch.allclose(smaller(x), model(x), atol=1e-5)


def test_int8_refuses_a_model_without_linear_layers():
    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(InvalidArgumentError, match="has no nn.Linear layer to quantize"):
        compress.quantize_int8(convs)


@pytest.mark.parametrize("name, match", [
    ("two_inputs", "loader yields 2 tensors"),
    ("tied", "torch.int64 tensor"),
])
def test_measure_refuses_a_model_that_does_not_take_one_float_input(name, match, tmp_path):
    with pytest.raises(InvalidArgumentError, match=f"measure times a model of one float input tensor.*{match}"):
        compress.measure(ZOO[name](), data_for(name), tmp_path, name, repeats=1, warmup=1)


def test_measure_reports_mse_for_a_regression_model(tmp_path):
    row = compress.measure(regression_mlp(), data_for("regression_mlp"), tmp_path, "reg", repeats=1, warmup=1)
    assert row.mse > 0 and row.accuracy != row.accuracy  # accuracy is nan: not a classifier


# --- distillation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["regression_mlp", "sequential", "bn_cnn", "two_inputs", "tied"])
def test_every_zoo_model_distills_into_a_copy_of_itself(name):
    teacher, loader = ZOO[name](), data_for(name)
    fit(teacher, loader, epochs=5, progress=False, optimizer=torch.optim.Adam(teacher.parameters(), lr=1e-2))
    torch.manual_seed(1)
    student = ZOO[name]()
    teacher_before = copy.deepcopy(teacher.state_dict())
    losses = compress.distill(student, teacher, loader, epochs=6, progress=False)
    assert all(loss >= 0 for loss in losses) and losses[-1] < losses[0]
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


def test_a_resnet18_student_distills_from_a_resnet18_teacher_for_one_step():
    teacher, student = resnet18(), resnet18()
    losses = compress.distill(student, teacher, data_for("resnet18"), epochs=1, progress=False)
    assert len(losses) == 1 and losses[0] >= 0


def test_distilling_a_classifier_into_a_regression_student_is_refused():
    with pytest.raises(InvalidArgumentError, match="differ in shape"):
        compress.distill(regression_mlp(), nn.Sequential(nn.Linear(8, 10)), data_for("regression_mlp"), epochs=1,
                         progress=False)
