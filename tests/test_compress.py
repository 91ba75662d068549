"""Lesson 06's claims about mvtk.compress: measuring, pruning, int8, distillation, and clear errors."""
import copy
import gzip
import io
import re

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from mvtk import compress
from mvtk.data import ImageDataset
from mvtk.errors import CheckpointError, IntegrityError, InvalidArgumentError
from mvtk.models import MLP, MLPv2, build_model, count_parameters


@pytest.fixture
def wide():
    """An MLPv2 wide enough that file headers are a small part of its saved size."""
    torch.manual_seed(0)
    return MLPv2(hidden=1024).eval()


@pytest.fixture
def loader():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(40, 1, 8, 8, generator=generator), torch.randint(0, 10, (40,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=16)


def saved_bytes(model, tmp_path, name="m.pt"):
    return compress.saved_size(model, tmp_path / name)


# --- measuring ----------------------------------------------------------------------------------

def test_measure_reports_the_saved_file_and_every_batch_size(mlp, loader, tmp_path):
    row = compress.measure(mlp, loader, tmp_path, "course mlp", repeats=2, warmup=1)
    assert row.file_bytes == (tmp_path / "course_mlp.pt").stat().st_size
    assert row.weights == count_parameters(mlp) and row.sparsity == 0.0
    assert 0.0 <= row.accuracy <= 1.0 and 0 < row.gzip_bytes
    assert set(row.latency_ms) == set(compress.LATENCY_BATCHES) and all(ms > 0 for ms in row.latency_ms.values())
    assert row.speedup == {b: 1.0 for b in compress.LATENCY_BATCHES}  # no baseline: its own reference


def test_measure_times_a_variant_in_turns_with_its_baseline(mlp, loader, tmp_path, monkeypatch):
    timed = []

    def fake_median_latencies(fns, **kwargs):  # records what is timed together, answers 2 ms and 1 ms
        timed.append(len(fns))
        return [0.002, 0.001][:len(fns)]

    monkeypatch.setattr(compress, "median_latencies", fake_median_latencies)
    row = compress.measure(compress.cast(mlp, torch.bfloat16), loader, tmp_path, "bf16", baseline=mlp)
    assert timed == [2] * len(compress.LATENCY_BATCHES)  # the variant and the baseline in one alternating run
    assert row.latency_ms == {b: 2.0 for b in compress.LATENCY_BATCHES}
    assert row.speedup == {b: 0.5 for b in compress.LATENCY_BATCHES}  # baseline ms / variant ms


def test_latency_keeps_the_thread_count_and_training_modes(mlp):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not the 1 thread timed with, so a thread count left behind would show
    try:
        other = MLP().train()
        mlp.train()
        times = compress.latencies_ms([mlp, other.eval()], (1, 8, 8), 4, threads=1, repeats=2, warmup=1)
        assert torch.get_num_threads() == 2 and mlp.training and not other.training
        assert len(times) == 2 and all(ms > 0 for ms in times)
    finally:
        torch.set_num_threads(before)


def test_report_gives_ratios_to_the_first_row(mlp, loader, tmp_path):
    base = compress.measure(mlp, loader, tmp_path, "fp32", repeats=2, warmup=1)
    half = compress.measure(compress.cast(mlp, torch.bfloat16), loader, tmp_path, "bf16", baseline=mlp,
                            repeats=2, warmup=1)
    table = compress.report([base, half])
    assert "fp32" in table and "bf16" in table and "1.00x" in table
    assert f"{base.file_bytes / half.file_bytes:.2f}x" in table
    assert f"{half.speedup[256]:.2f}x" in table.splitlines()[-1]


def test_measure_refuses_an_empty_loader(mlp, tmp_path):
    empty = DataLoader(TensorDataset(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(InvalidArgumentError, match="loader yields no batches"):
        compress.measure(mlp, empty, tmp_path, "empty")


def test_plot_tradeoff_draws_a_filled_and_a_hollow_point_per_variant(mlp, loader, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [compress.measure(mlp, loader, tmp_path, "fp32", repeats=2, warmup=1),
            compress.measure(compress.cast(mlp, torch.bfloat16), loader, tmp_path, "bf16", repeats=2, warmup=1)]
    ax = compress.plot_tradeoff(rows)
    points = sorted(v for c in ax.collections for p in c.get_offsets().tolist() for v in p)
    expected = sorted(v for r in rows for size in (r.file_bytes, r.gzip_bytes) for v in (size / 1000, 100 * r.accuracy))
    assert len(ax.collections) == 2 * len(rows) and points == pytest.approx(expected)
    assert [t.get_text() for t in ax.texts] == ["fp32", "bf16"]
    plt.close(ax.figure)


# --- pruning --------------------------------------------------------------------------------------

def test_prune_layer_keeps_the_original_weights_and_a_mask(mlp):
    compress.prune_layer(mlp, "fc1", 0.5)
    assert {n for n, _ in mlp.fc1.named_parameters()} == {"weight_orig", "bias"}
    assert {n for n, _ in mlp.fc1.named_buffers()} == {"weight_mask"}
    assert torch.equal(mlp.fc1.weight, mlp.fc1.weight_orig * mlp.fc1.weight_mask)
    assert int((mlp.fc1.weight == 0).sum()) == mlp.fc1.weight.numel() // 2


def test_prune_global_ranks_all_layers_together(mlp):
    compress.prune_global(mlp, 0.8)
    zeros = [(m.weight == 0).float().mean().item() for m in (mlp.fc1, mlp.fc2)]
    total = sum(int((m.weight == 0).sum()) for m in (mlp.fc1, mlp.fc2))
    assert total == round(0.8 * (mlp.fc1.weight.numel() + mlp.fc2.weight.numel()))
    assert zeros[0] != zeros[1]


def test_make_permanent_leaves_plain_weights_with_the_zeros(mlp):
    compress.make_permanent(compress.prune_global(mlp, 0.6))
    assert sorted(mlp.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert not prune.is_pruned(mlp) and (mlp.fc1.weight == 0).float().mean().item() > 0.3


def test_prune_neurons_zeroes_whole_rows(mlp):
    compress.prune_neurons(mlp, "fc1", 0.25)  # 4 of its 16 neurons
    zero_rows = (mlp.fc1.weight.abs().sum(dim=1) == 0)
    assert int(zero_rows.sum()) == 4 and int((mlp.fc1.weight == 0).sum()) == 4 * 64


def test_structured_pruning_zeroes_whole_conv_filters():
    cnn = build_model("cnn")
    compress.prune_neurons(cnn, "features.conv1", 0.5)
    assert int((cnn.features.conv1.weight.flatten(1).abs().sum(1) == 0).sum()) == 8


def test_dropping_pruned_neurons_gives_a_smaller_model_with_the_same_outputs(mlp):
    with torch.no_grad():
        mlp.fc1.bias.fill_(0.1)  # pruned neurons still output relu(bias): it must be folded into fc2
    compress.prune_neurons(mlp, "fc1", 0.75)  # 12 of its 16 neurons
    smaller = compress.drop_pruned_neurons(mlp, "fc1", "fc2")
    assert tuple(smaller.fc1.weight.shape) == (4, 64) and tuple(smaller.fc2.weight.shape) == (10, 4)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(mlp(x), smaller(x), atol=1e-6)


def test_unstructured_pruned_dense_file_is_not_smaller_but_its_gzip_is(wide, tmp_path):
    dense_bytes, dense_gzip = saved_bytes(wide, tmp_path, "dense.pt")
    pruned = compress.make_permanent(compress.prune_global(copy.deepcopy(wide), 0.9))
    pruned_bytes, pruned_gzip = saved_bytes(pruned, tmp_path, "pruned.pt")
    assert abs(pruned_bytes - dense_bytes) < 0.01 * dense_bytes
    assert pruned_gzip < 0.4 * dense_gzip


def test_a_pruned_model_can_be_copied_after_a_training_step(mlp):
    compress.prune_global(mlp, 0.5)
    mlp.train()
    cross_entropy(mlp(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()  # weight is now in a graph
    assert compress.sparsity(compress.quantize_int8(mlp)) > 0.4


# --- quantization ---------------------------------------------------------------------------------

def test_cast_halves_the_file_and_keeps_float32_inputs_and_outputs(wide, tmp_path):
    half = compress.cast(wide, torch.float16)
    assert half.fc1.weight.dtype == torch.float16 and wide.fc1.weight.dtype == torch.float32
    assert half(torch.rand(2, 1, 8, 8)).dtype == torch.float32
    assert saved_bytes(wide, tmp_path, "a.pt")[0] / saved_bytes(half, tmp_path, "b.pt")[0] > 1.8  # headers: not quite 2


def test_int8_state_dict_is_at_least_3_85x_smaller_for_the_wide_mlp(wide, tmp_path):
    int8 = compress.quantize_int8(wide)  # not quite 4x: float32 biases, a scale and a zero point per output row
    assert saved_bytes(wide, tmp_path, "fp32.pt")[0] / saved_bytes(int8, tmp_path, "int8.pt")[0] >= 3.85


def test_int8_outputs_stay_close_to_float32_in_both_modes(wide):
    x = torch.rand(16, 1, 8, 8)
    for mode in compress.INT8_MODES:
        with torch.no_grad():
            assert (compress.quantize_int8(wide, mode)(x) - wide(x)).abs().max() < 0.05


def test_int8_stores_torchao_int8_weights_and_leaves_the_model_unchanged(mlp):
    before = copy.deepcopy(mlp.state_dict())
    for mode in compress.INT8_MODES:
        int8 = compress.quantize_int8(mlp, mode)
        assert type(int8.fc1.weight).__name__ == "Int8Tensor" and int8.fc1.weight.qdata.dtype == torch.int8
    assert type(mlp.fc1.weight) is nn.Parameter
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_int8_config_names_the_torchao_config():
    assert type(compress.int8_config("weight_only")).__name__ == "Int8WeightOnlyConfig"
    assert type(compress.int8_config("dynamic")).__name__ == "Int8DynamicActivationInt8WeightConfig"


def test_compiled_int8_computes_what_eager_int8_computes_and_measures_the_same_size(wide, loader, tmp_path):
    eager, compiled = compress.quantize_int8(wide), compress.quantize_int8(wide, compiled=True)
    x = torch.rand(4, 1, 8, 8)
    with torch.inference_mode():
        assert (compiled(x) - eager(x)).abs().max() < 1e-3
    assert compress.saved_size(compiled, tmp_path / "c.pt") == compress.saved_size(eager, tmp_path / "e.pt")


def test_int8_and_qat_work_on_a_model_that_is_not_a_course_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 3)).eval()
    x = torch.rand(8, 3, 12, 12)
    int8 = compress.quantize_int8(model)
    assert type(int8[5].weight).__name__ == "Int8Tensor" and type(int8[0].weight) is nn.Parameter  # conv stays float
    qat = compress.prepare_qat(model).train()
    cross_entropy(qat(x), torch.zeros(8, dtype=torch.long)).backward()
    assert qat[5].weight.grad is not None and qat[0].weight.grad is not None
    with torch.no_grad():
        assert (compress.convert_qat(qat.eval())(x) - model(x)).abs().max() < 0.1


def test_qat_fake_quantizes_in_training_and_converts_to_the_same_int8_model(wide):
    x = torch.rand(16, 1, 8, 8)
    qat = compress.prepare_qat(wide).eval()
    assert type(qat.fc1).__name__ == "FakeQuantizedLinear" and type(wide.fc1) is nn.Linear
    with torch.no_grad():
        fake, real = qat(x), wide(x)
        assert 0 < (fake - real).abs().max() < 0.05  # rounded to int8 and back: close, not equal
        converted = compress.convert_qat(qat)
        assert type(converted.fc1.weight).__name__ == "Int8Tensor"
        assert (converted(x) - compress.quantize_int8(wide)(x)).abs().max() < 1e-4  # untrained QAT = plain int8


def test_qat_refusals_name_what_is_assumed(mlp):
    with pytest.raises(InvalidArgumentError, match="no nn.Linear layer to train for int8"):
        compress.prepare_qat(nn.Sequential(nn.Conv2d(1, 4, 3)))
    with pytest.raises(InvalidArgumentError, match="made by prepare_qat"):
        compress.convert_qat(mlp)


def test_compressed_file_loads_back_into_the_same_model(mlp, tmp_path):
    int8 = compress.quantize_int8(compress.make_permanent(compress.prune_global(mlp, 0.9)))
    size = compress.save_compressed(int8, tmp_path / "model.pt.gz")
    assert size == (tmp_path / "model.pt.gz").stat().st_size
    restored = compress.quantize_int8(MLP(hidden=16))
    restored.load_state_dict(compress.load_compressed(tmp_path / "model.pt.gz"))
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(restored(x), int8(x))


# --- distillation ---------------------------------------------------------------------------------

def test_split_labelled_keeps_n_labels_and_hides_the_rest():
    images, labels = torch.rand(50, 1, 8, 8), torch.arange(50) % 10
    labelled, mixed = compress.split_labelled(ImageDataset(images, labels), 12, seed=1)
    assert len(labelled) == 12 and len(mixed) == 50
    assert int((mixed.labels != compress.UNLABELLED).sum()) == 12
    assert sorted(labelled.labels.tolist()) == sorted(mixed.labels[mixed.labels >= 0].tolist())


def test_distillation_loss_is_cross_entropy_at_alpha_zero_and_zero_for_a_perfect_copy():
    logits, labels = torch.randn(6, 10), torch.tensor([0, 1, 2, -1, -1, 5])
    known = labels >= 0
    assert torch.allclose(compress.distillation_loss(logits, torch.randn(6, 10), labels, alpha=0.0),
                          cross_entropy(logits[known], labels[known]))
    assert compress.distillation_loss(logits, logits, labels, alpha=1.0).abs() < 1e-6


def test_distillation_loss_scales_the_soft_term_by_t_squared():
    student, teacher, hidden = torch.randn(6, 10), torch.randn(6, 10), torch.full((6,), -1)
    soft = compress.distillation_loss(student, teacher, hidden, temperature=1.0, alpha=1.0)
    assert torch.allclose(compress.distillation_loss(student * 3, teacher * 3, hidden, temperature=3.0, alpha=1.0),
                          9 * soft)


def test_distill_trains_the_student_and_leaves_the_teacher_as_it_was():
    torch.manual_seed(0)
    teacher, student = MLPv2(hidden=64).train(), MLP(hidden=8)
    before = copy.deepcopy(teacher.state_dict())
    images, labels = torch.rand(64, 1, 8, 8), torch.full((64,), compress.UNLABELLED)
    losses = compress.distill(student, teacher, DataLoader(ImageDataset(images, labels), batch_size=16),
                              epochs=5, progress=False)
    assert losses[-1] < losses[0]
    assert teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_refuses_an_empty_loader():
    empty = DataLoader(ImageDataset(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(InvalidArgumentError, match="loader yields no batches"):
        compress.distill(MLP(hidden=8), MLP(hidden=8), empty, epochs=1, progress=False)


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("amount", [-0.1, 1.5, True, "half", None])
def test_pruning_amount_outside_0_1_is_refused(mlp, amount):
    for prune_it in (lambda: compress.prune_layer(mlp, "fc1", amount), lambda: compress.prune_global(mlp, amount),
                     lambda: compress.prune_neurons(mlp, "fc1", amount)):
        with pytest.raises(InvalidArgumentError, match="amount"):
            prune_it()


def test_a_layer_without_that_parameter_is_refused(mlp):
    with pytest.raises(InvalidArgumentError, match="'act' .*has no parameter 'weight'"):
        compress.prune_layer(mlp, "act", 0.5)
    with pytest.raises(InvalidArgumentError, match="no parameter 'scale'"):
        compress.prune_layer(mlp, "fc1", 0.5, name="scale")


def test_an_unknown_layer_is_refused_with_the_layer_names(mlp):
    with pytest.raises(InvalidArgumentError, match=r"no layer 'fc9'.*\['fc1', 'fc2'\]"):
        compress.prune_neurons(mlp, "fc9", 0.5)


def test_a_model_with_nothing_to_prune_is_refused():
    with pytest.raises(InvalidArgumentError, match="no layers of type"):
        compress.prune_global(nn.Sequential(nn.ReLU()), 0.5)


def test_int8_refuses_a_model_without_linear_layers_and_unknown_modes(mlp):
    with pytest.raises(InvalidArgumentError, match="no nn.Linear"):
        compress.quantize_int8(nn.Sequential(nn.Conv2d(1, 4, 3)))
    with pytest.raises(InvalidArgumentError, match=r"int8 mode 'int4'.*weight_only"):
        compress.quantize_int8(mlp, "int4")


def test_other_bad_input_is_refused(mlp, tmp_path):
    with pytest.raises(InvalidArgumentError, match="dtype"):
        compress.cast(mlp, torch.int8)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        compress.distillation_loss(torch.zeros(1, 10), torch.zeros(1, 10), torch.tensor([0]), temperature=0)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        compress.distillation_loss(torch.zeros(1, 10), torch.zeros(1, 10), torch.tensor([0]), alpha=2)
    with pytest.raises(InvalidArgumentError, match="n_labelled"):
        compress.split_labelled(ImageDataset(torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)), 0)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        compress.latencies_ms([mlp], (1, 8, 8), 0)
    with pytest.raises(InvalidArgumentError, match="nn.Linear layers"):
        compress.drop_pruned_neurons(build_model("cnn"), "features.conv1", "features.conv2")
    (tmp_path / "plain.pt").write_bytes(b"not gzip")
    with pytest.raises(IntegrityError, match=r"plain\.pt.*not an intact file written by save_compressed"):
        compress.load_compressed(tmp_path / "plain.pt")


# --- issue 14: a verified file format, clear errors ------------------------------------------------

def test_every_flipped_byte_of_a_compressed_file_raises_integrity_error_naming_it(mlp, tmp_path):
    path = tmp_path / "model.pt.gz"
    compress.save_compressed(mlp, path)
    good = path.read_bytes()
    for at in list(range(64)) + list(range(64, len(good), 97)) + [len(good) - 1]:
        damaged = bytearray(good)
        damaged[at] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(IntegrityError, match=r"model\.pt\.gz"):
            compress.load_compressed(path)
    path.write_bytes(good)
    assert compress.load_compressed(path).keys() == mlp.state_dict().keys()


def test_a_compressed_file_is_still_a_gzip_file(mlp, tmp_path):
    compress.save_compressed(mlp, tmp_path / "model.pt.gz")
    state = torch.load(io.BytesIO(gzip.decompress((tmp_path / "model.pt.gz").read_bytes())), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in mlp.state_dict().items())


@pytest.mark.parametrize("content", [b"", gzip.compress(b"", mtime=0), gzip.compress(b"not a torch file", mtime=0)],
                         ids=["empty", "empty-gzip", "foreign-gzip"])  # mtime=0: both xdist workers collect the same ids
def test_empty_or_foreign_gzip_files_get_integrity_errors(tmp_path, content):
    (tmp_path / "x.gz").write_bytes(content)
    with pytest.raises(IntegrityError, match=r"x\.gz"):
        compress.load_compressed(tmp_path / "x.gz")


def test_a_resealed_planted_pickle_is_refused_without_running(tmp_path, planted):
    import hashlib
    payload, marker = planted
    plain = gzip.compress(payload.read_bytes(), mtime=0)
    sealed = plain[:3] + bytes([4]) + plain[4:10] + (36).to_bytes(2, "little") + b"MV" + (32).to_bytes(2, "little")
    unsealed = sealed + bytes(32) + plain[10:]
    path = tmp_path / "planted.pt.gz"
    path.write_bytes(sealed + hashlib.sha256(unsealed).digest() + plain[10:])
    with pytest.raises(CheckpointError, match="weights_only"):
        compress.load_compressed(path)
    assert not marker.exists()


@pytest.mark.parametrize("call", [
    lambda m, p: compress.save_compressed("model", p), lambda m, p: compress.save_compressed(m, 3),
    lambda m, p: compress.save_compressed(m, None), lambda m, p: compress.load_compressed(b"x"),
    lambda m, p: compress.saved_size(m, 1.0), lambda m, p: compress.saved_size([m], p),
])
def test_wrong_types_to_file_functions_are_refused(mlp, tmp_path, call):
    with pytest.raises(InvalidArgumentError):
        call(mlp, tmp_path / "m.pt.gz")


def test_a_full_disk_names_the_file_and_keeps_the_old_one(wide, mlp, full_disk):
    path = full_disk / "m.pt.gz"
    compress.save_compressed(mlp, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"m\.pt\.gz.*disk is full"):
        compress.save_compressed(wide, path)
    with pytest.raises(CheckpointError, match=r"w\.pt.*disk is full"):
        compress.saved_size(wide, full_disk / "w.pt")
    assert path.read_bytes() == before and sorted(p.name for p in full_disk.iterdir()) == ["m.pt.gz"]


# --- distillation of a regression model (issue 15) ----------------------------------------------------

def regression_loader(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1) + 0.1 * torch.randn(n, generator=generator)), batch_size=16)


def regression_mlp(hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def test_regression_distillation_loss_mixes_mse_to_the_teacher_and_to_the_targets():
    student, teacher, targets = torch.randn(6, 1), torch.randn(6, 1), torch.randn(6)
    to_teacher = ((student - teacher) ** 2).mean()
    to_targets = ((student.squeeze(1) - targets) ** 2).mean()
    loss = compress.distillation_loss(student, teacher, targets, alpha=0.3)
    assert torch.allclose(loss, 0.3 * to_teacher + 0.7 * to_targets)


def test_regression_distillation_with_alpha_one_learns_from_the_teacher():
    """Before: a softmax over one output is always 1, so the loss was 0.0 and the student never changed."""
    student, teacher = regression_mlp(8, seed=1), regression_mlp(32, seed=2)
    before = copy.deepcopy(student.state_dict())
    losses = compress.distill(student, teacher, regression_loader(), epochs=5, alpha=1.0, progress=False)
    assert losses[0] > 0 and losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_regression_distillation_loss_is_never_negative():
    """Before: with alpha=0.5 cross_entropy ran on float targets and the loss went negative."""
    losses = compress.distill(regression_mlp(8, seed=1), regression_mlp(32, seed=2), regression_loader(), epochs=3,
                              alpha=0.5, progress=False)
    assert all(loss >= 0 for loss in losses) and losses[-1] < losses[0]


def test_regression_targets_that_are_nan_count_only_towards_the_teacher():
    student, teacher = torch.randn(4, 1), torch.randn(4, 1)
    targets = torch.tensor([float("nan"), 1.0, float("nan"), 2.0])
    expected = 0.5 * ((student - teacher) ** 2).mean() + 0.5 * ((student.squeeze(1)[[1, 3]] - targets[[1, 3]]) ** 2).mean()
    assert torch.allclose(compress.distillation_loss(student, teacher, targets), expected)


def test_a_student_whose_outputs_differ_from_the_teachers_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"the student's outputs \(4, 1\) and the teacher's \(4, 10\) differ"):
        compress.distillation_loss(torch.zeros(4, 1), torch.zeros(4, 10), torch.zeros(4, dtype=torch.long))
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4)
    with pytest.raises(InvalidArgumentError, match="differ in shape"):
        compress.distill(MLP(hidden=8, num_classes=5), MLP(hidden=8), loader, epochs=1, progress=False)


def test_classification_distillation_refuses_a_one_output_model():
    with pytest.raises(InvalidArgumentError, match="a softmax over one output is always 1"):
        compress.distillation_loss(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("at", [4, 16 + 6, 16 + 31], ids=["mtime", "digest byte 7", "digest's last byte"])
def test_a_flipped_header_byte_shows_two_digests_that_differ(mlp, tmp_path, at):
    # bytes 16-47 of the gzip header hold the SHA-256: a flip there changes only the recorded digest, in one place
    path = tmp_path / "model.pt.gz"
    compress.save_compressed(mlp, path)
    damaged = bytearray(path.read_bytes())
    damaged[at] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(IntegrityError, match=r"model\.pt\.gz") as refused:
        compress.load_compressed(path)
    expected, got = re.search(r"expected ([0-9a-f]+)\W.*got ([0-9a-f]+)", str(refused.value)).groups()
    assert expected != got and not (expected.startswith(got) or got.startswith(expected)), str(refused.value)


# --- refusals found by an outside tester: already int8, tied weights, meta tensors, student is teacher ------

def already_int8(mlp):
    return {"dynamic": compress.quantize_int8(mlp), "weight_only": compress.quantize_int8(mlp, "weight_only"),
            "compiled": compress.quantize_int8(mlp, compiled=True)}


@pytest.mark.parametrize("kind", ["dynamic", "weight_only", "compiled"])
def test_an_int8_model_is_refused_by_quantize_and_qat_naming_a_layer(mlp, kind):
    int8 = already_int8(mlp)[kind]
    for mode in compress.INT8_MODES:
        with pytest.raises(InvalidArgumentError, match=r"already quantized \(int8 weights: fc1\); quantize the float"):
            compress.quantize_int8(int8, mode, compiled=kind == "compiled")
    with pytest.raises(InvalidArgumentError, match="already quantized"):
        compress.prepare_qat(int8)


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_linear_weights_are_refused_naming_both_layers():
    with pytest.raises(InvalidArgumentError, match=r"tied weights: a\.weight is b\.weight"):
        compress.quantize_int8(TiedLinears())
    pruned = compress.make_permanent(compress.prune_global(TiedLinears(), 0.5))  # pruning keeps the tie: still refused
    with pytest.raises(InvalidArgumentError, match="tied weights"):
        compress.quantize_int8(pruned)


@pytest.mark.parametrize("call", [compress.quantize_int8, compress.prepare_qat,
                                  lambda m: compress.prune_global(m, 0.5)], ids=["int8", "qat", "prune"])
def test_a_model_on_the_meta_device_is_refused_before_any_work(call):
    with torch.device("meta"):
        model = MLP(hidden=16)
    with pytest.raises(InvalidArgumentError, match="on the meta device .*materialise them"):
        call(model)


def test_a_student_that_is_the_teacher_is_refused(mlp, loader):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(InvalidArgumentError, match="student is the teacher"):
        compress.distill(mlp, mlp, loader, epochs=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
