"""Lesson 08's claims about mvtk.monitor: logs that weight by batch size, TensorBoard files that read back,
health signals, a profiler summary, readable evaluation, and a drift monitor that alarms only on drift."""
import gc
import json
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from mvtk import monitor
from mvtk.data import load_dataset
from mvtk.errors import InvalidArgumentError, MonitorError
from mvtk.models import MLP, MLPv2
from mvtk.train import History, fit


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(100, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (100,), generator=generator)
    return images, labels


@pytest.fixture
def loader(data):
    return DataLoader(TensorDataset(*data), batch_size=32)  # batches of 32, 32, 32 and 4


@pytest.fixture(scope="module")
def digits():
    return {split: load_dataset(split=split).images for split in ("train", "test")}


@pytest.fixture
def trained(mlp, loader, tmp_path):
    with SummaryWriter(tmp_path / "tb") as writer:
        watcher = monitor.TrainingMonitor(mlp, writer, histograms_every=2)
        history = fit(mlp, loader, loader, epochs=2, on_epoch_end=watcher, progress=False)
    return history, watcher, tmp_path / "tb"


# §1 the logger

def test_epoch_mean_is_weighted_by_batch_size():
    logger = monitor.MetricLogger()
    logger.update(3, loss=torch.tensor(1.0))
    logger.update(1, loss=5.0)
    assert logger.end_epoch() == {"loss": pytest.approx(2.0)}  # (3*1 + 1*5) / 4, not (1 + 5) / 2


def test_logger_keeps_every_batch_value_and_one_mean_per_epoch():
    logger = monitor.MetricLogger()
    for epoch in range(2):
        for value in (1.0, 2.0, 3.0):
            logger.update(2, loss=torch.tensor(value + epoch), acc=0.5)
        logger.end_epoch()
    assert logger.batches["loss"] == [1.0, 2.0, 3.0, 2.0, 3.0, 4.0]
    assert logger.epochs == {"loss": [2.0, 3.0], "acc": [0.5, 0.5]}


def test_logger_does_not_keep_the_autograd_graph():
    weight, saved = torch.ones((), requires_grad=True), torch.full((), 2.0)
    in_graph = weakref.ref(saved)  # the graph of weight * saved keeps `saved` for the backward pass
    logger = monitor.MetricLogger()
    logger.update(1, loss=weight * saved)
    logger.update(1, loss=weight * 3)
    del saved
    gc.collect()
    assert in_graph() is None  # the logger holds the value, not the graph behind it
    assert logger.end_epoch()["loss"] == 2.5 and logger.batches["loss"] == [2.0, 3.0]


def test_logger_rejects_a_batch_size_that_is_not_a_positive_int():
    with pytest.raises(InvalidArgumentError, match=r"n \(the batch size\) must be a positive int, got 0"):
        monitor.MetricLogger().update(0, loss=1.0)


@pytest.mark.parametrize("call", [
    lambda log: log.update(4),
    lambda log: log.update(4, loss=torch.ones(3)),
    lambda log: log.update(4, loss="low"),
    lambda log: log.end_epoch(),
], ids=["no-values", "vector", "string", "empty-epoch"])
def test_logger_rejects_bad_input_with_a_monitor_error(call):
    with pytest.raises(MonitorError):
        call(monitor.MetricLogger())


def test_logger_requires_the_same_names_in_every_batch_of_an_epoch():
    logger = monitor.MetricLogger()
    logger.update(2, loss=1.0)
    with pytest.raises(MonitorError, match="same names"):
        logger.update(2, acc=1.0)


# §2 live view

def test_live_plot_redraws_once_per_epoch_from_fit(mlp, loader):
    live = monitor.LivePlot()
    history = fit(mlp, loader, loader, epochs=2, on_epoch_end=live, progress=False)
    assert live.draws == history.epochs == 2


def test_live_plot_every_n_epochs_skips_the_others():
    live = monitor.LivePlot(every=2)
    history = History(train_loss=[1.0, 0.5], val_loss=[1.0, 0.6], val_acc=[0.1, 0.5], lr=[0.1, 0.1])
    live(1, history)
    live(2, history)
    assert live.draws == 1


def test_plot_history_needs_epochs():
    with pytest.raises(MonitorError):
        monitor.plot_history(History())


def _panels(fig):
    import matplotlib.pyplot as plt

    panels = [(ax.get_ylabel(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    plt.close(fig)
    return panels


@pytest.fixture
def regression_loader():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(40, 3, generator=generator)
    return DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=16)


def test_plot_history_shows_loss_and_accuracy_of_a_classification_run(mlp, loader):
    history = fit(mlp, loader, loader, epochs=2, progress=False)
    assert _panels(monitor.plot_history(history)) == [("loss", ["train", "val"]), ("accuracy", ["top-1"])]


def test_plot_history_shows_mse_and_mae_of_a_regression_run(regression_loader):
    history = fit(nn.Linear(3, 1), regression_loader, regression_loader, epochs=2, progress=False)
    assert history.val_mse and not history.val_acc
    assert _panels(monitor.plot_history(history)) == [("loss", ["train", "val"]), ("error", ["MSE", "MAE"])]


def test_plot_history_without_validation_shows_the_training_loss_only(regression_loader):
    history = fit(nn.Linear(3, 1), regression_loader, None, epochs=2, progress=False)
    assert _panels(monitor.plot_history(history)) == [("loss", ["train"])]


def test_history_scalars_hold_only_the_metrics_recorded():
    regression = History(train_loss=[1.0], val_loss=[0.5], lr=[0.1], val_mse=[0.5], val_mae=[0.4])
    assert monitor.history_scalars(regression) == {"loss/train": 1.0, "loss/val": 0.5, "mse/val": 0.5,
                                                   "mae/val": 0.4, "lr": 0.1}
    assert set(monitor.history_scalars(History(train_loss=[1.0], lr=[0.1]))) == {"loss/train", "lr"}


# §3 TensorBoard round trip

def test_training_monitor_scalars_read_back_equal_the_history(trained):
    history, _, logdir = trained
    scalars = monitor.read_scalars(logdir)
    assert [step for step, _ in scalars["loss/val"]] == [1, 2]
    assert np.allclose([value for _, value in scalars["loss/val"]], history.val_loss, atol=1e-6)
    assert np.allclose([value for _, value in scalars["accuracy/val"]], history.val_acc, atol=1e-6)
    assert {"loss/train", "lr", "grad_norm/fc1.weight", "grad_norm_max/fc1.weight",
            "weight_norm/fc2.bias"} <= set(scalars)


def test_log_scalars_read_back_tag_by_tag(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        monitor.log_scalars(writer, {"a": 1.5, "b/c": torch.tensor(2.0)}, step=3)
        monitor.log_scalars(writer, {"a": 0.5}, step=4)
    assert monitor.read_scalars(tmp_path) == {"a": [(3, 1.5), (4, 0.5)], "b/c": [(3, 2.0)]}


def test_histograms_of_weights_and_gradients_are_written_every_n_epochs(trained):
    _, _, logdir = trained
    events = monitor.read_events(logdir)
    assert {"weights/fc1.weight", "gradients/fc1.weight"} <= set(events.Tags()["histograms"])
    assert [e.step for e in events.Histograms("weights/fc1.weight")] == [2]


def test_graph_and_hparams_read_back(mlp, tmp_path):
    with SummaryWriter(tmp_path) as writer:
        monitor.log_graph(writer, mlp, torch.zeros(2, 1, 8, 8))
        monitor.log_hparams(writer, {"lr": 0.01, "optimizer": "adam"}, {"hparam/val_acc": 0.9})
    assert monitor.read_events(tmp_path).Tags()["graph"]
    stored = monitor.read_hparams(tmp_path)
    assert stored["hparams"] == {"lr": 0.01, "optimizer": "adam"}
    assert stored["metrics"] == {"hparam/val_acc": pytest.approx(0.9)}


def test_log_graph_leaves_the_model_in_training_mode(mlp, tmp_path):
    with SummaryWriter(tmp_path) as writer:
        monitor.log_graph(writer, mlp, torch.zeros(2, 1, 8, 8))
    assert mlp.training


def test_reading_a_folder_without_event_files_names_it(tmp_path):
    with pytest.raises(MonitorError, match="no TensorBoard event files"):
        monitor.read_scalars(tmp_path)


def test_log_hparams_needs_metrics(tmp_path):
    with SummaryWriter(tmp_path) as writer, pytest.raises(MonitorError):
        monitor.log_hparams(writer, {"lr": 0.1}, {})


# §4 model health

def test_training_monitor_records_norms_and_lr_per_epoch(trained):
    history, watcher, _ = trained
    assert [r["epoch"] for r in watcher.records] == [1, 2]
    assert [r["lr"] for r in watcher.records] == history.lr
    grads, peaks = watcher.series("grad_norm"), watcher.series("grad_norm_max")
    assert set(grads) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(len(values) == 2 and all(v > 0 for v in values) for values in grads.values())
    assert all(peak >= mean for name in grads for mean, peak in zip(grads[name], peaks[name]))
    assert [r["steps"] for r in watcher.records] == [4, 4]  # 100 samples in batches of 32: 4 backward passes


def test_training_monitor_stops_when_the_loss_is_not_finite(mlp):
    watcher = monitor.TrainingMonitor(mlp)
    mlp(torch.rand(2, 1, 8, 8)).sum().backward()
    history = History(train_loss=[float("nan")], val_loss=[1.0], val_acc=[0.1], lr=[0.1])
    assert watcher(1, history) is True


def test_training_monitor_gradient_norm_covers_every_batch_of_the_epoch(mlp, loader):
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    by_hand = []
    with monitor.TrainingMonitor(mlp) as watcher:
        for inputs, labels in loader:  # batches of 32, 32, 32 and 4
            optimizer.zero_grad()
            nn.functional.cross_entropy(mlp(inputs), labels).backward()
            by_hand.append(monitor.gradient_norms(mlp)["fc1.weight"])
            optimizer.step()
        watcher(1, History(train_loss=[1.0], val_loss=[1.0], val_acc=[0.1], lr=[0.1]))
    record = watcher.records[0]
    assert record["steps"] == 4
    assert record["grad_norm"]["fc1.weight"] == pytest.approx(np.mean(by_hand), rel=1e-5)
    assert record["grad_norm_max"]["fc1.weight"] == pytest.approx(max(by_hand), rel=1e-5)
    assert record["grad_norm"]["fc1.weight"] != pytest.approx(by_hand[-1], rel=1e-3)  # not the 4-sample batch


def test_training_monitor_needs_a_backward_pass_after_it_was_created(mlp):
    mlp(torch.rand(2, 1, 8, 8)).sum().backward()  # before the monitor: not counted
    watcher = monitor.TrainingMonitor(mlp)
    history = History(train_loss=[1.0], val_loss=[1.0], val_acc=[0.1], lr=[0.1])
    with pytest.raises(MonitorError, match="no backward pass"):
        watcher(1, history)
    watcher.remove()
    mlp(torch.rand(2, 1, 8, 8)).sum().backward()  # the hooks are gone: still nothing counted
    with pytest.raises(MonitorError, match="no backward pass"):
        watcher(1, history)


def test_gradient_norms_match_torch_and_need_a_backward_pass(mlp, data):
    with pytest.raises(MonitorError, match="backward"):
        monitor.gradient_norms(mlp)
    nn.functional.cross_entropy(mlp(data[0]), data[1]).backward()
    norms = monitor.gradient_norms(mlp)
    assert norms["fc1.weight"] == pytest.approx(float(mlp.fc1.weight.grad.norm()))
    assert monitor.weight_norms(mlp)["fc2.bias"] == pytest.approx(float(mlp.fc2.bias.detach().norm()))


def test_dead_relu_tracker_counts_units_that_never_fire(mlp, data):
    with torch.no_grad():
        mlp.fc1.bias[:4] = -1e3  # 4 of 16 hidden units can never be positive
    with monitor.DeadReLUTracker(mlp) as dead:
        mlp(data[0])
        assert dead.fractions() == {"act": pytest.approx(4 / 16)}
    with torch.no_grad():
        mlp.fc1.bias[:4] = 1e3  # now all 16 units fire...
    mlp(data[0])
    assert dead.fractions() == {"act": pytest.approx(4 / 16)}  # ...but the hooks went on exit: nothing was seen


def test_dead_relu_tracker_tells_apart_two_calls_of_one_relu_module(data):
    torch.manual_seed(0)
    net = MLPv2(hidden=16).eval()  # calls its one `act` module twice: after fc1 (16 units), after fc2 (8)
    with torch.no_grad():
        net.fc2.bias[:2], net.fc2.bias[2:] = -1e3, 1e3  # 2 of 8 never fire, 6 always do
    with monitor.DeadReLUTracker(net) as dead:
        net(data[0])
        fractions = dead.fractions()
    assert set(fractions) == {"act#1", "act#2"} and fractions["act#2"] == pytest.approx(2 / 8)


def test_dead_relu_tracker_needs_relu_modules():
    with pytest.raises(MonitorError, match="no nn.ReLU"):
        monitor.DeadReLUTracker(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))


# §5 profiler summary

def test_profiler_summary_lists_the_operators_of_the_profiled_steps(mlp, data):
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(mlp(data[0]), data[1]).backward()
        optimizer.step()

    prof = monitor.profile_steps(step, steps=2, warmup=1)
    rows = monitor.top_operators(prof, n=5)
    assert len(rows) == 5 and all(isinstance(r, monitor.OperatorTime) for r in rows)
    assert [r.self_ms for r in rows] == sorted((r.self_ms for r in rows), reverse=True)
    names = {r.name for r in monitor.top_operators(prof, n=1000)}
    assert {"aten::addmm", "aten::relu"} <= names


def test_save_trace_writes_chrome_trace_json(mlp, data, tmp_path):
    prof = monitor.profile_steps(lambda: mlp(data[0]), steps=1, warmup=1)
    path = monitor.save_trace(prof, tmp_path / "trace.json")
    assert "traceEvents" in json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary file left behind


def test_profile_steps_rejects_a_bad_step_count():
    with pytest.raises(InvalidArgumentError):
        monitor.profile_steps(lambda: None, steps=0)


# §6 evaluation

def test_confusion_matrix_and_per_class_accuracy():
    matrix = monitor.confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], num_classes=4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    accuracy = monitor.per_class_accuracy(matrix)
    assert accuracy[:3].tolist() == [0.5, 1.0, 0.0] and np.isnan(accuracy[3])


def test_predict_returns_probabilities_and_restores_the_mode(mlp, loader):
    result = monitor.predict(mlp, loader)
    assert result.probabilities.shape == (100, 10) and mlp.training
    assert torch.allclose(result.probabilities.sum(dim=1), torch.ones(100))
    assert torch.equal(result.predicted, result.probabilities.argmax(dim=1))


def test_confusion_matrix_rejects_mismatched_lengths():
    with pytest.raises(MonitorError, match="equal length, got 2 and 1"):
        monitor.confusion_matrix([0, 1], [0], num_classes=2)


@pytest.mark.parametrize("labels, predicted, match", [
    ([0, 1, 3], [0, 1, 1], r"labels must be class indices 0\.\.2 \(num_classes=3\), got 3"),
    ([0, 1, 2], [0, -1, 1], r"predictions must be class indices 0\.\.2 \(num_classes=3\), got -1"),
])
def test_confusion_matrix_refuses_classes_outside_the_range(labels, predicted, match):
    with pytest.raises(MonitorError, match=match):
        monitor.confusion_matrix(labels, predicted, num_classes=3)


def test_predict_runs_a_model_without_parameters_on_the_cpu():
    images = torch.rand(4, 3)
    result = monitor.predict(nn.Identity(), [(images, torch.zeros(4, dtype=torch.long))])
    assert torch.allclose(result.probabilities, torch.softmax(images, dim=1))


# §7 production: predictions and drift

def test_prediction_log_records_predictions_and_confidences(tmp_path):
    log = monitor.PredictionLog(low_confidence=0.5)
    log.record(np.array([[0.9, 0.1], [0.4, 0.6]]), batch="a")
    log.observe(lambda x: torch.softmax(x, dim=1), torch.tensor([[0.0, 0.0]]), batch="b")
    assert log.summary("a") == {"count": 2, "mean_confidence": pytest.approx(0.75),
                                "low_confidence_share": 0.0, "class_share": [0.5, 0.5]}
    assert log.summary()["low_confidence_share"] == pytest.approx(0.0)
    lines = log.save(tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == [0, 1, 0]


@pytest.mark.parametrize("probabilities", [np.array([[2.0, -1.0]]), np.zeros((0, 2))], ids=["logits", "empty"])
def test_prediction_log_rejects_logits_and_empty_batches(probabilities):
    with pytest.raises(MonitorError):
        monitor.PredictionLog().record(probabilities)


def test_drift_monitor_does_not_alarm_on_a_clean_split(digits):
    report = monitor.DriftMonitor(digits["train"]).check(digits["test"])
    assert not report.alarm and report.overall < 0.1
    assert report.psi.shape == report.ks.shape == (64,)


def test_drift_monitor_alarms_on_noisy_and_shifted_inputs(digits):
    drift = monitor.DriftMonitor(digits["train"])
    noise = torch.randn(digits["test"].shape, generator=torch.Generator().manual_seed(0))
    assert drift.check((digits["test"] + 0.1 * noise).clamp(0, 1)).alarm
    assert drift.check(torch.roll(digits["test"], 1, dims=3)).alarm


def test_constant_features_score_zero_until_they_move():
    reference = np.zeros((500, 2))
    reference[:, 1] = np.linspace(0, 1, 500)
    live = reference[:200].copy()
    assert monitor.psi(reference, live)[0] == 0.0
    live[:, 0] = 0.5
    assert monitor.psi(reference, live)[0] > 1.0


def test_ks_statistic_is_zero_for_the_same_sample_and_one_for_disjoint_ones():
    values = np.arange(10.0)
    assert monitor.ks_statistic(values, values).tolist() == [0.0]
    assert monitor.ks_statistic(values, values + 100).tolist() == [1.0]
    assert monitor.ks_statistic([[0.0], [1.0], [2.0], [3.0]], [[2.0], [3.0], [4.0], [5.0]]).tolist() == [0.5]


@pytest.mark.parametrize("live,match", [
    (torch.rand(150, 1, 16, 16), "256 features per sample, the reference has 64"),
    (torch.rand(0, 1, 8, 8), "is empty"),
    (torch.rand(20, 1, 8, 8), "at least 100"),
    (torch.full((150, 1, 8, 8), float("nan")), "NaN"),
], ids=["mismatched-features", "empty", "too-small", "nan"])
def test_drift_monitor_rejects_bad_live_batches(digits, live, match):
    with pytest.raises(MonitorError, match=match):
        monitor.DriftMonitor(digits["train"]).check(live)


def test_drift_monitor_rejects_an_empty_reference():
    with pytest.raises(MonitorError, match="reference is empty"):
        monitor.DriftMonitor(np.zeros((0, 4)))


# bad arguments get a clear mvtk error

@pytest.mark.parametrize("call", [
    lambda: monitor.gradient_norms("model"),
    lambda: monitor.weight_norms(None),
    lambda: monitor.DeadReLUTracker([nn.ReLU()]),
    lambda: monitor.TrainingMonitor({"fc1": 1}),
    lambda: monitor.predict(object(), []),
    lambda: monitor.TrainingMonitor(MLP(), histograms_every=-1),
    lambda: monitor.TrainingMonitor(MLP()).series("loss"),
    lambda: monitor.LivePlot(every=0),
    lambda: monitor.PredictionLog(low_confidence=1.5),
    lambda: monitor.PredictionLog().observe("not callable", np.ones((1, 2)) / 2),
    lambda: monitor.DriftMonitor(np.zeros((200, 2)), bins=1),
    lambda: monitor.DriftMonitor(np.zeros((200, 2)), threshold=0),
    lambda: monitor.DriftMonitor(np.zeros((200, 2)), min_samples=0),
], ids=["gradient_norms", "weight_norms", "dead-relu", "training-monitor", "predict", "histograms_every",
        "series-kind", "live-every", "low_confidence", "observe", "bins", "threshold", "min_samples"])
def test_bad_arguments_raise_invalid_argument_error(call):
    with pytest.raises(InvalidArgumentError):
        call()


@pytest.mark.parametrize("call, error, match", [
    (lambda: monitor.per_class_accuracy(np.ones((2, 3))), MonitorError, r"must be square, got shape \(2, 3\)"),
    (lambda: monitor.top_operators(None, sort_by="memory"), InvalidArgumentError, "sort_by must be"),
    (lambda: monitor.DriftMonitor(np.zeros((50, 2))), MonitorError, "reference has 50 samples, expected at least 100"),
    (lambda: monitor.psi(np.zeros((200, 3)), np.zeros((10, 2))), MonitorError,
     "live batch has 2 features per sample, the reference has 3"),
    (lambda: monitor.ks_statistic(np.zeros((5, 3)), np.zeros((5, 2))), MonitorError,
     "live batch has 2 features per sample, the reference has 3"),
    (lambda: monitor.plot_drift({}, (8, 8)), MonitorError, "at least one report"),
    (lambda: monitor.as_features("abc"), MonitorError, "data must be numbers"),
], ids=["non-square-matrix", "sort_by", "small-reference", "psi-features", "ks-features", "no-reports",
        "not-numbers"])
def test_bad_monitoring_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_prediction_log_rejects_a_change_in_the_number_of_classes():
    log = monitor.PredictionLog()
    log.record(np.array([[0.5, 0.5]]))
    with pytest.raises(MonitorError, match="3 classes, earlier batches had 2"):
        log.record(np.ones((1, 3)) / 3)
