"""Lesson 02's training claims: the loop learns, is repeatable, stops early, and evaluation changes nothing."""
import pytest
import torch

from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import InvalidArgumentError
from mvtk.models import MLP, MLPv2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mvtk.train import History, evaluate, fit, infer_task, train_one_epoch, train_step


@pytest.fixture(scope="module")
def loaders():
    return make_loaders()


def train_mlp(loaders, epochs=20, **kwargs):
    seed_everything(0)
    loaders.train.generator.manual_seed(0)
    model = MLP()
    history = fit(model, loaders.train, loaders.val, epochs=epochs, progress=False, **kwargs)
    return model, history


def test_the_mlp_reaches_95_percent_on_the_test_set(loaders):
    model, _ = train_mlp(loaders)
    assert evaluate(model, loaders.test).accuracy >= 0.95


def test_training_is_repeatable_with_the_same_seed(loaders):
    _, first = train_mlp(loaders, epochs=3)
    _, again = train_mlp(loaders, epochs=3)
    assert first == again


def test_history_records_every_epoch_and_round_trips(loaders):
    _, history = train_mlp(loaders, epochs=4)
    assert history.epochs == 4 and len(history.val_acc) == len(history.lr) == 4
    assert History.from_dict(history.to_dict()) == history
    assert history.train_loss[-1] < history.train_loss[0]


def test_scheduler_steps_once_per_epoch(loaders):
    seed_everything(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = fit(model, loaders.train, loaders.val, epochs=3, optimizer=optimizer, scheduler=scheduler,
                  progress=False)
    assert history.lr == pytest.approx([0.1, 0.05, 0.025])


def test_early_stopping_stops_and_restores_the_best_weights(loaders):
    seed_everything(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)  # diverges: validation loss stops improving
    history = fit(model, loaders.train, loaders.val, epochs=30, optimizer=optimizer, patience=2,
                  restore_best=True, progress=False)
    assert history.epochs < 30
    assert evaluate(model, loaders.val).loss == pytest.approx(min(history.val_loss), rel=1e-5)


def test_on_epoch_end_can_stop_training(loaders):
    _, history = train_mlp(loaders, epochs=10, on_epoch_end=lambda epoch, h: epoch == 2)
    assert history.epochs == 2


def test_resuming_with_a_history_counts_on(loaders):
    model, history = train_mlp(loaders, epochs=2)
    fit(model, loaders.train, loaders.val, epochs=2, history=history, progress=False)
    assert history.epochs == 4


def test_evaluate_uses_eval_mode_and_restores_training_mode(loaders):
    model = MLPv2().train()
    first = evaluate(model, loaders.val)
    assert model.training
    assert evaluate(model, loaders.val) == first  # dropout off during evaluation: same numbers twice


@pytest.mark.parametrize("epochs", [-1, 2.0, None])
def test_bad_epochs_are_refused(loaders, epochs):
    with pytest.raises(InvalidArgumentError, match="epochs"):
        fit(MLP(), loaders.train, loaders.val, epochs=epochs, progress=False)


def test_bad_patience_is_refused(loaders):
    with pytest.raises(InvalidArgumentError, match="patience"):
        fit(MLP(), loaders.train, loaders.val, epochs=1, patience=0, progress=False)


def test_fit_refuses_something_that_is_not_a_model(loaders):
    with pytest.raises(InvalidArgumentError, match="torch.nn.Module"):
        fit(lambda x: x, loaders.train, loaders.val, epochs=1, progress=False)


def test_empty_loader_is_named(loaders):
    empty = torch.utils.data.DataLoader([], batch_size=4)
    with pytest.raises(InvalidArgumentError, match="evaluation loader yielded no batches"):
        evaluate(MLP(), empty)


def diverging_run(loaders, **kwargs):
    """An MLP under SGD at lr 5.0: validation loss stops improving after a few epochs, so early stopping triggers."""
    seed_everything(0)
    loaders.train.generator.manual_seed(0)
    model = MLP()
    return model, torch.optim.SGD(model.parameters(), lr=5.0)


def test_a_resumed_run_stops_early_where_an_uninterrupted_run_does(loaders):
    model, optimizer = diverging_run(loaders)
    whole = fit(model, loaders.train, loaders.val, epochs=30, optimizer=optimizer, patience=3, progress=False)
    assert whole.best_epoch < whole.epochs < 30
    split = whole.best_epoch + 1  # interrupted one epoch after the best: one epoch of patience already used
    model, optimizer = diverging_run(loaders)
    resumed = fit(model, loaders.train, loaders.val, epochs=split, optimizer=optimizer, patience=3, progress=False)
    fit(model, loaders.train, loaders.val, epochs=30 - split, optimizer=optimizer, patience=3, history=resumed,
        progress=False)
    assert resumed == whole and resumed.best_epoch == whole.best_epoch


def test_resuming_a_run_whose_patience_ran_out_trains_no_further(loaders):
    model, optimizer = diverging_run(loaders)
    history = fit(model, loaders.train, loaders.val, epochs=30, optimizer=optimizer, patience=2, progress=False)
    stopped = history.epochs
    fit(model, loaders.train, loaders.val, epochs=5, optimizer=optimizer, patience=2, history=history, progress=False)
    assert history.epochs == stopped


def test_restore_best_on_resume_never_restores_a_worse_epoch(loaders):
    model, optimizer = diverging_run(loaders)
    history = fit(model, loaders.train, loaders.val, epochs=30, optimizer=optimizer, patience=3, progress=False)
    best, split = history.best_epoch, history.best_epoch + 1
    model, optimizer = diverging_run(loaders)
    history = fit(model, loaders.train, loaders.val, epochs=split, optimizer=optimizer, progress=False)
    fit(model, loaders.train, loaders.val, epochs=30, optimizer=optimizer, patience=3, restore_best=True,
        history=history, progress=False)
    assert history.best_epoch == best  # the best epoch was before this call: its weights are not in memory,
    assert evaluate(model, loaders.val).loss == pytest.approx(history.val_loss[-1], rel=1e-5)  # so the last stay


def test_train_step_takes_one_gradient_step_and_returns_the_loss_before_it(mlp):
    inputs, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = torch.nn.functional.cross_entropy(mlp(inputs), labels)
    loss = train_step(mlp, inputs, labels, torch.optim.SGD(mlp.parameters(), lr=0.5))
    assert loss.item() == pytest.approx(before.item()) and loss.grad_fn is None
    assert torch.nn.functional.cross_entropy(mlp(inputs), labels) < before


def test_train_step_lowers_whatever_loss_it_is_given(mlp):
    inputs, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def squared(outputs, _labels):  # any loss of (outputs, labels): distillation passes its own (Lesson 06)
        return outputs.pow(2).mean()

    before = squared(mlp(inputs), labels).item()
    loss = train_step(mlp, inputs, labels, torch.optim.SGD(mlp.parameters(), lr=0.1), squared)
    assert loss.item() == pytest.approx(before) and squared(mlp(inputs), labels).item() < before


def test_train_one_epoch_refuses_something_that_is_not_a_model(loaders):
    with pytest.raises(InvalidArgumentError, match="torch.nn.Module"):
        train_one_epoch(lambda x: x, loaders.train, torch.optim.SGD(MLP().parameters(), lr=0.1))


def test_train_one_epoch_names_an_empty_loader():
    model = MLP()
    empty = torch.utils.data.DataLoader([], batch_size=4)
    with pytest.raises(InvalidArgumentError, match="training loader yielded no batches"):
        train_one_epoch(model, empty, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("data, match", [
    ({"train_loss": [0.5], "val_los": [0.4]}, r"unknown keys \['val_los'\]; expected keys among "
                                              r"\['train_loss', 'val_loss', 'val_acc', 'lr', 'val_top_k', 'val_mse', 'val_mae'\]"),
    ([0.5, 0.4], "history must be a dict with keys"),
])
def test_history_from_dict_lists_the_expected_keys(data, match):
    with pytest.raises(InvalidArgumentError, match=match):
        History.from_dict(data)


# --- tasks: classification and regression, said or read from the targets (issue 15) -----------------

def regression_data(n=64, outputs=1, shape=None, seed=0):
    """Random inputs (n, 8) and float targets: one fixed linear function of them plus noise; `seed` draws the inputs."""
    weights = torch.randn(8, outputs, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 8, generator=generator)
    y = x @ weights + 0.1 * torch.randn(n, outputs, generator=generator)
    return DataLoader(TensorDataset(x, y.reshape(shape or (n, outputs))), batch_size=16)


def regression_net(outputs=1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, outputs))


@pytest.mark.parametrize("targets, task", [
    (torch.tensor([0, 2, 1]), "classification"),
    (torch.rand(3), "regression"),
    (torch.rand(3, 1), "regression"),
    (torch.rand(3, 20), "regression"),
])
def test_the_task_is_read_from_the_targets(targets, task):
    assert infer_task(targets) == task


@pytest.mark.parametrize("targets, match", [
    (torch.zeros(3, 10, dtype=torch.long), r"integer targets of shape \(3, 10\) are not class labels"),
    (torch.rand(3, 1, 4, 4), r"float targets of shape \(3, 1, 4, 4\)"),
    (torch.zeros(3, dtype=torch.bool), "torch.bool"),
    ([0, 1], "targets must be a tensor"),
])
def test_targets_of_no_known_task_are_refused(targets, match):
    with pytest.raises(InvalidArgumentError, match=match):
        infer_task(targets)


def test_float_targets_of_shape_n_1_give_regression_metrics_not_a_broadcast_accuracy():
    """Before: (N, 1) float targets against a 1-output model broadcast to N x N and reported accuracy 10.0."""
    result = evaluate(regression_net(), regression_data(shape=(64, 1)))
    assert result.task == "regression" and result.accuracy is None
    assert result.mse == pytest.approx(result.loss) and 0 < result.mae


def test_regression_metrics_are_the_mean_squared_and_absolute_errors():
    model, loader = regression_net(), regression_data(shape=(64,))
    x, y = loader.dataset.tensors
    with torch.no_grad():
        errors = model(x).squeeze(1) - y
    result = evaluate(model, loader)
    assert result.mse == pytest.approx(errors.pow(2).mean().item(), rel=1e-5)
    assert result.mae == pytest.approx(errors.abs().mean().item(), rel=1e-5)


def test_outputs_that_do_not_match_regression_targets_are_refused_by_name():
    """Before: (N, 20) targets against a 10-output model raised a bare RuntimeError."""
    with pytest.raises(InvalidArgumentError, match=r"regression outputs of shape \(16, 10\) do not match targets "
                                                   r"of shape \(16, 20\)"):
        evaluate(regression_net(10), regression_data(outputs=20))


def test_a_one_output_model_cannot_be_a_classifier():
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 2, (8,))), batch_size=4)
    with pytest.raises(InvalidArgumentError, match=r"classification needs outputs of shape \(N, classes\)"):
        evaluate(regression_net(1), loader)


def test_labels_beyond_the_models_classes_are_refused():
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.full((8,), 12)), batch_size=4)
    with pytest.raises(InvalidArgumentError, match=r"class labels must lie in \[0, 10\).*from 12 to 12"):
        evaluate(regression_net(10), loader)


def test_task_classification_refuses_float_targets():
    with pytest.raises(InvalidArgumentError, match="task 'classification' needs integer class labels"):
        evaluate(regression_net(), regression_data(), task="classification")
    with pytest.raises(InvalidArgumentError, match="task must be one of"):
        evaluate(regression_net(), regression_data(), task="ranking")


def test_task_regression_takes_integer_targets_as_values():
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 5, (8,))), batch_size=4)
    result = evaluate(regression_net(), loader, task="regression")
    assert result.task == "regression" and result.mse > 0


def test_fit_trains_a_regression_model_and_records_mse_and_mae():
    model, loader = regression_net(), regression_data()
    history = fit(model, loader, regression_data(seed=1), epochs=20, progress=False,
                  optimizer=torch.optim.Adam(model.parameters(), lr=0.02))
    assert history.val_acc == [] and len(history.val_mse) == len(history.val_mae) == 20
    assert history.val_mse[-1] < history.val_mse[0] / 4 and history.val_loss == pytest.approx(history.val_mse)
    assert History.from_dict(history.to_dict()) == history


def test_top_k_counts_a_hit_when_the_true_class_is_among_the_k_highest_scores():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    model = nn.Identity()
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)
    result = evaluate(model, loader, top_k=2)
    assert result.accuracy == pytest.approx(1 / 3) and result.top_k == pytest.approx(2 / 3)
    with pytest.raises(InvalidArgumentError, match="top_k=4 is more than the model's 3 classes"):
        evaluate(model, loader, top_k=4)


def test_fit_records_top_k_only_when_asked(loaders):
    _, plain = train_mlp(loaders, epochs=1)
    _, with_top = train_mlp(loaders, epochs=1, top_k=3)
    assert "val_top_k" not in plain.to_dict() and list(plain.to_dict()) == ["train_loss", "val_loss", "val_acc", "lr"]
    assert with_top.val_acc == plain.val_acc and with_top.val_top_k[0] >= with_top.val_acc[0]


def test_fit_without_a_validation_loader_records_the_training_loss_only():
    model, loader = regression_net(), regression_data()
    history = fit(model, loader, epochs=3, progress=False)
    assert len(history.train_loss) == len(history.lr) == 3 and history.val_loss == [] and history.best_epoch is None


@pytest.mark.parametrize("kwargs", [{"patience": 2}, {"restore_best": True}])
def test_early_stopping_without_a_validation_loader_is_refused(kwargs):
    with pytest.raises(InvalidArgumentError, match="need a val_loader: early stopping watches the validation loss"):
        fit(regression_net(), regression_data(), epochs=1, progress=False, **kwargs)


def test_a_model_with_two_inputs_trains_on_batches_of_input_pairs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    x, y, labels = torch.randn(32, 4), torch.randn(32, 4), torch.randint(0, 3, (32,))
    pairs = DataLoader([((x[i], y[i]), labels[i]) for i in range(32)], batch_size=8)
    history = fit(Pair(), pairs, pairs, epochs=2, progress=False)
    assert len(history.val_acc) == 2


def test_a_batch_that_is_not_an_inputs_targets_pair_is_refused():
    triples = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(InvalidArgumentError, match=r"each batch must be a pair \(inputs, targets\), got 3 items"):
        evaluate(nn.Linear(4, 3), triples)
