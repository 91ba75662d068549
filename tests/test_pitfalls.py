"""Lesson 12's claims: each broken snippet fails with exactly the exception the notebook shows, each silent
mistake changes a measurement, and each fix works. `expect_error` (tested in test_errors.py) is the helper every broken cell runs in."""
import copy
import io
import pickle
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mvtk.data import make_loaders
from mvtk.errors import InputShapeError
from mvtk.models import MLP, MLPv2, SmallCNN


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))


# --- §1 saving and loading -----------------------------------------------------------------------

def test_modules_have_no_save_state_dict(mlp, tmp_path):
    with pytest.raises(AttributeError, match="save_state_dict"):
        mlp.save_state_dict(tmp_path / "mlp.pt")


def test_a_loaded_state_dict_is_not_a_model(mlp, batch, tmp_path):
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    loaded = torch.load(tmp_path / "mlp.pt", weights_only=True)
    with pytest.raises(TypeError, match="not callable"):
        loaded(batch[0])


def test_load_state_dict_returns_a_report_not_the_model(mlp, batch):
    report = MLP(hidden=16).load_state_dict(mlp.state_dict())
    assert not report.missing_keys and not report.unexpected_keys
    with pytest.raises(TypeError, match="not callable"):
        report(batch[0])


# --- §2 unpacking ---------------------------------------------------------------------------------

class ImagesOnly(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_unpacking_a_tensor_dataset_of_inputs_only_fails():
    with pytest.raises(ValueError, match="expected 2, got 1"):
        for inputs, labels in DataLoader(TensorDataset(torch.rand(8, 1, 8, 8)), batch_size=4):
            pass


def test_unpacking_a_batch_tensor_fails_unless_the_batch_has_two_items():
    images = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match="too many values to unpack"):
        for inputs, labels in DataLoader(ImagesOnly(images), batch_size=4):
            pass
    inputs, labels = next(iter(DataLoader(ImagesOnly(images), batch_size=2)))
    assert labels.dtype == torch.float32 and tuple(labels.shape) == (1, 8, 8)  # silently an image


# --- §3 shapes -------------------------------------------------------------------------------------

def test_a_hard_coded_flatten_size_fits_one_resolution_and_channel_count():
    features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Linear(16 * 8 * 8, 10)  # worked out for 16x16
    assert head(features(torch.rand(2, 1, 16, 16)).flatten(1)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        head(features(torch.rand(2, 1, 28, 28)).flatten(1))
    with pytest.raises(RuntimeError, match="to have 1 channels, but got 3"):
        features(torch.rand(2, 3, 16, 16))


def test_smallcnn_names_the_input_shape_it_expects():
    with pytest.raises(InputShapeError, match="expects input of shape"):
        SmallCNN(in_channels=1, input_size=16)(torch.rand(2, 3, 16, 16))
    assert SmallCNN(in_channels=3, input_size=28)(torch.rand(2, 3, 28, 28)).shape == (2, 10)


# --- §4 distillation --------------------------------------------------------------------------------

def test_a_loss_on_the_teachers_output_leaves_the_student_unchanged(batch):
    torch.manual_seed(0)
    teacher, student = MLP(), MLP(hidden=16)
    before = copy.deepcopy(student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    inputs, labels = batch
    teacher_logits = teacher(inputs)
    student(inputs)
    loss = F.cross_entropy(teacher_logits, labels)  # the teacher's output where the student's belongs
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is not None for p in teacher.parameters())


def test_a_teacher_under_no_grad_makes_that_mistake_loud(batch):
    teacher = MLP()
    with torch.no_grad():
        teacher_logits = teacher(batch[0])
    with pytest.raises(RuntimeError, match="does not require grad"):
        F.cross_entropy(teacher_logits, batch[1]).backward()


# --- §5 pruning ---------------------------------------------------------------------------------

def test_global_unstructured_needs_a_method_and_module_name_pairs(mlp):
    with pytest.raises(TypeError, match="pruning_method"):
        prune.global_unstructured([(mlp.fc1, "weight")], amount=0.5)
    with pytest.raises(ValueError, match="too many values to unpack"):
        prune.global_unstructured(mlp.parameters(), pruning_method=prune.L1Unstructured, amount=0.5)


def test_prune_remove_needs_the_module_not_the_tensor(mlp):
    prune.l1_unstructured(mlp.fc1, "weight", amount=0.5)
    with pytest.raises(AttributeError, match="_forward_pre_hooks"):
        prune.remove(mlp.fc1.weight, "weight")
    prune.remove(mlp.fc1, "weight")
    assert "fc1.weight" in mlp.state_dict() and "fc1.weight_mask" not in mlp.state_dict()


def _saved_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def test_pruning_makes_the_file_larger_until_removed_and_never_smaller(mlp):
    dense = _saved_bytes(mlp.state_dict())
    prune.global_unstructured([(mlp.fc1, "weight"), (mlp.fc2, "weight")],
                              pruning_method=prune.L1Unstructured, amount=0.8)
    assert _saved_bytes(mlp.state_dict()) > 1.5 * dense
    prune.remove(mlp.fc1, "weight")
    prune.remove(mlp.fc2, "weight")
    assert abs(_saved_bytes(mlp.state_dict()) - dense) < 0.02 * dense


# --- §6 quantization ----------------------------------------------------------------------------

def test_invented_quantization_names_do_not_exist():
    import torchao.quantization

    with pytest.raises(ModuleNotFoundError, match="torchao.quantization.int8"):
        from torchao.quantization.int8 import quantize_model  # noqa: F401
    with pytest.raises(AttributeError, match="quantize_int8"):
        torchao.quantization.quantize_int8  # noqa: B018


def test_folding_batch_norm_refuses_a_model_in_training_mode():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    with pytest.raises(AssertionError, match="Fusion only for eval"):
        fuse_conv_bn_eval(nn.Conv2d(1, 4, 3).train(), nn.BatchNorm2d(4).train())


def test_torchao_quantize_keeps_training_mode_and_dropout():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model, inputs = MLPv2().train(), torch.rand(64, 1, 8, 8)
    quantize_(model, Int8WeightOnlyConfig())
    with torch.no_grad():
        assert model.training and not torch.equal(model(inputs), model(inputs))
        model.eval()
        assert torch.equal(model(inputs), model(inputs))


# --- §7 distributed and DataParallel ---------------------------------------------------------------

def test_ddp_without_a_process_group_raises_value_error(mlp):
    if dist.is_initialized():
        pytest.skip("another test left a process group initialized in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        DDP(mlp)


def test_ddp_and_init_process_group_reject_invented_arguments(mlp):
    with pytest.raises(TypeError, match="unexpected keyword argument 'world_size'"):
        DDP(mlp, world_size=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_gpus'"):
        dist.init_process_group("gloo", num_gpus=2)


def test_a_one_process_gloo_group_runs_ddp(mlp, batch, tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").resolve().as_uri(), rank=0, world_size=1)
    try:
        model = DDP(mlp)
        model(batch[0]).sum().backward()
        assert dist.get_world_size() == 1 and all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DataParallel checks devices only when GPUs are visible")
def test_dataparallel_moved_away_from_device_ids_0_fails(mlp, batch):
    wrapped = nn.DataParallel(mlp.to("cuda"))
    wrapped.to("cpu")
    with pytest.raises(RuntimeError, match=re.escape("device_ids[0]")):
        wrapped(batch[0])


# --- §8 and §9 evaluation and zero_grad -------------------------------------------------------------

def test_training_mode_makes_evaluation_random_and_eval_mode_repeatable():
    torch.manual_seed(0)
    model, inputs = MLPv2().train(), torch.rand(64, 1, 8, 8)
    assert not torch.equal(model(inputs), model(inputs))
    assert model(inputs).requires_grad
    model.eval()
    with torch.no_grad():
        first, second = model(inputs), model(inputs)
    assert torch.equal(first, second) and not first.requires_grad


def test_backward_without_zero_grad_adds_gradients(mlp, batch):
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    once = mlp.fc1.weight.grad.clone()
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert torch.allclose(mlp.fc1.weight.grad, 2 * once)


# --- §10 the module. prefix ------------------------------------------------------------------------

def test_a_wrapped_state_dict_does_not_load_into_a_plain_model_until_stripped(mlp, batch):
    state = nn.DataParallel(mlp).state_dict()
    assert all(key.startswith("module.") for key in state)
    with pytest.raises(RuntimeError, match=re.escape("Unexpected key(s) in state_dict")):
        MLP(hidden=16).load_state_dict(state)
    consume_prefix_in_state_dict_if_present(state, "module.")
    plain = MLP(hidden=16)
    plain.load_state_dict(state)
    assert torch.equal(plain(batch[0]), mlp(batch[0]))


# --- §11 weights_only ----------------------------------------------------------------------------

def test_weights_only_loading_refuses_pickled_code(planted):
    evil, marker = planted  # a file whose pickle calls exec(...) when loaded unsafely
    assert torch.serialization.get_unsafe_globals_in_checkpoint(evil) == ["builtins.exec"]
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL exec was not an allowed global"):
        torch.load(evil, weights_only=True)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL exec was not an allowed global"):
        torch.load(evil)  # weights_only=True is the default
    assert not marker.exists()


def test_weights_only_false_runs_the_payload(planted):
    evil, marker = planted
    torch.load(evil, weights_only=False)  # our own file, with a harmless payload
    assert marker.exists()


# --- §12 resuming --------------------------------------------------------------------------------

def _start():
    torch.manual_seed(0)
    model = MLP(hidden=16)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2)))
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), loader


def _train(model, optimizer, loader, epochs):
    for _ in range(epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    return model


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resuming_from_weights_only_changes_the_result():
    straight = _train(*_start(), epochs=4)
    first = _train(*_start(), epochs=2)
    model, optimizer, loader = _start()
    model.load_state_dict(first.state_dict())
    assert not _same(straight, _train(model, optimizer, loader, epochs=2))


def test_resuming_from_a_full_checkpoint_reproduces_the_run(tmp_path):
    straight = _train(*_start(), epochs=4)
    model, optimizer, loader = _start()
    _train(model, optimizer, loader, epochs=2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "loader_rng": loader.generator.get_state()}, tmp_path / "full.pt")
    model, optimizer, loader = _start()
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader.generator.set_state(state["loader_rng"])
    assert _same(straight, _train(model, optimizer, loader, epochs=2))


# --- §13 loaders ------------------------------------------------------------------------------------

def test_a_loader_rebuilt_each_epoch_with_a_seed_repeats_its_order():
    rebuilt = [next(iter(make_loaders(seed=0).train))[1] for _ in range(2)]
    assert torch.equal(rebuilt[0], rebuilt[1])
    once = make_loaders(seed=0).train
    assert not torch.equal(next(iter(once))[1], next(iter(once))[1])


# --- §14 periodic saving ----------------------------------------------------------------------------

def test_saving_every_100_counting_from_0_never_writes_the_last_epoch(tmp_path):
    for epoch in range(1000):
        if epoch % 100 == 0:
            torch.save({"epoch": epoch}, tmp_path / f"epoch_{epoch}.pt")
    assert sorted(int(p.stem[6:]) for p in tmp_path.glob("epoch_*.pt")) == list(range(0, 1000, 100))
    with pytest.raises(FileNotFoundError, match="epoch_999.pt"):
        torch.load(tmp_path / "epoch_999.pt", weights_only=True)


# --- §15 devices and logged losses --------------------------------------------------------------

def test_a_model_and_its_inputs_on_different_devices_fail(mlp, batch):
    with pytest.raises(RuntimeError, match="is not on the expected device"):
        copy.deepcopy(mlp).to("meta")(batch[0])
    with pytest.raises(RuntimeError, match="is not on the expected device"):
        mlp(batch[0].to("meta"))


def test_a_logged_loss_tensor_keeps_its_graph_and_a_float_does_not(mlp, batch):
    loss = F.cross_entropy(mlp(batch[0]), batch[1])
    assert "grad_fn" in repr(loss) and loss.grad_fn is not None
    assert isinstance(loss.item(), float)
