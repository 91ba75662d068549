"""The training loop of Lesson 02: `fit`, `train_one_epoch`, `train_step`, `evaluate` and the `History` they fill.

Written to be read: a learner should recognise every line of the loop from notebook 02.
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

__all__ = ["DEFAULT_LR", "History", "Evaluation", "train_step", "train_one_epoch", "evaluate", "fit"]

DEFAULT_LR = 3e-3  # Adam's learning rate when fit() makes the optimizer; right for the course's models


@dataclass
class History:
    """Per-epoch metrics of a training run, as plain lists (so checkpoints can hold it) (Lesson 02, §5)."""
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    @property
    def best_epoch(self) -> int | None:
        """The 1-based epoch with the lowest validation loss, or None before any epoch."""
        if not self.val_loss:
            return None
        return min(range(len(self.val_loss)), key=self.val_loss.__getitem__) + 1

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)

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
    """Mean loss and accuracy of a model on a data set (Lesson 02, §5)."""
    loss: float
    accuracy: float


def train_step(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: Callable = nn.functional.cross_entropy) -> torch.Tensor:
    """One gradient step on one batch: zero the gradients, forward, loss, backward, update (Lesson 02, §5).

    Returns the batch's loss, detached. `loss_fn(outputs, labels)` may be any loss, e.g. a distillation
    loss that also compares with a teacher's outputs (Lesson 06, §7).
    """
    optimizer.zero_grad()
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable = nn.functional.cross_entropy,
                    device: torch.device | str | None = None) -> float:
    """One pass over `loader` with gradient steps; returns the mean training loss per sample (Lesson 02, §5)."""
    check_module(model)
    device = model_device(model) if device is None else torch.device(device)
    model.train()
    total, count = 0.0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        loss = train_step(model, inputs, labels, optimizer, loss_fn)
        total += loss.item() * len(labels)
        count += len(labels)
    if count == 0:
        raise InvalidArgumentError("the training loader yielded no batches")
    return total / count


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable = nn.functional.cross_entropy,
             device: torch.device | str | None = None) -> Evaluation:
    """Mean loss and accuracy over `loader`, in eval mode and without gradients (Lesson 02, §5).

    The model's train/eval mode is restored afterwards.
    """
    check_module(model)
    device = model_device(model) if device is None else torch.device(device)
    total, correct, count = 0.0, 0, 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            total += loss_fn(logits, labels).item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += len(labels)
    if count == 0:
        raise InvalidArgumentError("the evaluation loader yielded no batches")
    return Evaluation(loss=total / count, accuracy=correct / count)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, *, epochs: int,
        optimizer: torch.optim.Optimizer | None = None, loss_fn: Callable = nn.functional.cross_entropy,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, patience: int | None = None,
        restore_best: bool = False, device: torch.device | str | None = None,
        history: History | None = None, on_epoch_end: Callable[[int, History], bool | None] | None = None,
        progress: bool = True) -> History:
    """Train for `epochs` epochs, validating after each; returns the History (Lesson 02, §5-§8).

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
    if patience is not None:
        check_positive_int(patience, "patience (or None)")
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
        train_loss = train_one_epoch(model, train_loader, optimizer, loss_fn, device)
        val = evaluate(model, val_loader, loss_fn, device)
        if scheduler is not None:
            scheduler.step()
        for name, value in (("train_loss", train_loss), ("val_loss", val.loss), ("val_acc", val.accuracy), ("lr", lr)):
            getattr(history, name).append(float(value))
        bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val.loss:.3f}", val_acc=f"{val.accuracy:.3f}")
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
