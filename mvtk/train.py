"""The training loop of Lesson 02: `fit`, `train_one_epoch`, `train_step`, `evaluate` and the `History` they fill.

Written to be read: a learner should recognise every line of the loop from notebook 02. The loop works
on any nn.Module and on two tasks: classification (integer class labels of shape (N,), a model that
outputs one score per class) and regression (float targets of shape (N,) or (N, k), a model that
outputs one value per target). The task is given (`task=`) or read from the targets; anything else is
refused with an error that says what was expected.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mvtk.errors import InvalidArgumentError, check_int, check_module, check_positive_int
from mvtk.models import eval_mode, model_device

__all__ = ["DEFAULT_LR", "TASKS", "LOSSES", "History", "Evaluation", "infer_task", "check_outputs", "unpack_batch",
           "call_model", "train_step",
           "train_one_epoch", "evaluate", "fit"]

DEFAULT_LR = 3e-3  # Adam's learning rate when fit() makes the optimizer; right for the course's models
TASKS = ("classification", "regression")
LOSSES: dict[str, Callable] = {  # the loss each task uses when no loss_fn is given
    "classification": nn.functional.cross_entropy,
    "regression": nn.functional.mse_loss,
}
_ALWAYS = ("train_loss", "val_loss", "val_acc", "lr")  # History keys to_dict always writes (checkpoints, Lesson 03)


@dataclass
class History:
    """Per-epoch metrics of a training run, as plain lists (so checkpoints can hold it) (Lesson 02, §5).

    Classification fills val_acc (and val_top_k with fit(top_k=k)); regression fills val_mse and val_mae;
    without a validation loader only train_loss and lr are filled.
    """
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_top_k: list[float] = field(default_factory=list)   # fraction with the true class among the k top scores
    val_mse: list[float] = field(default_factory=list)     # regression: mean squared error per value
    val_mae: list[float] = field(default_factory=list)     # regression: mean absolute error per value

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    @property
    def best_epoch(self) -> int | None:
        """The 1-based epoch with the lowest validation loss, or None before any validated epoch."""
        if not self.val_loss:
            return None
        return min(range(len(self.val_loss)), key=self.val_loss.__getitem__) + 1

    def to_dict(self) -> dict[str, list[float]]:
        """The lists by name: train_loss, val_loss, val_acc and lr always, the other metrics when filled."""
        return {key: values for key, values in asdict(self).items() if key in _ALWAYS or values}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        expected = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"history must be a dict with keys {expected}, got {type(data).__name__}")
        unknown = set(data) - set(expected)
        if unknown:
            raise InvalidArgumentError(f"history has unknown keys {sorted(unknown)}; expected keys among {expected}")
        return cls(**{key: [float(v) for v in values] for key, values in data.items()})


class Evaluation(NamedTuple):
    """Mean loss and the task's metrics of a model on a data set (Lesson 02, §5).

    Classification: accuracy (and top_k, when asked for); regression: mse and mae per value. The
    other task's fields are None.
    """
    loss: float
    accuracy: float | None = None
    top_k: float | None = None
    mse: float | None = None
    mae: float | None = None
    task: str = "classification"


def infer_task(targets: torch.Tensor) -> str:
    """'classification' for integer labels of shape (N,), 'regression' for float targets (N,) or (N, k) (Lesson 02, §5).

    Anything else (one-hot or multi-label integers, images as targets, bools) raises InvalidArgumentError.
    """
    if not isinstance(targets, torch.Tensor):
        raise InvalidArgumentError(f"targets must be a tensor: integer class labels of shape (N,) or float values of "
                                   f"shape (N,) or (N, k), got {type(targets).__name__}")
    shape = tuple(targets.shape)
    if targets.dtype == torch.bool or targets.is_complex():
        raise InvalidArgumentError(f"targets of dtype {targets.dtype} are neither class labels nor regression values; "
                                   "expected integer class labels of shape (N,) or float values of shape (N,) or (N, k)")
    if not targets.is_floating_point():
        if targets.dim() == 1:
            return "classification"
        raise InvalidArgumentError(f"integer targets of shape {shape} are not class labels: classification expects "
                                   "one class index per sample, shape (N,); for several values per sample use float "
                                   "targets (regression)")
    if targets.dim() in (1, 2):
        return "regression"
    raise InvalidArgumentError(f"float targets of shape {shape} cannot be learned by regression here: expected "
                               "shape (N,) or (N, k); flatten them to (N, k) first")


def check_outputs(outputs: torch.Tensor, targets: torch.Tensor, task: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(outputs, targets, task) checked to fit each other; regression outputs reshaped like the targets (Lesson 02, §5).

    Classification needs outputs of shape (N, C), C >= 2, and labels in [0, C); regression needs one
    output per target value, e.g. outputs (N, 1) for targets (N,). A mismatch raises InvalidArgumentError,
    where PyTorch would broadcast silently or fail with a bare RuntimeError.
    """
    _check_task(task)
    inferred = infer_task(targets)
    task = task or inferred
    if task == "classification" and inferred != "classification":
        raise InvalidArgumentError(f"task 'classification' needs integer class labels of shape (N,), got "
                                   f"{targets.dtype} targets of shape {tuple(targets.shape)}")
    if not isinstance(outputs, torch.Tensor):
        raise InvalidArgumentError(f"the model must return one tensor, got {type(outputs).__name__}")
    n = targets.shape[0]
    if outputs.dim() == 0 or outputs.shape[0] != n:
        raise InvalidArgumentError(f"the model returned outputs of shape {tuple(outputs.shape)} for {n} targets: "
                                   "expected one row of outputs per sample")
    if task == "classification":
        if outputs.dim() != 2 or outputs.shape[1] < 2:
            raise InvalidArgumentError(
                f"classification needs outputs of shape (N, classes) with 2 or more classes, got "
                f"{tuple(outputs.shape)}; for a model with one output per value use task='regression' with "
                "float targets")
        classes = outputs.shape[1]
        if n and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise InvalidArgumentError(f"class labels must lie in [0, {classes}) for a model with {classes} outputs, "
                                       f"got labels from {int(targets.min())} to {int(targets.max())}")
        return outputs, targets, task
    per_sample = targets[0].numel() if n else 0
    if outputs.reshape(n, -1).shape[1] != max(per_sample, 1):
        raise InvalidArgumentError(f"regression outputs of shape {tuple(outputs.shape)} do not match targets of shape "
                                   f"{tuple(targets.shape)}: the model must give one value per target value")
    return outputs.reshape(targets.shape), targets.to(outputs.dtype), task


def call_model(model: nn.Module, inputs):
    """model(inputs), or model(*inputs) when inputs is a tuple or list: a model with several inputs (Lesson 02, §5)."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def unpack_batch(batch, device: torch.device | str):
    """(inputs, targets) of one batch on `device`; inputs may be a tuple of tensors for several inputs (Lesson 02, §5)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise InvalidArgumentError(f"each batch must be a pair (inputs, targets), got {got}; for a model with "
                                   "several inputs, let the loader yield ((x1, x2, ...), targets)")
    inputs, targets = batch
    if isinstance(inputs, (tuple, list)):
        return tuple(x.to(device) for x in inputs), targets.to(device)
    return inputs.to(device), targets.to(device)


def train_step(model: nn.Module, inputs, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: Callable = nn.functional.cross_entropy) -> torch.Tensor:
    """One gradient step on one batch: zero the gradients, forward, loss, backward, update (Lesson 02, §5).

    Returns the batch's loss, detached. `loss_fn(outputs, labels)` may be any loss, e.g. a distillation
    loss that also compares with a teacher's outputs (Lesson 06, §7). `inputs` may be a tuple of
    tensors for a model with several inputs: the model is called as model(*inputs).
    """
    optimizer.zero_grad()
    loss = loss_fn(call_model(model, inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable | None = None, device: torch.device | str | None = None, *,
                    task: str | None = None) -> float:
    """One pass over `loader` with gradient steps; returns the mean training loss per sample (Lesson 02, §5).

    Each batch is (inputs, targets), inputs a tensor or a tuple of tensors. `task` (None: read from the
    first batch's targets) picks the default loss, LOSSES[task]; outputs and targets are checked to fit.
    """
    check_module(model)
    _check_task(task)
    device = model_device(model) if device is None else torch.device(device)
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        inputs, labels = unpack_batch(batch, device)
        task = task or infer_task(labels)
        loss = train_step(model, inputs, labels, optimizer, _checked_loss(loss_fn, task))
        total += loss.item() * len(labels)
        count += len(labels)
    if count == 0:
        raise InvalidArgumentError("the training loader yielded no batches")
    return total / count


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable | None = None,
             device: torch.device | str | None = None, *, task: str | None = None,
             top_k: int | None = None) -> Evaluation:
    """Mean loss and the task's metrics over `loader`, in eval mode and without gradients (Lesson 02, §5).

    Classification: accuracy, and with `top_k=k` the fraction whose true class is among the k highest
    scores. Regression: mean squared and mean absolute error per target value. `task` None: read from
    the targets (`infer_task`). The model's train/eval mode is restored afterwards.
    """
    check_module(model)
    _check_task(task)
    if top_k is not None:
        check_positive_int(top_k, "top_k (or None)")
    device = model_device(model) if device is None else torch.device(device)
    total, correct, in_top_k, count = 0.0, 0, 0, 0
    squared, absolute, values = 0.0, 0.0, 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            inputs, labels = unpack_batch(batch, device)
            logits, labels, task = check_outputs(call_model(model, inputs), labels, task)
            total += (loss_fn or LOSSES[task])(logits, labels).item() * len(labels)
            count += len(labels)
            if task == "classification":
                correct += (logits.argmax(dim=1) == labels).sum().item()
                if top_k is not None:
                    in_top_k += _in_top_k(logits, labels, top_k)
            else:
                if top_k is not None:
                    raise InvalidArgumentError(f"top_k={top_k} is a classification metric; the task is regression")
                errors = (logits - labels).double()
                squared += errors.pow(2).sum().item()
                absolute += errors.abs().sum().item()
                values += errors.numel()
    if count == 0:
        raise InvalidArgumentError("the evaluation loader yielded no batches")
    if task == "regression":
        return Evaluation(loss=total / count, mse=squared / values, mae=absolute / values, task=task)
    return Evaluation(loss=total / count, accuracy=correct / count,
                      top_k=None if top_k is None else in_top_k / count, task=task)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None, *, epochs: int,
        optimizer: torch.optim.Optimizer | None = None, loss_fn: Callable | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, patience: int | None = None,
        restore_best: bool = False, device: torch.device | str | None = None,
        history: History | None = None, on_epoch_end: Callable[[int, History], bool | None] | None = None,
        progress: bool = True, task: str | None = None, top_k: int | None = None) -> History:
    """Train for `epochs` epochs, validating after each; returns the History (Lesson 02, §5-§9).

    - `task`: 'classification', 'regression' or None (read from the targets); `loss_fn` defaults to the
      task's loss (LOSSES: cross-entropy, MSE); `top_k`: also record top-k accuracy (classification).
    - `val_loader` None: no validation; the History holds train_loss and lr only, and early stopping
      (`patience`, `restore_best`), which watches the validation loss, is refused.
    - `optimizer` defaults to Adam(lr=DEFAULT_LR); `scheduler` steps once per epoch.
    - `patience`: stop early after that many epochs without a lower validation loss;
      `restore_best` then puts back the weights of the best epoch.
    - `history`: continue an earlier run (resuming, Lesson 03); epochs are counted on from it, and
      early stopping goes on from it too (its best validation loss, the epochs waited since), so a
      resumed run stops where an uninterrupted one would. Only this call's weights are in memory:
      `restore_best` restores the best epoch only if that epoch is in this call; if an earlier
      epoch stays the best, the model keeps its last weights (load that epoch's checkpoint instead).
    - `on_epoch_end(epoch, history)`: called after each epoch (1-based); returning True stops.
    """
    check_module(model)
    check_int(epochs, "epochs", low=0)
    _check_task(task)
    if patience is not None:
        check_positive_int(patience, "patience (or None)")
    if val_loader is None and (patience is not None or restore_best):
        raise InvalidArgumentError("patience and restore_best need a val_loader: early stopping watches the "
                                   "validation loss; pass val_loader=, or leave patience=None, restore_best=False")
    if top_k is not None:
        check_positive_int(top_k, "top_k (or None)")
    device = model_device(model) if device is None else torch.device(device)
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=DEFAULT_LR)
    history = history if history is not None else History()
    # Early stopping state, carried on from the history when resuming.
    best_loss = min(history.val_loss, default=math.inf)
    waited = len(history.val_loss) - history.best_epoch if history.val_loss else 0
    best_state = None  # the best weights seen in this call (earlier calls' weights are not in memory)
    bar = tqdm(range(epochs), desc="epochs", disable=not progress)
    for _ in bar:
        if patience is not None and waited >= patience:
            break  # no lower validation loss for `patience` epochs
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(model, train_loader, optimizer, loss_fn, device, task=task)
        if val_loader is None:
            if scheduler is not None:
                scheduler.step()
            history.train_loss.append(float(train_loss))
            history.lr.append(float(lr))
            bar.set_postfix(train_loss=f"{train_loss:.3f}")
        else:
            val = evaluate(model, val_loader, loss_fn, device, task=task, top_k=top_k)
            if scheduler is not None:
                scheduler.step()
            for name, value in _epoch_values(train_loss, val, lr):
                getattr(history, name).append(float(value))
            shown = (("val_acc", val.accuracy),) if val.task == "classification" else (("val_mse", val.mse),)
            bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val.loss:.3f}",
                            **{name: f"{value:.3f}" for name, value in shown})
            if val.loss < best_loss:
                best_loss, waited = val.loss, 0
                if restore_best:
                    best_state = copy.deepcopy(model.state_dict())
            else:
                waited += 1
        if on_epoch_end is not None and on_epoch_end(history.epochs, history):
            break
    bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return history


def _epoch_values(train_loss: float, val: Evaluation, lr: float) -> list[tuple[str, float]]:
    """The History entries of one validated epoch, in the order they are appended."""
    if val.task == "regression":
        return [("train_loss", train_loss), ("val_loss", val.loss), ("val_mse", val.mse), ("val_mae", val.mae),
                ("lr", lr)]
    values = [("train_loss", train_loss), ("val_loss", val.loss), ("val_acc", val.accuracy), ("lr", lr)]
    return values + ([("val_top_k", val.top_k)] if val.top_k is not None else [])


def _check_task(task) -> None:
    if task is not None and task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS} or None (read from the targets), got {task!r}")


def _checked_loss(loss_fn: Callable | None, task: str) -> Callable:
    """loss_fn (or the task's default) applied to outputs and targets checked to fit each other."""
    def loss(outputs, targets):
        outputs, targets, _ = check_outputs(outputs, targets, task)
        return (loss_fn or LOSSES[task])(outputs, targets)
    return loss


def _in_top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    if k > logits.shape[1]:
        raise InvalidArgumentError(f"top_k={k} is more than the model's {logits.shape[1]} classes")
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
