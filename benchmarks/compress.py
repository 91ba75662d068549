"""Lesson 06 benchmark: every compression path against the fp32 baseline, measured in one run.

Prints, for each path, its file and gzip size (and the ratio to fp32: file to file, gzip to gzip),
test accuracy, and latency ratio at batch 1 and 256 (CPU, one thread, median after warm-up; each path
timed in turns with the fp32 baseline, so both see the same machine load); the first-call compile
seconds of the torch.compile paths; then QAT against post-training int8 on the course CNN over 3
seeds; then the targets, measured (printed PASS/MISS; exits 1 if one is missed).
Run: `.venv/bin/python benchmarks/compress.py` (a few minutes on a 2-core CPU: it compiles four models).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

from mvtk import compress
from mvtk.data import make_loaders
from mvtk.env import seed_everything
from mvtk.models import build_model, copy_model
from mvtk.train import evaluate, fit

REPEATS, WARMUP, SEEDS = 50, 3, (0, 1, 2)
INT8_PATHS = ("int8 weight-only (eager)", "int8 dynamic (eager)", "int8 weight-only (compiled)",
              "int8 dynamic (compiled)")


def train_baseline(loaders) -> nn.Module:
    """The lesson's wide MLP: MLP v2 at 1,024 hidden units, 10 epochs, Adam + cosine schedule."""
    model = build_model("mlp_v2", hidden=1024)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, loaders.train, loaders.val, epochs=10, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10), progress=False)
    return model


def fine_tune(model: nn.Module, loaders, epochs: int = 3, lr: float = 3e-4) -> nn.Module:
    fit(model, loaders.train, loaders.val, epochs=epochs, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        progress=False)
    return model


def legacy_int8(model: nn.Module) -> nn.Module:
    """torch.ao's deprecated dynamic int8: the legacy row (tests/test_legacy_quantization_canary.py watches it)."""
    with warnings.catch_warnings():  # its deprecation warning is the point of the legacy row, shown in Lesson 06
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization|torch\.quantize_per_tensor")
        return torch.ao.quantization.quantize_dynamic(compress.on_cpu(copy_model(model)).eval(), {nn.Linear},
                                                      dtype=torch.qint8)


def variants(baseline: nn.Module, loaders) -> dict[str, nn.Module]:
    """Every model the lesson measures, built the way the notebook builds it."""
    pruned = fine_tune(compress.prune_global(copy_model(baseline), 0.9), loaders)
    slim = copy_model(baseline)
    compress.prune_neurons(slim, "fc1", 0.5)
    compress.prune_neurons(slim, "fc2", 0.5)
    fine_tune(slim, loaders)
    smaller = compress.drop_pruned_neurons(compress.drop_pruned_neurons(slim, "fc1", "fc2"), "fc2", "fc3")
    qat = fine_tune(compress.prepare_qat(baseline), loaders, epochs=2, lr=1e-4)
    return {
        "fp32 baseline": baseline,
        "fp32 (compiled)": compress.compile_for_cpu(copy_model(baseline).eval()),
        "pruned 90% (dense)": compress.make_permanent(copy_model(pruned)),
        "50% neurons removed": smaller,
        "float16": compress.cast(baseline, torch.float16),
        "bfloat16": compress.cast(baseline, torch.bfloat16),
        "int8 torch.ao (legacy)": legacy_int8(baseline),
        "int8 weight-only (eager)": compress.quantize_int8(baseline, "weight_only"),
        "int8 dynamic (eager)": compress.quantize_int8(baseline),
        "int8 weight-only (compiled)": compress.quantize_int8(baseline, "weight_only", compiled=True),
        "int8 dynamic (compiled)": compress.quantize_int8(baseline, compiled=True),
        "QAT int8 dynamic (eager)": compress.convert_qat(qat),
        "pruned 90% + int8 (eager)": compress.quantize_int8(pruned),
        "50% neurons + int8 (eager)": compress.quantize_int8(smaller),
    }


def first_call_seconds(model: nn.Module, example: torch.Tensor) -> float:
    """Seconds of the first call at the timing batch size: for a torch.compile model, the compile."""
    start = time.perf_counter()
    with torch.inference_mode():
        model.eval()(example)
    return time.perf_counter() - start


def cnn_qat_against_ptq() -> dict[str, list[float]]:
    """Validation accuracy of the course CNN over SEEDS: fp32, the same fp32 + int8 (PTQ), QAT + int8.

    After 5 epochs, fp32 (then PTQ) and QAT both get the same 2 extra epochs at the same learning rate,
    so QAT's fake quantization is the only difference; PTQ and QAT end as the same int8 model (same size).
    """
    loaders = make_loaders(batch_size=64, size=16)
    scores: dict[str, list[float]] = {"fp32": [], "PTQ int8": [], "QAT int8": []}
    for seed in SEEDS:
        seed_everything(seed, threads=1)
        cnn = build_model("cnn")
        fit(cnn, loaders.train, loaders.val, epochs=5, progress=False)
        seed_everything(seed, threads=1)
        tuned = fine_tune(copy_model(cnn), loaders, epochs=2, lr=1e-4)
        seed_everything(seed, threads=1)
        qat = compress.convert_qat(fine_tune(compress.prepare_qat(cnn), loaders, epochs=2, lr=1e-4))
        scores["fp32"].append(evaluate(tuned, loaders.val).accuracy)
        scores["PTQ int8"].append(evaluate(compress.quantize_int8(tuned), loaders.val).accuracy)
        scores["QAT int8"].append(evaluate(qat, loaders.val).accuracy)
    return scores


def check_targets(rows: dict[str, compress.Measurement], cnn: dict[str, list[float]]) -> list[tuple[str, float, bool]]:
    """(target, measured value, met?) for each target of issue 17, on the best torchao int8 path at batch 256."""
    base = rows["fp32 baseline"]
    best_name = max(INT8_PATHS, key=lambda name: rows[name].speedup[256])
    best = rows[best_name]
    drop = 100 * (base.accuracy - best.accuracy)
    qat_gap = 100 * (statistics.mean(cnn["fp32"]) - statistics.mean(cnn["QAT int8"]))
    return [
        (f"best CPU int8 path ({best_name}) file >= 3.9x smaller than fp32", base.file_bytes / best.file_bytes,
         base.file_bytes / best.file_bytes >= 3.9),
        ("  same path, gzip against gzip (not a target; like with like)", base.gzip_bytes / best.gzip_bytes, True),
        ("best CPU int8 path accuracy drop <= 0.5 points", drop, drop <= 0.5),
        ("best CPU int8 path faster than fp32 at batch 256 (ratio > 1)", best.speedup[256], best.speedup[256] > 1),
        ("QAT int8 (CNN, mean of 3 seeds) within 0.3 points of fp32", qat_gap, qat_gap <= 0.3),
    ]


def main() -> int:
    seed_everything(0, threads=1)
    loaders = make_loaders(batch_size=64)
    baseline = train_baseline(loaders)
    models = variants(baseline, loaders)
    example = torch.rand(256, *next(iter(loaders.test))[0].shape[1:])
    torch.set_num_threads(compress.LATENCY_THREADS)
    compile_s = {name: first_call_seconds(m, example) for name, m in models.items() if "compiled" in name}
    with tempfile.TemporaryDirectory() as folder:
        rows = {name: compress.measure(model, loaders.test, folder, name, repeats=REPEATS, warmup=WARMUP,
                                       baseline=None if model is baseline else baseline)
                for name, model in models.items()}
    print(f"Wide MLP (MLP v2, 1,024 hidden), test set. CPU, {compress.LATENCY_THREADS} thread, median of {REPEATS} "
          f"calls in {compress.LATENCY_ROUNDS} blocks alternating with fp32, each block after {WARMUP} warm-up calls; "
          "'smaller' = fp32 file / file, '÷gzip' = fp32 gzip / gzip, 'faster@b' = fp32 ms / ms, timed in turns\n")
    print(compress.report(list(rows.values())))
    print("\nfirst call at batch 256 (the compile; batch 1 and the test batch compile once more each): "
          + ", ".join(f"{name} {s:.1f} s" for name, s in compile_s.items()))
    cnn = cnn_qat_against_ptq()
    print("\nCourse CNN, validation accuracy over seeds", SEEDS,
          "(fp32 and QAT: 5 + 2 epochs; PTQ = that fp32 in int8):")
    for name, values in cnn.items():
        print(f"  {name:<9} {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}  "
              f"({', '.join(f'{v:.3f}' for v in values)})")
    print()
    results = check_targets(rows, cnn)
    for target, value, met in results:
        print(f"{'PASS' if met else 'MISS'}  {target}: {value:.2f}")
    return 0 if all(met for _, _, met in results) else 1


if __name__ == "__main__":
    sys.exit(main())
