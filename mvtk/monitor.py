"""Watching models train and serve: logs, live curves, TensorBoard, model health, profiling, drift (Lesson 08).

Training side: `MetricLogger` (per-batch values, per-epoch means), `LivePlot` and `TrainingMonitor`
(both plug into `mvtk.train.fit(on_epoch_end=...)`), TensorBoard writers and readers, gradient/weight
norms and dead ReLUs, `torch.profiler` summaries. Serving side: `PredictionLog` and `DriftMonitor`,
which take plain arrays, tensors or a predict callable, so they work with any deployed model.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from mvtk.errors import InvalidArgumentError, MonitorError, check_int, check_module, check_number, check_positive_int
from mvtk.files import atomic_write
from mvtk.models import eval_mode, model_device

__all__ = [
    "HISTOGRAMS_EVERY", "HISTOGRAM_BINS", "PSI_THRESHOLD", "PSI_BINS", "PSI_EPS", "MIN_SAMPLES",
    "MetricLogger", "plot_history", "LivePlot", "log_scalars", "history_scalars", "log_histograms", "log_graph",
    "log_hparams", "read_events", "read_scalars", "read_hparams", "gradient_norms", "weight_norms",
    "DeadReLUTracker", "TrainingMonitor", "OperatorTime", "profile_steps", "top_operators", "save_trace",
    "Predictions", "predict", "confusion_matrix", "per_class_accuracy", "plot_confusion_matrix",
    "plot_per_class_accuracy", "as_features", "PredictionLog", "DriftReport", "DriftMonitor", "psi",
    "ks_statistic", "plot_drift",
]

HISTOGRAMS_EVERY = 10  # epochs between histogram writes: each costs ~0.3 ms per parameter, scalars far less
HISTOGRAM_BINS = 64    # equal-width bins: TensorBoard's default ~500 exponential bins make records slow to write
PSI_THRESHOLD = 0.2    # overall PSI above this alarms: < 0.1 is "no change", > 0.25 "significant" by convention
PSI_BINS = 10          # quantile bins per feature, taken from the reference data
PSI_EPS = 1e-4         # floor for a bin's share, so an empty bin gives a large but finite score
MIN_SAMPLES = 100      # PSI is biased upward on small batches: fewer live samples than this are refused


# §1 Logging per batch and per epoch --------------------------------------------------------------

class MetricLogger:
    """Per-batch values and their per-epoch means weighted by batch size (Lesson 08, §1).

    `update(n, loss=...)` keeps tensors as they are (no `.item()` sync per batch); `end_epoch()`
    turns them into floats once, appends the means to `epochs[name]` and the values to `batches[name]`.
    """

    def __init__(self):
        self.batches: dict[str, list[float]] = {}
        self.epochs: dict[str, list[float]] = {}
        self._pending: dict[str, list] = {}
        self._sizes: list[int] = []

    def update(self, n: int, **values) -> None:
        """Record one batch of `n` samples: each value is a float or a one-element tensor (Lesson 08, §1)."""
        check_positive_int(n, "n (the batch size)")
        if not values:
            raise MonitorError("update() needs at least one value, e.g. logger.update(len(labels), loss=loss)")
        if self._sizes and set(values) != set(self._pending):
            raise MonitorError(f"every batch of an epoch must log the same names: got {sorted(values)}, "
                               f"expected {sorted(self._pending)}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise MonitorError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
                value = value.detach() if value.requires_grad else value  # drop the graph, keep it a tensor
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise MonitorError(f"{name} must be a number or a one-element tensor, got {type(value).__name__}")
            self._pending.setdefault(name, []).append(value)
        self._sizes.append(n)

    def end_epoch(self) -> dict[str, float]:
        """Close the epoch: the batch-size-weighted mean of each value since the last call (Lesson 08, §1)."""
        if not self._sizes:
            raise MonitorError("end_epoch() was called but no batch was logged since the last epoch")
        sizes = torch.tensor(self._sizes, dtype=torch.float64)
        means = {}
        for name, pending in self._pending.items():
            values = _to_cpu_float64(pending)
            self.batches.setdefault(name, []).extend(values.tolist())
            means[name] = float((values * sizes).sum() / sizes.sum())
            self.epochs.setdefault(name, []).append(means[name])
        self._pending, self._sizes = {}, []
        return means


def _to_cpu_float64(values: list) -> torch.Tensor:
    tensors = [v if v.dim() == 0 else v.reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) == len(values) and len({(t.device, t.dtype) for t in tensors}) == 1:
        return torch.stack(tensors).to("cpu", torch.float64)  # one copy (one sync) from the device
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


# §2 A live training view ---------------------------------------------------------------------------

def plot_history(history, title: str | None = None):
    """A figure of what a History holds: loss always, then accuracy or MSE/MAE when recorded (Lesson 08, §2).

    A panel per kind of metric: train (and val) loss; validation accuracy (classification, with top-k
    when recorded); validation MSE and MAE (regression). A History without validation gets the loss panel only.
    """
    import matplotlib.pyplot as plt

    if not getattr(history, "train_loss", None):
        raise MonitorError("history has no epochs to plot yet")
    epochs = list(range(1, len(history.train_loss) + 1))
    panels = [("loss", "loss", [("train", history.train_loss), ("val", history.val_loss)])]
    for ylabel, panel_title, curves in (
            ("accuracy", "validation accuracy", [("top-1", history.val_acc), ("top-k", history.val_top_k)]),
            ("error", "validation error", [("MSE", history.val_mse), ("MAE", history.val_mae)])):
        curves = [(label, values) for label, values in curves if values]
        if curves:
            panels.append((ylabel, panel_title, curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (ylabel, panel_title, curves) in zip(axes[0], panels):
        for label, values in curves:
            if values:  # a curve with fewer points (a resumed run) starts at its own first epoch
                ax.plot(epochs[len(epochs) - len(values):], values, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=panel_title)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class LivePlot:
    """An ipywidgets Output that redraws plot_history after every `every` epochs: pass it as fit's on_epoch_end.

    Display it first (`live.show()` or a cell ending in `live`). Lesson 08, §2.
    """

    def __init__(self, every: int = 1, title: str | None = None):
        import ipywidgets

        check_positive_int(every, "every (epochs between redraws)")
        self.every, self.title, self.draws = every, title, 0
        self.output = ipywidgets.Output()

    def show(self) -> None:
        """Display the (empty) output widget; fit's epochs then draw into it (Lesson 08, §2)."""
        from IPython.display import display

        display(self.output)

    def _ipython_display_(self) -> None:
        self.show()

    def __call__(self, epoch: int, history) -> None:
        import matplotlib.pyplot as plt
        from IPython import get_ipython
        from IPython.display import clear_output, display

        if epoch % self.every:
            return None
        fig = plot_history(history, self.title)
        with self.output:
            clear_output(wait=True)  # replace the previous figure instead of stacking a new one
            if get_ipython() is not None:
                display(fig)
        plt.close(fig)
        self.draws += 1
        return None


# §3 TensorBoard ----------------------------------------------------------------------------------

def log_scalars(writer, values: dict[str, float], step: int) -> None:
    """Write several scalars (tag -> number or one-element tensor) for one step with `writer.add_scalar` (Lesson 08, §3)."""
    for tag, value in values.items():
        writer.add_scalar(tag, float(value), step)


def history_scalars(history) -> dict[str, float]:
    """The latest epoch of a History as TensorBoard tags: loss/train, loss/val, accuracy/val, mse/val, mae/val, lr.

    Only the metrics the History holds are returned. Lesson 08, §3.
    """
    latest = {"loss/train": history.train_loss, "loss/val": history.val_loss, "accuracy/val": history.val_acc,
              "mse/val": getattr(history, "val_mse", []), "mae/val": getattr(history, "val_mae", []),
              "lr": history.lr}
    return {tag: values[-1] for tag, values in latest.items() if values}


def log_histograms(writer, model: nn.Module, step: int, bins: int = HISTOGRAM_BINS) -> None:
    """Write a histogram of every parameter (weights/<name>) and of its gradient (gradients/<name>) (Lesson 08, §3)."""
    for name, param in check_module(model).named_parameters():
        writer.add_histogram(f"weights/{name}", param.detach().cpu(), step, bins=bins)
        if param.grad is not None:
            writer.add_histogram(f"gradients/{name}", param.grad.detach().cpu(), step, bins=bins)


def log_graph(writer, model: nn.Module, example_input: torch.Tensor) -> None:
    """Write the model's graph, traced on `example_input`; tracer deprecation notes are silenced (Lesson 08, §3)."""
    with eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace")  # add_graph still uses jit.trace
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        writer.add_graph(model, example_input)


def log_hparams(writer, hparams: dict, metrics: dict, run_name: str = "hparams") -> None:
    """Write hyper-parameters with the run's final metrics, in the subfolder `run_name` (Lesson 08, §3)."""
    if not isinstance(hparams, dict) or not isinstance(metrics, dict) or not metrics:
        raise MonitorError("hparams and metrics must be dicts, metrics not empty, e.g. {'hparam/val_acc': 0.95}")
    writer.add_hparams(hparams, {k: float(v) for k, v in metrics.items()}, run_name=run_name)


def read_events(logdir: str | os.PathLike):
    """Load one run folder's event files with TensorBoard's own EventAccumulator (Lesson 08, §3)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(logdir)
    if not any(path.glob("events.out.tfevents.*")):
        raise MonitorError(f"no TensorBoard event files in {str(path)!r}; expected events.out.tfevents.* there")
    return EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a run folder as a list of (step, value), read back from the event files (Lesson 08, §3)."""
    events = read_events(logdir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_hparams(logdir: str | os.PathLike, run_name: str = "hparams") -> dict:
    """The hyper-parameters and final metrics written by log_hparams, read back (Lesson 08, §3)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = read_events(Path(logdir) / run_name)
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                hparams[name] = getattr(value, value.WhichOneof("kind"))
    metrics = {tag: values[-1][1] for tag, values in read_scalars(Path(logdir) / run_name).items()}
    return {"hparams": dict(sorted(hparams.items())), "metrics": dict(sorted(metrics.items()))}


# §4 Model health -----------------------------------------------------------------------------------

def gradient_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of each parameter's gradient, by parameter name; call after backward() (Lesson 08, §4)."""
    grads = {name: p.grad for name, p in check_module(model).named_parameters() if p.grad is not None}
    if not grads:
        raise MonitorError("no parameter of the model has a gradient: call loss.backward() first")
    return _norms(grads)


def weight_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of each parameter, by name (Lesson 08, §4)."""
    return _norms(dict(check_module(model).named_parameters()))


def _norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    device = next(iter(tensors.values())).device  # stack on the device, then one copy to the host
    values = torch.stack([t.detach().norm().float().to(device) for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


class DeadReLUTracker:
    """Forward hooks on every nn.ReLU that count units never active (output > 0) on any input seen (Lesson 08, §4).

    Use as a context manager (hooks are removed on exit); a ReLU module called twice per forward
    is tracked per call ("act#1", "act#2").
    """

    def __init__(self, model: nn.Module):
        self._relus = [(name, m) for name, m in check_module(model).named_modules() if isinstance(m, nn.ReLU)]
        if not self._relus:
            raise MonitorError(f"{type(model).__name__} has no nn.ReLU module to watch (functional relu is not hooked)")
        self._alive: dict[tuple[str, int], torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._hooks = [model.register_forward_pre_hook(lambda *_: self._calls.clear())]
        for name, module in self._relus:
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            call = self._calls.get(name, 0) + 1
            self._calls[name] = call
            fired = (output.detach() > 0).flatten(1).any(dim=0)  # per unit: active on some sample of the batch
            key = (name, call)
            self._alive[key] = fired if key not in self._alive else self._alive[key] | fired
        return record

    def fractions(self) -> dict[str, float]:
        """The fraction of dead units per ReLU over every input seen so far (Lesson 08, §4)."""
        if not self._alive:
            raise MonitorError("no forward pass was seen yet: run the model on some inputs first")
        calls = {name: max(c for n, c in self._alive if n == name) for name, _ in self._alive}
        return {(name if calls[name] == 1 else f"{name}#{call}"): 1.0 - float(alive.float().mean())
                for (name, call), alive in self._alive.items()}

    def remove(self) -> None:
        """Remove the hooks; the model is as it was before (Lesson 08, §4)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "DeadReLUTracker":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class TrainingMonitor:
    """fit's on_epoch_end: records lr, gradient and weight norms per layer, and writes them to TensorBoard.

    Gradient norms cover the whole epoch: a hook on each parameter takes the norm of every backward
    pass (before any clipping), and each epoch records their mean (`grad_norm`, the typical step the
    optimiser was given) and maximum (`grad_norm_max`, the spike that clipping would cut). The last
    batch alone would be a noisy sample (here a short one), and the norm of the gradient summed over the
    epoch hides the per-step size, as batch noise cancels in the sum. Create it before training; it
    counts every backward pass from then on (`remove()` or a `with` block ends that).
    With a `writer`: the History's scalars every epoch, norms as grad_norm/<name>, grad_norm_max/<name>
    and weight_norm/<name>, histograms every `histograms_every` epochs (0: never; gradient histograms
    show the last batch). `stop_on_nan` ends training once the training loss is not finite. Lesson 08, §3-§4.
    """

    def __init__(self, model: nn.Module, writer=None, histograms_every: int = HISTOGRAMS_EVERY,
                 stop_on_nan: bool = True):
        check_int(histograms_every, "histograms_every", low=0)
        self.model, self.writer = check_module(model), writer
        self.histograms_every, self.stop_on_nan = histograms_every, stop_on_nan
        self.records: list[dict] = []
        self._step_norms: dict[str, list[torch.Tensor]] = {}  # this epoch's norms, kept on the device: no sync
        self._hooks = [param.register_hook(self._hook(name))
                       for name, param in model.named_parameters() if param.requires_grad]

    def _hook(self, name: str):
        def record(grad: torch.Tensor) -> None:
            self._step_norms.setdefault(name, []).append(torch.linalg.vector_norm(grad.detach()))
        return record

    def __call__(self, epoch: int, history) -> bool:
        if not self._step_norms:
            raise MonitorError("no backward pass was seen since the last epoch: create the TrainingMonitor "
                               "before training, and don't call remove() until training ends")
        steps = {name: torch.stack(norms).float() for name, norms in self._step_norms.items()}
        self._step_norms = {}
        device = next(iter(steps.values())).device  # stack on the device, then one copy to the host
        stats = torch.stack([torch.stack([v.mean(), v.max()]).to(device) for v in steps.values()]).tolist()
        grads = {name: mean for name, (mean, _) in zip(steps, stats)}
        peaks = {name: peak for name, (_, peak) in zip(steps, stats)}
        weights = weight_norms(self.model)
        self.records.append({"epoch": epoch, "lr": history.lr[-1], "grad_norm": grads, "grad_norm_max": peaks,
                             "weight_norm": weights, "steps": len(next(iter(steps.values())))})
        if self.writer is not None:
            log_scalars(self.writer, {**history_scalars(history),
                                      **{f"grad_norm/{name}": value for name, value in grads.items()},
                                      **{f"grad_norm_max/{name}": value for name, value in peaks.items()},
                                      **{f"weight_norm/{name}": value for name, value in weights.items()}}, epoch)
            if self.histograms_every and epoch % self.histograms_every == 0:
                log_histograms(self.writer, self.model, epoch)
        return self.stop_on_nan and not math.isfinite(history.train_loss[-1])

    def series(self, kind: str = "grad_norm") -> dict[str, list[float]]:
        """Per-layer values over the epochs seen, kind 'grad_norm', 'grad_norm_max' or 'weight_norm' (Lesson 08, §4)."""
        if kind not in _SERIES:
            raise InvalidArgumentError(f"kind must be one of {', '.join(map(repr, _SERIES))}, got {kind!r}")
        names = self.records[0][kind] if self.records else {}
        return {name: [r[kind][name] for r in self.records] for name in names}

    def remove(self) -> None:
        """Remove the gradient hooks; the model is as it was before, the records stay (Lesson 08, §4)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._step_norms = [], {}

    def __enter__(self) -> "TrainingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_SERIES = ("grad_norm", "grad_norm_max", "weight_norm")


# §5 Finding the bottleneck -------------------------------------------------------------------------

class OperatorTime(NamedTuple):
    """One row of a profile: operator name, number of calls, self and total CPU time in ms (Lesson 08, §5)."""
    name: str
    calls: int
    self_ms: float
    total_ms: float


def profile_steps(step: Callable[[], object], steps: int = 5, warmup: int = 1):
    """Run `step()` warmup + steps times under torch.profiler, recording the last `steps` (Lesson 08, §5)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    check_positive_int(steps, "steps")
    check_int(warmup, "warmup", low=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)) as prof:
        for _ in range(warmup + steps):
            step()
            prof.step()
    return prof


def top_operators(prof, n: int = 10, sort_by: str = "self_cpu_time_total") -> list[OperatorTime]:
    """The `n` operators that took the most time in a profile, as OperatorTime rows (Lesson 08, §5)."""
    if sort_by not in ("self_cpu_time_total", "cpu_time_total"):
        raise InvalidArgumentError(f"sort_by must be 'self_cpu_time_total' or 'cpu_time_total', got {sort_by!r}")
    rows = [OperatorTime(e.key, e.count, e.self_cpu_time_total / 1e3, e.cpu_time_total / 1e3)
            for e in prof.key_averages()]
    if not rows:
        raise MonitorError("the profile recorded no operators: did the profiled steps run?")
    key = (lambda r: r.self_ms) if sort_by == "self_cpu_time_total" else (lambda r: r.total_ms)
    return sorted(rows, key=key, reverse=True)[:n]


def save_trace(prof, path: str | os.PathLike) -> Path:
    """Write the profile as a Chrome/Perfetto trace (JSON) to `path`, atomically (Lesson 08, §5)."""
    with atomic_write(path) as tmp:
        prof.export_chrome_trace(str(tmp))
    return Path(path)


# §6 Evaluation you can read ------------------------------------------------------------------------

class Predictions(NamedTuple):
    """True labels, predicted classes and class probabilities of a data set, on the CPU (Lesson 08, §6)."""
    labels: torch.Tensor
    predicted: torch.Tensor
    probabilities: torch.Tensor


def predict(model: nn.Module, loader) -> Predictions:
    """Run `model` in eval mode over `loader`, without gradients; the model's mode is restored (Lesson 08, §6).

    Inputs go to the device of the model's parameters (the CPU for a model without any).
    """
    device = model_device(model)
    labels, probs = [], []
    with eval_mode(model), torch.no_grad():
        for inputs, targets in loader:
            probs.append(torch.softmax(model(inputs.to(device)), dim=1).cpu())
            labels.append(targets.cpu())
    if not labels:
        raise MonitorError("the loader yielded no batches to predict")
    probabilities = torch.cat(probs)
    return Predictions(torch.cat(labels), probabilities.argmax(dim=1), probabilities)


def confusion_matrix(labels, predicted, num_classes: int) -> np.ndarray:
    """Counts[true, predicted] over `num_classes` classes, by scikit-learn (Lesson 08, §6).

    Raises MonitorError for a label or prediction outside 0..num_classes-1 (scikit-learn would drop it silently).
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    check_positive_int(num_classes, "num_classes")
    labels, predicted = np.asarray(labels).ravel(), np.asarray(predicted).ravel()
    if len(labels) == 0 or len(labels) != len(predicted):
        raise MonitorError(f"labels and predictions must be non-empty and of equal length, "
                           f"got {len(labels)} and {len(predicted)}")
    for name, values in (("labels", labels), ("predictions", predicted)):
        valid = np.isin(values, np.arange(num_classes))
        if not valid.all():
            raise MonitorError(f"{name} must be class indices 0..{num_classes - 1} (num_classes={num_classes}), "
                               f"got {values[~valid][0].item()!r}")
    return sk_confusion_matrix(labels, predicted, labels=list(range(num_classes)))


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """The share of each true class predicted right: diagonal over row sums, NaN if absent (Lesson 08, §6)."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise MonitorError(f"a confusion matrix must be square, got shape {matrix.shape}")
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / totals, np.nan)


def plot_confusion_matrix(matrix: np.ndarray, class_names=None):
    """A confusion-matrix figure (scikit-learn's ConfusionMatrixDisplay) (Lesson 08, §6)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(ax=ax, colorbar=False)
    ax.set_title("confusion matrix (rows: true, columns: predicted)")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(accuracy: np.ndarray, class_names=None):
    """A bar chart of per-class accuracy with the overall mean as a line (Lesson 08, §6)."""
    import matplotlib.pyplot as plt

    accuracy = np.asarray(accuracy, dtype=float)
    names = [str(c) for c in (class_names if class_names is not None else range(len(accuracy)))]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.bar(names, accuracy, color="tab:blue")
    ax.axhline(np.nanmean(accuracy), color="black", linestyle="--")
    ax.set(ylim=(max(0.0, np.nanmin(accuracy) - 0.1), 1.0), xlabel="class", ylabel="accuracy",
           title=f"accuracy per class (dashed: the mean, {np.nanmean(accuracy):.2f})")
    fig.tight_layout()
    return fig


# §7 Monitoring in production ---------------------------------------------------------------------

def as_features(data, name: str = "data") -> np.ndarray:
    """`data` (array or tensor, one sample per row; images are flattened) as a float (N, F) array (Lesson 08, §7)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MonitorError(f"{name} must be numbers (an array or tensor), got {type(data).__name__}") from exc
    if array.ndim == 0:
        raise MonitorError(f"{name} must have one row per sample, got a single number")
    if array.shape[0] == 0:
        raise MonitorError(f"{name} is empty: expected at least one sample")
    array = array.reshape(len(array), -1) if array.ndim > 1 else array.reshape(-1, 1)
    if not np.isfinite(array).all():
        raise MonitorError(f"{name} holds NaN or infinite values")
    return array


class PredictionLog:
    """A log of a deployed model's predictions and confidences, fed with probabilities or a predict callable.

    Lesson 08, §7. `low_confidence`: a top probability below it counts as an unsure prediction.
    """

    def __init__(self, low_confidence: float = 0.5):
        self.low_confidence = check_number(low_confidence, "low_confidence", low=0, high=1, low_open=True,
                                           high_open=True, what="a probability")
        self.rows: list[dict] = []

    def record(self, probabilities, batch: str = "live") -> np.ndarray:
        """Log one batch of class probabilities (rows sum to 1): prediction and confidence per row (Lesson 08, §7)."""
        probs = as_features(probabilities, "probabilities")
        if self.rows and probs.shape[1] != self.rows[0]["num_classes"]:
            raise MonitorError(f"probabilities have {probs.shape[1]} classes, earlier batches had "
                               f"{self.rows[0]['num_classes']}")
        if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise MonitorError("probabilities must be non-negative with rows summing to 1: "
                               "apply softmax to the model's logits first")
        for row in probs:
            self.rows.append({"batch": batch, "prediction": int(row.argmax()), "confidence": float(row.max()),
                              "num_classes": probs.shape[1]})
        return probs

    def observe(self, predict_fn: Callable, inputs, batch: str = "live") -> np.ndarray:
        """Call `predict_fn(inputs)` (it returns probabilities), log the result and return it (Lesson 08, §7)."""
        if not callable(predict_fn):
            raise InvalidArgumentError(f"predict_fn must be callable, got {type(predict_fn).__name__}")
        return self.record(predict_fn(inputs), batch)

    def summary(self, batch: str | None = None) -> dict:
        """Count, mean confidence, unsure share and share per class, for one batch or all (Lesson 08, §7)."""
        rows = [r for r in self.rows if batch is None or r["batch"] == batch]
        if not rows:
            raise MonitorError(f"no predictions logged{'' if batch is None else f' for batch {batch!r}'}")
        confidence = np.array([r["confidence"] for r in rows])
        counts = np.bincount([r["prediction"] for r in rows], minlength=rows[0]["num_classes"])
        return {"count": len(rows), "mean_confidence": float(confidence.mean()),
                "low_confidence_share": float((confidence < self.low_confidence).mean()),
                "class_share": (counts / len(rows)).tolist()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the log as JSON lines (one prediction per line), atomically (Lesson 08, §7)."""
        with atomic_write(path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        return Path(path)


class DriftReport(NamedTuple):
    """Drift of a live batch against the reference: PSI and KS per feature, overall PSI, alarm (Lesson 08, §7)."""
    psi: np.ndarray
    ks: np.ndarray
    overall: float
    threshold: float
    alarm: bool


class DriftMonitor:
    """Compares live inputs with the training reference, feature by feature (Lesson 08, §7).

    PSI per feature over the reference's quantile bins, with each distinct cut value its own
    bin, so constant features (blank border pixels) score 0 until live values leave that value.
    The overall score is the mean PSI; it alarms above `threshold`. KS statistics come alongside.
    PSI grows on small samples even without drift, so live batches need `min_samples` rows.
    """

    def __init__(self, reference, bins: int = PSI_BINS, threshold: float = PSI_THRESHOLD, eps: float = PSI_EPS,
                 min_samples: int = MIN_SAMPLES):
        check_int(bins, "bins", low=2)
        check_number(threshold, "threshold", low=0, low_open=True)
        check_number(eps, "eps", low=0, high=0.01, low_open=True, high_open=True)
        check_positive_int(min_samples, "min_samples")
        self.reference = as_features(reference, "reference")
        if len(self.reference) < min_samples:
            raise MonitorError(f"the reference has {len(self.reference)} samples, expected at least {min_samples}")
        self.threshold, self.eps, self.min_samples = float(threshold), float(eps), min_samples
        quantiles = np.linspace(0.0, 1.0, bins + 1)
        self.cuts = [np.unique(np.quantile(column, quantiles, method="lower")) for column in self.reference.T]
        self.expected = [self._shares(column, cuts) for column, cuts in zip(self.reference.T, self.cuts)]

    def _shares(self, column: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        # Bin 2i+1 holds values equal to cut i, bin 2i the values strictly between cuts i-1 and i.
        index = np.searchsorted(cuts, column, side="left") + np.searchsorted(cuts, column, side="right")
        counts = np.bincount(index, minlength=2 * len(cuts) + 1)
        return np.maximum(counts / len(column), self.eps)

    def check(self, live) -> DriftReport:
        """Score a live batch against the reference; alarm when overall PSI exceeds the threshold (Lesson 08, §7)."""
        live = _check_same_features(self.reference, as_features(live, "live batch"))
        if len(live) < self.min_samples:
            raise MonitorError(f"live batch has {len(live)} samples; PSI needs at least {self.min_samples} "
                               "to be stable: pool recent inputs into a larger window")
        psi = np.array([float(((actual - expected) * np.log(actual / expected)).sum())
                        for column, cuts, expected in zip(live.T, self.cuts, self.expected)
                        for actual in [self._shares(column, cuts)]])
        overall = float(psi.mean())
        return DriftReport(psi, ks_statistic(self.reference, live), overall, self.threshold,
                           overall > self.threshold)


def psi(reference, live, bins: int = PSI_BINS) -> np.ndarray:
    """The population stability index of each feature of `live` against `reference` (Lesson 08, §7)."""
    return DriftMonitor(reference, bins=bins, min_samples=1).check(live).psi


def ks_statistic(reference, live) -> np.ndarray:
    """The two-sample Kolmogorov-Smirnov statistic per feature: the largest gap between the CDFs (Lesson 08, §7).

    SciPy's `scipy.stats.ks_2samp`, feature by feature (axis 0), after the same input checks as DriftMonitor.
    """
    from scipy.stats import ks_2samp

    reference = as_features(reference, "reference")
    live = _check_same_features(reference, as_features(live, "live batch"))
    return np.asarray(ks_2samp(reference, live, axis=0, method="asymp").statistic, dtype=np.float64)


def _check_same_features(reference: np.ndarray, live: np.ndarray) -> np.ndarray:
    if live.shape[1] != reference.shape[1]:
        raise MonitorError(f"live batch has {live.shape[1]} features per sample, "
                           f"the reference has {reference.shape[1]}")
    return live


def plot_drift(reports: dict[str, DriftReport], image_shape: tuple[int, int]):
    """Per-pixel PSI of each report as an `image_shape` heat map, and overall PSI vs threshold (Lesson 08, §7)."""
    import matplotlib.pyplot as plt

    if not reports:
        raise MonitorError("plot_drift needs at least one report, e.g. {'clean': report}")
    fig, axes = plt.subplots(1, len(reports) + 1, figsize=(3.2 * (len(reports) + 1), 3))
    vmax = max(float(r.psi.max()) for r in reports.values()) or 1.0
    for ax, (name, report) in zip(axes, reports.items()):
        shown = ax.imshow(report.psi.reshape(image_shape), cmap="magma", vmin=0, vmax=vmax)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set(title=f"{name}: PSI per pixel", xlabel="pixel column", ylabel="pixel row")
    fig.colorbar(shown, ax=axes[:-1].tolist(), shrink=0.8)
    names, overall = list(reports), [r.overall for r in reports.values()]
    colors = ["tab:red" if r.alarm else "tab:green" for r in reports.values()]
    axes[-1].bar(names, overall, color=colors)
    axes[-1].axhline(next(iter(reports.values())).threshold, color="black", linestyle="--", label="alarm threshold")
    axes[-1].set(yscale="log", title="overall PSI", xlabel="live batch", ylabel="mean PSI over features")
    axes[-1].legend(loc="upper right", fontsize=8)
    return fig
