"""Lesson 02's training claims: the loop learns, is repeatable, stops early, and evaluation changes nothing."""
import pytest
import torch

from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.errors import InvalidArgumentError
from mvtk.models import MLP, MLPv2
from mvtk.train import History, evaluate, fit, train_one_epoch, train_step


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
                                              r"\['train_loss', 'val_loss', 'val_acc', 'lr'\]"),
    ([0.5, 0.4], "history must be a dict with keys"),
])
def test_history_from_dict_lists_the_expected_keys(data, match):
    with pytest.raises(InvalidArgumentError, match=match):
        History.from_dict(data)
