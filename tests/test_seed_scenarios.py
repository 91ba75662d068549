"""Issue 15: the seed articles' scenarios replayed from outside, as an engineer who has read only README.md.

Their own models (a LeNet-like CNN on 1x28x28 inputs, a plain MLP) on their own random data, each
scenario end to end with mvtk's public helpers: periodic checkpoints and exact resume, v1/v2 in a
registry with rollback, DataParallel save -> plain load, ONNX export with ONNX Runtime parity,
pruning, int8, distillation, and DDP in 2 processes through the launcher. Nothing here imports a
course model, a private name or a test helper.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mvtk.checkpoint import ModelCheckpoint, latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from mvtk.compress import distill, make_permanent, prune_global, quantize_int8, saved_size, sparsity
from mvtk.errors import InputShapeError
from mvtk.export import Predictor, check_parity, export_onnx, load_session, run_onnx
from mvtk.models import remember_init_args
from mvtk.parallel import launch, load_state_dict_any, returned_values, torchrun_command, unwrap, wrap_data_parallel
from mvtk.registry import Registry
from mvtk.train import History, evaluate, fit


pytestmark = pytest.mark.usefixtures("one_thread")


@remember_init_args
class LeNet(nn.Module):
    """The tutorials' LeNet-5 for 1x28x28 digits, with dropout before its classifier (as PyTorch's MNIST example)."""

    def __init__(self, classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, classes))

    def forward(self, x):
        return self.classifier(self.drop(self.features(x)))


@remember_init_args
class MLP(nn.Module):
    """A plain MLP on the same 1x28x28 inputs."""

    def __init__(self, hidden: int = 64, classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def dataset(samples: int, seed: int) -> TensorDataset:
    """Random 1x28x28 "images" whose class (0-9) a fixed linear rule decides, so a model can learn it."""
    x = torch.rand(samples, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    rule = torch.randn(28 * 28, 10, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, ((x.flatten(1) - 0.5) @ rule).argmax(dim=1))


TRAIN, VAL = dataset(192, seed=0), dataset(96, seed=1)
X_VAL = VAL.tensors[0]


def val_loader() -> DataLoader:
    return DataLoader(VAL, batch_size=48)


def trained(model: nn.Module, epochs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    loader = DataLoader(TRAIN, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    fit(model, loader, epochs=epochs, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), progress=False)
    return model.eval()


def logits(model: nn.Module, x: torch.Tensor = X_VAL) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- periodic checkpoints and exact resume ----------------------------------------------------------

def training_run(seed: int):
    """Everything a run's state holds: model, optimiser, scheduler and the loader's shuffling generator."""
    torch.manual_seed(seed)
    model = LeNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TRAIN, batch_size=32, shuffle=True, generator=generator)
    return model, optimizer, scheduler, loader, generator


def train(run, epochs: int, folder, history: History | None = None) -> History:
    model, optimizer, scheduler, loader, generator = run
    saver = ModelCheckpoint(folder, model, optimizer, scheduler, loader_generator=generator)  # every epoch
    return fit(model, loader, val_loader(), epochs=epochs, optimizer=optimizer, scheduler=scheduler,
               history=history, on_epoch_end=saver, progress=False)


def test_periodic_checkpoints_then_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    straight = training_run(seed=0)
    straight_history = train(straight, 4, tmp_path / "straight")

    train(training_run(seed=0), 2, tmp_path / "crashed")         # the run dies after epoch 2
    resumed = training_run(seed=7)                                # a new process: other weights, RNGs, order
    model, optimizer, scheduler, _, generator = resumed
    meta = load_checkpoint(latest_checkpoint(tmp_path / "crashed"), model, optimizer, scheduler,
                           loader_generator=generator)           # weights, optimiser, scheduler, every RNG
    assert meta["epoch"] == 2
    history = train(resumed, 4 - meta["epoch"], tmp_path / "crashed", History.from_dict(meta["history"]))

    assert history.to_dict() == straight_history.to_dict()
    for name, value in straight[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert scheduler.state_dict() == straight[2].state_dict()
    torch.testing.assert_close(optimizer.state_dict(), straight[1].state_dict(), rtol=0, atol=0)
    files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert sorted(p.name for p in (tmp_path / "crashed").iterdir()) == files  # the same files, the same names
    assert "last.pt" in files and any(name.startswith("epoch=0004-val_loss=") for name in files)


# --- v1 and v2 in a registry, with rollback ---------------------------------------------------------

def test_v1_then_v2_in_a_registry_and_a_rollback_to_v1(tmp_path):
    v1_model, v2_model = trained(MLP(hidden=32)), trained(MLP(hidden=64, dropout=0.2))
    with Registry(tmp_path / "registry") as registry:
        for model, parent in ((v1_model, None), (v2_model, 1)):
            accuracy = evaluate(model, val_loader()).accuracy
            registry.register("digits", model, parent=parent, metrics={"val_acc": accuracy})
        registry.set_alias("digits", "production", 1)
        registry.set_alias("digits", "staging", 2)
        assert registry.promote("digits").version == 2            # staging -> production
        diff = registry.diff("digits", 1, 2)
        assert diff.architecture_changed and "hidden=64" in str(diff)

        assert registry.rollback("digits", "production").version == 1
        served = registry.load_model("digits@production")        # imports MLP, rebuilds it, verified weights
        assert isinstance(served, MLP) and torch.equal(logits(served), logits(v1_model))
        assert [(e.action, e.version) for e in registry.alias_history("digits", "production")] == [
            ("set", 1), ("promote", 2), ("rollback", 1)]
        assert [v.version for v in registry.lineage("digits", 2)] == [1, 2]


# --- DataParallel save -> plain load ----------------------------------------------------------------

def test_a_data_parallel_checkpoint_loads_into_a_plain_model(tmp_path):
    torch.manual_seed(0)
    wrapped = wrap_data_parallel(LeNet())  # on a CPU-only machine nn.DataParallel just calls the module
    optimizer = torch.optim.Adam(wrapped.parameters())
    fit(wrapped, DataLoader(TRAIN, batch_size=32), epochs=1, optimizer=optimizer, progress=False)
    save_checkpoint(tmp_path / "dp.pt", wrapped, optimizer, epoch=1)  # keys start with 'module.'

    plain = LeNet()
    load_checkpoint(tmp_path / "dp.pt", plain)                   # every key has 'module.': stripped for a plain model
    by_hand = LeNet()
    load_state_dict_any(by_hand, read_checkpoint(tmp_path / "dp.pt")["model"])  # the same, from the state_dict
    assert torch.equal(logits(by_hand), logits(plain))
    fresh_optimizer = torch.optim.Adam(plain.parameters())
    load_checkpoint(tmp_path / "dp.pt", optimizer=fresh_optimizer)
    assert torch.equal(logits(plain), logits(unwrap(wrapped).cpu()))
    torch.testing.assert_close(fresh_optimizer.state_dict(), optimizer.state_dict(), rtol=0, atol=0, check_device=False)

    save_checkpoint(tmp_path / "plain.pt", unwrap(wrapped), epoch=1)  # or save the module inside the wrapper
    again = LeNet()
    load_checkpoint(tmp_path / "plain.pt", again)
    assert torch.equal(logits(again), logits(plain))


# --- ONNX export, checked against ONNX Runtime ------------------------------------------------------

def test_onnx_export_agrees_with_onnx_runtime_and_serves_behind_a_predictor(tmp_path):
    model = trained(LeNet())
    path = export_onnx(model, X_VAL[:4], tmp_path / "lenet.onnx")  # dynamic batch, checked, with a manifest
    session = load_session(path)
    parity = check_parity(model, session, X_VAL)                  # raises beyond rtol 1e-3, atol 1e-5
    assert parity.samples == len(X_VAL) and parity.agreement == 1.0
    assert run_onnx(session, X_VAL[:1]).shape == (1, 10)          # any batch size

    predictor = Predictor(path, task="classification", value_range=(0, 1))
    assert predictor.input_shape == (1, 28, 28)
    assert (predictor.predict(X_VAL).labels == logits(model).argmax(dim=1).numpy()).all()
    with pytest.raises(InputShapeError, match=r"expects a batch of shape \(N, 1, 28, 28\)"):
        predictor.predict(torch.rand(2, 1, 32, 32))
    with pytest.raises(InputShapeError, match=r"values in \[0, 1\]"):
        predictor.predict(X_VAL * 255)


# --- pruning ----------------------------------------------------------------------------------------

def test_a_pruned_and_fine_tuned_model_saves_and_loads_as_a_plain_one(tmp_path):
    model = trained(LeNet())
    dense_accuracy = evaluate(model, val_loader()).accuracy
    prune_global(model, 0.6)                                       # the smallest 60% of the weights, ranked together
    trained(model, epochs=2)                                       # fine-tune: the masks keep them at zero
    make_permanent(model)
    assert sparsity(model) > 0.55
    save_checkpoint(tmp_path / "pruned.pt", model, epoch=1)
    plain = LeNet()
    load_checkpoint(tmp_path / "pruned.pt", plain)                 # the ordinary class: no masks left
    assert torch.equal(logits(plain), logits(model))
    assert evaluate(plain, val_loader()).accuracy >= dense_accuracy - 0.1
    pruned_gzip = saved_size(plain, tmp_path / "pruned-state.pt")[1]
    assert pruned_gzip < 0.75 * saved_size(trained(LeNet()), tmp_path / "dense-state.pt")[1]


# --- int8 -------------------------------------------------------------------------------------------

def test_int8_is_smaller_and_about_as_accurate(tmp_path):
    for model in (trained(MLP(hidden=128)), trained(LeNet())):
        int8 = quantize_int8(model)                                # a copy; Linear layers int8, convolutions float
        before, after = evaluate(model, val_loader()).accuracy, evaluate(int8, val_loader()).accuracy
        assert abs(after - before) <= 0.05
        assert (logits(int8).argmax(1) == logits(model).argmax(1)).float().mean() >= 0.9
    float_bytes, int8_bytes = saved_size(model, tmp_path / "f.pt")[0], saved_size(int8, tmp_path / "q.pt")[0]
    assert float_bytes / int8_bytes > 2  # LeNet: its Linear layers hold most of the weights


# --- distillation -----------------------------------------------------------------------------------

def test_a_small_mlp_learns_from_a_lenet_teacher():
    teacher = trained(LeNet(), epochs=4)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = MLP(hidden=16)
    agreement = lambda: (logits(student).argmax(1) == logits(teacher).argmax(1)).float().mean().item()
    before = agreement()
    loader = DataLoader(TRAIN, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    losses = distill(student, teacher, loader, epochs=4, temperature=4.0, alpha=0.7, progress=False)
    assert losses[-1] < losses[0] and agreement() > before
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())  # the teacher is frozen


# --- DDP: 2 processes on gloo through the launcher -------------------------------------------------

USER_TRAIN = """
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from mvtk.checkpoint import save_checkpoint
from mvtk.parallel import shard_loader, unwrap
from mvtk.train import train_one_epoch

GLOBAL_BATCH = 32


def data():
    x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x.flatten(1) @ torch.randn(784, 10, generator=torch.Generator().manual_seed(1))).argmax(1))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def optimizer_for(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def main(rank, world_size, epochs=2, out="."):
    net = DistributedDataParallel(model())
    loader = shard_loader(data(), GLOBAL_BATCH // world_size, shuffle=False)  # this rank's share of each batch
    optimizer = optimizer_for(net)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(net, loader, optimizer)
    if rank == 0:
        save_checkpoint(Path(out) / "ddp.pt", unwrap(net), optimizer, epoch=epochs)
    return [rank, world_size]


def one_process(epochs=2):
    net = model()
    optimizer = optimizer_for(net)
    for _ in range(epochs):
        train_one_epoch(net, DataLoader(data(), batch_size=GLOBAL_BATCH), optimizer)
    return net
"""


def test_the_same_run_from_a_terminal_is_one_torchrun_command():
    assert torchrun_command("user_train:main", kwargs={"epochs": 2}, backend="gloo", program=["torchrun"]) == [
        "torchrun", "--standalone", "--nproc_per_node=2", "-m", "mvtk.parallel", "run", "user_train:main",
        "--kwargs-json", '{"epochs": 2}', "--backend", "gloo"]


@pytest.mark.slow
def test_two_process_ddp_through_the_launcher_equals_one_process(tmp_path, monkeypatch):
    (tmp_path / "user_train.py").write_text(USER_TRAIN)
    result = launch("user_train:main", nproc=2, cwd=tmp_path, threads=1, timeout=300, backend="gloo",
                    kwargs={"epochs": 2, "out": str(tmp_path)})
    assert returned_values(result) == {0: [0, 2], 1: [1, 2]}

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_train", raising=False)
    import user_train

    ddp = user_train.model()
    meta = load_checkpoint(tmp_path / "ddp.pt", ddp)               # rank 0's checkpoint, a plain model's keys
    assert meta["epoch"] == 2
    one = user_train.one_process(epochs=2)                         # the same global batches in one process
    for name, value in one.state_dict().items():
        np.testing.assert_allclose(ddp.state_dict()[name].numpy(), value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
