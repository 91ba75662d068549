"""Compression of Lesson 06: measure a model, prune it, quantize it to int8, distill it, measure again.

`measure` gives every variant the same report card (weights, sparsity, file and gzip size of
its saved state_dict, test accuracy, CPU latency at batch 1 and 256, and its speed ratio to the
baseline, timed in turns with it so both see the same machine load). Pruning wraps
`torch.nn.utils.prune`, int8 and quantization-aware training wrap torchao (`quantize_`, eager or under
`torch.compile`); distillation is one short training loop. Nothing here uses the deprecated
`torch.ao.quantization` (Lesson 06 shows it once, as a labelled legacy comparison).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.functional import cross_entropy, kl_div, log_softmax, mse_loss, softmax
from torch.nn.utils import prune
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mvtk.data import ImageDataset
from mvtk.errors import CheckpointError, check_path, IntegrityError, InvalidArgumentError, check_int, check_module, check_number, check_positive_int
from mvtk.files import writing
from mvtk.models import copy_model, eval_mode, model_device
from mvtk.timing import median_latencies
from mvtk.train import DEFAULT_LR, TASKS, call_model, check_outputs, evaluate, infer_task, train_step, unpack_batch

__all__ = [
    "LATENCY_THREADS", "LATENCY_BATCHES", "LATENCY_ROUNDS", "PRUNABLE", "INT8_MODES", "HALF_DTYPES",
    "GZIP_LEVEL", "GZIP_SHA256_ID", "UNLABELLED", "Measurement", "measure", "saved_size", "latencies_ms", "report",
    "plot_tradeoff", "on_cpu", "layer_values", "sparsity", "prune_layer", "prune_global", "prune_neurons",
    "make_permanent", "drop_pruned_neurons", "cast", "int8_config", "check_float_model", "quantize_int8",
    "compile_for_cpu", "prepare_qat", "convert_qat", "save_compressed", "load_compressed",
    "split_labelled", "distillation_loss", "distill",
]

LATENCY_THREADS = 1           # one thread: latency does not depend on what else keeps the other core busy
LATENCY_BATCHES = (1, 256)    # one request, and a batch where matrix kernels dominate
LATENCY_ROUNDS = 10           # alternating timed blocks per model: short blocks, so a load spike hits every model
PRUNABLE = (nn.Linear, nn.Conv2d)
INT8_MODES = ("weight_only", "dynamic")  # torchao Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig
HALF_DTYPES = (torch.float16, torch.bfloat16)
GZIP_LEVEL = 6                # gzip -6, the command-line default: level 9 is 10x slower for ~5% less
GZIP_SHA256_ID = b"MV"        # the gzip extra subfield (RFC 1952, 2.3.1.1) that holds save_compressed's SHA-256
UNLABELLED = -1               # the label of an example whose label the student may not see


# --- measuring (§1) --------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One variant's report card: weights, sparsity, sizes, accuracy, latency and speed-up per batch size.

    Lesson 06, §1. `speedup[b]` is the baseline's ms / this variant's ms at batch `b`, both timed in
    turns in the same run (1.0 for a model measured without a baseline: it is its own reference).
    """
    name: str
    weights: int          # values in the layers' weights and biases
    sparsity: float       # fraction of those values that are exactly zero
    file_bytes: int       # torch.save(state_dict) on disk
    gzip_bytes: int       # the same file, gzip-compressed
    accuracy: float       # on the loader given to `measure` (nan for a regression model: see mse)
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms
    speedup: dict[int, float] = field(default_factory=dict)     # batch size -> baseline ms / this ms, same run
    mse: float | None = None  # regression models: mean squared error on the loader (None for classifiers)


def measure(model: nn.Module, loader: DataLoader, folder: str | os.PathLike, name: str, *,
            baseline: nn.Module | None = None, repeats: int = 30, warmup: int = 2) -> Measurement:
    """Measure `model` on the CPU: sizes, accuracy on `loader`, latency and speed-up over `baseline` (Lesson 06, §1).

    Writes the state_dict to `folder/<slug>.pt`, where the slug is `name` in lower case with every
    character other than letters, digits, '-' and '_' replaced by '_' ("fp32 baseline" -> fp32_baseline.pt).
    With a `baseline` model, both are timed in turns at every batch size (`latencies_ms`), so the speed-up
    compares timings taken under the same machine load. A model on another device is copied to the CPU
    first; the models themselves are not changed. The model must take one input tensor (batches of
    (inputs, targets)); a classifier reports accuracy, a regression model (float targets) its MSE.
    """
    check_module(model)
    if not isinstance(name, str):
        raise InvalidArgumentError(f"name must be a str such as 'fp32 baseline', got {type(name).__name__}")
    folder = check_path(folder)
    model = on_cpu(model)
    try:
        inputs, _ = unpack_batch(next(iter(loader)), "cpu")
    except StopIteration:
        raise InvalidArgumentError(f"loader yields no batches: measure needs at least one batch of {name!r}'s "
                                   "test data to evaluate accuracy and to shape the timing inputs") from None
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise InvalidArgumentError(f"measure times a model of one float input tensor (random inputs shaped like one "
                                   f"batch), but {name!r}'s loader yields {_describe(inputs)} as inputs")
    example_shape = tuple(inputs.shape[1:])
    path = Path(folder) / f"{_slug(name)}.pt"
    file_bytes, gzip_bytes = saved_size(model, path)
    values = layer_values(model)
    models = [model] if baseline is None else [model, on_cpu(baseline)]
    latency, speedup = {}, {}
    for batch in LATENCY_BATCHES:
        times = latencies_ms(models, example_shape, batch, repeats=repeats, warmup=warmup)
        latency[batch], speedup[batch] = times[0], times[-1] / times[0]
    scores = evaluate(model, loader, device="cpu")
    return Measurement(
        name=name, weights=sum(v.numel() for v in values.values()), sparsity=sparsity(model),
        file_bytes=file_bytes, gzip_bytes=gzip_bytes,
        accuracy=scores.accuracy if scores.accuracy is not None else float("nan"),
        latency_ms=latency, speedup=speedup, mse=scores.mse)


def saved_size(model: nn.Module, path: str | os.PathLike) -> tuple[int, int]:
    """torch.save `model.state_dict()` to `path`; returns (file bytes, gzip bytes) (Lesson 06, §1).

    Written atomically; a full disk raises CheckpointError naming the file, and the old file stays.
    """
    check_module(model)
    path = check_path(path)
    data = _state_dict_bytes(model)
    with writing(path, CheckpointError) as tmp:  # a full disk: CheckpointError naming the file, the old file unchanged
        tmp.write_bytes(data)
    return path.stat().st_size, len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def latencies_ms(models: Sequence[nn.Module], example_shape: tuple[int, ...], batch_size: int, *,
                 threads: int = LATENCY_THREADS, repeats: int = 30, warmup: int = 2) -> list[float]:
    """Median ms of one CPU forward pass of each model on `threads` threads, timed in turns (Lesson 06, §1).

    `mvtk.timing.median_latencies` runs LATENCY_ROUNDS warmed-up blocks of each model in alternation
    (`warmup` untimed calls, then `repeats / LATENCY_ROUNDS` timed ones), so a change in machine load hits
    every model alike. Thread count and training modes are restored after.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(threads, "threads")
    check_positive_int(repeats, "repeats")
    inputs = torch.rand(batch_size, *example_shape, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as modes, torch.inference_mode():
            for m in models:
                modes.enter_context(eval_mode(m))
            seconds = median_latencies([lambda m=m: m(inputs) for m in models], repeats=repeats, warmup=warmup,
                                        rounds=LATENCY_ROUNDS)
    finally:
        torch.set_num_threads(before)
    return [1000 * s for s in seconds]


def report(rows: Sequence[Measurement]) -> str:
    """A text table of `rows`: size and accuracy against row 0, latency and speed-up per batch (Lesson 06, §1).

    `smaller` compares files, `÷gzip` gzip sizes (like with like); `faster@b` is each row's `speedup`:
    the baseline's ms / the row's ms, timed in turns in one run.
    """
    if not rows:
        raise InvalidArgumentError("report needs at least one Measurement")
    base = rows[0]
    batches = sorted(base.latency_ms)
    head = (f"{'variant':<28}{'weights':>9}{'sparse':>8}{'file kB':>9}{'gzip kB':>9}{'smaller':>9}{'÷gzip':>8}"
            f"{'accuracy':>9}{'Δ points':>9}" + "".join(f"{f'ms@{b}':>9}{f'faster@{b}':>11}" for b in batches))
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.name:<28}{r.weights:>9,}{r.sparsity:>8.1%}{r.file_bytes / 1000:>9.1f}{r.gzip_bytes / 1000:>9.1f}"
                f"{base.file_bytes / r.file_bytes:>8.2f}x{base.gzip_bytes / r.gzip_bytes:>7.2f}x"
                f"{r.accuracy:>9.3f}{100 * (r.accuracy - base.accuracy):>+9.1f}")
        for b in batches:
            line += f"{r.latency_ms.get(b, float('nan')):>9.3f}{r.speedup.get(b, float('nan')):>10.2f}x"
        lines.append(line)
    return "\n".join(lines)


def plot_tradeoff(rows: Sequence[Measurement], ax=None):
    """Accuracy against file size (filled) and gzip size (hollow), one labelled point per variant (Lesson 06, §8)."""
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.subplots(figsize=(7, 4))[1]
    for r in rows:
        dots = ax.scatter(r.file_bytes / 1000, 100 * r.accuracy, s=40)
        ax.scatter(r.gzip_bytes / 1000, 100 * r.accuracy, s=40, facecolors="none", edgecolors=dots.get_facecolor())
        ax.annotate(r.name, (r.file_bytes / 1000, 100 * r.accuracy), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel="size in kB (filled: file, hollow: gzip)", ylabel="test accuracy (%)",
           title="Size against accuracy")
    ax.grid(alpha=0.3)
    return ax


def on_cpu(model: nn.Module) -> nn.Module:
    """`model` itself if it lives on the CPU, else a CPU copy (the original is not moved) (Lesson 06, §1)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy_model(model).cpu()


def layer_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's weight and bias as a float tensor, whatever its storage (pruned, half, int8) (Lesson 06, §1)."""
    values = {}
    for module_name, module in model.named_modules():
        for attr in ("weight", "bias"):
            value = getattr(module, attr, None)
            if callable(value) and not isinstance(value, torch.Tensor):  # legacy packed int8 layers: weight() / bias()
                value = value()
            if isinstance(value, torch.Tensor):
                if _quantized_storage(value):  # int8: torchao, legacy
                    value = value.dequantize()
                values[f"{module_name}.{attr}".lstrip(".")] = value.detach().float()
    return values


def sparsity(model: nn.Module) -> float:
    """The fraction of weight and bias values that are exactly zero (Lesson 06, §2)."""
    values = layer_values(model).values()
    total = sum(v.numel() for v in values)
    return sum(int((v == 0).sum()) for v in values) / total if total else 0.0


# --- pruning (§2-§4) ------------------------------------------------------------------------------

def prune_layer(model: nn.Module, layer: str, amount: float, name: str = "weight") -> nn.Module:
    """Zero the `amount` fraction of `layer.<name>` with the smallest |value| (L1, unstructured) (Lesson 06, §2).

    Adds `<name>_orig` (parameter) and `<name>_mask` (buffer) to the layer; `make_permanent` folds them.
    A tied weight (one parameter shared by several layers) gets the same mask in every layer that holds it.
    """
    _check_amount(amount)
    module = _prunable(model, layer, name)
    prune.l1_unstructured(module, name, amount=float(amount))
    _mask_tied(model, [(module, name)])
    return model


def prune_global(model: nn.Module, amount: float, layer_types: tuple[type, ...] = PRUNABLE) -> nn.Module:
    """Zero the `amount` fraction of all `layer_types` weights with the smallest |value|, ranked together.

    Lesson 06, §2. Every pruned layer gets `weight_orig` and `weight_mask`, as with `prune_layer`. A tied
    weight is ranked once and gets the same mask in every layer that holds it.
    """
    _check_amount(amount)
    check_float_model(model, "prune")
    targets, seen = [], set()
    for m in model.modules():
        if isinstance(m, layer_types) and isinstance(getattr(m, "weight", None), torch.Tensor):
            weight = _parameter(m, "weight")
            if id(weight) not in seen:  # a tied weight counts once in the ranking
                seen.add(id(weight))
                targets.append((m, "weight"))
    if not targets:
        raise InvalidArgumentError(f"{type(model).__name__} has no layers of type "
                                   f"{[t.__name__ for t in layer_types]} to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(amount))
    _mask_tied(model, targets)
    return model


def prune_neurons(model: nn.Module, layer: str, amount: float) -> nn.Module:
    """Zero whole output neurons (Linear rows) or channels (Conv2d filters) of `layer` with the smallest L2 norm.

    Lesson 06, §3. Structured: the zeros come in whole rows, so `drop_pruned_neurons` can remove them.
    """
    _check_amount(amount)
    module = _prunable(model, layer, "weight")
    prune.ln_structured(module, "weight", amount=float(amount), n=2, dim=0)
    _mask_tied(model, [(module, "weight")])
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and drop `*_orig`/`*_mask` (prune.remove), in place (Lesson 06, §2).

    Layers that shared one weight before (tied weights) share the folded weight after.
    """
    tied: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in check_module(model).modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                tied.setdefault(id(getattr(module, f"{hook._tensor_name}_orig")), []).append((module, hook._tensor_name))
                prune.remove(module, hook._tensor_name)
    for (first, first_name), *others in tied.values():  # prune.remove gives each layer its own new parameter
        for module, name in others:
            setattr(module, name, getattr(first, first_name))
    return model


def drop_pruned_neurons(model: nn.Module, layer: str, next_layer: str,
                        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu) -> nn.Module:
    """A copy of `model` with the all-zero rows of Linear `layer` removed, and the matching inputs of `next_layer`.

    Lesson 06, §3. A removed neuron still outputs activation(bias), a constant: it is added to
    `next_layer`'s bias, so the smaller model computes the same function as the pruned one. This assumes
    `next_layer` takes `activation(layer(x))` (the course MLPs: ReLU); pass the activation your model
    applies between the two layers (e.g. torch.tanh, or `lambda b: b` for none).
    """
    model = make_permanent(copy_model(model))
    first, second = (_module(model, name) for name in (layer, next_layer))
    for name, module in ((layer, first), (next_layer, second)):
        if not isinstance(module, nn.Linear):
            raise InvalidArgumentError(f"drop_pruned_neurons works on nn.Linear layers; {name!r} is "
                                       f"{type(module).__name__}")
    if second.in_features != first.out_features:
        raise InvalidArgumentError(f"{next_layer!r} takes {second.in_features} inputs but {layer!r} gives "
                                   f"{first.out_features}: they are not consecutive layers")
    like = dict(device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        keep = first.weight.abs().sum(dim=1) != 0
        bias = first.bias if first.bias is not None else torch.zeros(first.out_features, **like)
        constant = activation(bias[~keep])  # what each dropped neuron always outputs
        smaller_first = nn.Linear(first.in_features, int(keep.sum()), bias=first.bias is not None, **like)
        smaller_first.weight.copy_(first.weight[keep])
        if first.bias is not None:
            smaller_first.bias.copy_(first.bias[keep])
        smaller_second = nn.Linear(int(keep.sum()), second.out_features, bias=True, **like)
        smaller_second.weight.copy_(second.weight[:, keep])
        old_bias = second.bias if second.bias is not None else torch.zeros(second.out_features, **like)
        smaller_second.bias.copy_(old_bias + second.weight[:, ~keep] @ constant)
    _set_module(model, layer, smaller_first)
    _set_module(model, next_layer, smaller_second)
    return model


# --- quantization (§5-§6) -------------------------------------------------------------------------

def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` stored in float16 or bfloat16 that takes and returns float32 tensors (Lesson 06, §5)."""
    if dtype not in HALF_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {[str(d) for d in HALF_DTYPES]}, got {dtype!r}")
    half = copy_model(model).to(dtype)
    half.register_forward_pre_hook(lambda _m, args: tuple(a.to(dtype) if a.is_floating_point() else a for a in args))
    half.register_forward_hook(lambda _m, _args, out: out.float())
    return half


def int8_config(mode: str = "dynamic"):
    """The torchao config for `mode`: Int8WeightOnlyConfig or Int8DynamicActivationInt8WeightConfig (Lesson 06, §6).

    "weight_only": int8 weights, float activations (the weights are dequantized in the matmul).
    "dynamic": int8 weights and int8 activations, scaled per row of each batch at run time.
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode not in INT8_MODES:
        raise InvalidArgumentError(f"unknown int8 mode {mode!r}; expected one of {INT8_MODES}")
    return Int8WeightOnlyConfig() if mode == "weight_only" else Int8DynamicActivationInt8WeightConfig()


def check_float_model(model: nn.Module, verb: str = "quantize") -> nn.Module:
    """`model` if its weights are float values in memory; else InvalidArgumentError naming a layer (Lessons 06-07).

    Refused: parameters on the meta device (shapes without values), and a model already quantized
    (torchao or legacy int8 weights, a PT2E graph with int8 constants): int8 of int8 fails deep in
    torchao or quantizes twice, so `verb` the float model instead.
    """
    check_module(model)
    tensors = [(name.replace("_orig_mod.", ""), t) for name, t in (*model.named_parameters(), *model.named_buffers())]
    meta = [name for name, t in tensors if t.device.type == "meta"]
    if meta:
        raise InvalidArgumentError(f"{type(model).__name__} has parameters on the meta device ({meta[0]}, "
                                   f"{len(meta)} in all); materialise them (to_empty + load weights) first")
    quantized = [name.rpartition(".")[0] or name for name, t in tensors  # torchao int8, PT2E's int8 constants
                 if _quantized_storage(t) or t.dtype in (torch.int8, torch.uint8)]
    quantized += [name for name, m in model.named_modules()  # legacy torch.ao int8 layers: packed, not parameters
                  if type(m).__module__.startswith("torch.ao.nn.quantized")]
    if quantized:
        raise InvalidArgumentError(f"{type(getattr(model, '_orig_mod', model)).__name__} is already quantized "
                                   f"(int8 weights: {quantized[0]}); {verb} the float model")
    return model


def quantize_int8(model: nn.Module, mode: str = "dynamic", *, compiled: bool = False) -> nn.Module:
    """A CPU copy of `model` whose nn.Linear layers hold int8 weights (torchao `quantize_`) (Lesson 06, §6).

    `mode` "dynamic" (int8 activations too) or "weight_only": see `int8_config`. Pruning is made
    permanent on the copy first (`make_permanent`); the caller's model is not changed. Other layers
    (convolutions, norms) stay float: torchao's int8 configs target Linear layers. `compiled=True`
    wraps the copy in `compile_for_cpu` (torch.compile with weight freezing, for inductor's int8 CPU kernels);
    the first call compiles, which takes seconds, and a frozen model ignores later weight changes.
    Refused: a model already int8 or on the meta device (`check_float_model`), and tied Linear weights
    (one parameter in two Linear layers): torchao would give each its own int8 copy and the file would grow.
    A Linear weight tied to an Embedding is quantized in the Linear only: the tie is lost, the embedding stays float.
    """
    from torchao.quantization import quantize_

    config = int8_config(mode)
    _check_untied(check_float_model(model))
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise InvalidArgumentError(f"{type(model).__name__} has no nn.Linear layer to quantize: torchao's int8 configs "
                                   "quantize Linear layers only (int8 convolutions: ONNX Runtime, Lesson 07)")
    cpu = on_cpu(model)
    model = make_permanent(copy_model(model) if cpu is model else cpu).eval()  # never change the caller's model
    quantize_(model, config)
    return compile_for_cpu(model) if compiled else model


def compile_for_cpu(model: nn.Module) -> nn.Module:
    """`torch.compile(model)` with one graph per input shape and inductor's weight freezing (Lesson 06, §6).

    Freezing folds the weights into the compiled graph as constants, which lets inductor pick its
    fused CPU kernels (int8 ones included); nothing compiles until the first call.
    """
    return torch.compile(check_module(model), dynamic=False, options={"freezing": True})


def prepare_qat(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear layers fake-quantize to int8 in training (torchao QAT) (Lesson 06, §9).

    The forward pass rounds weights (per output row, symmetric, as `quantize_int8` does) and inputs (per
    row of each batch; asymmetric, the only per-row mode torchao's fake quantizer has) to int8 and back,
    while gradients pass straight through (the straight-through estimator). Train the copy as usual (a few
    epochs from the float model), then `convert_qat` makes the real int8 model.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if not any(isinstance(m, nn.Linear) for m in check_float_model(model, "train").modules()):
        raise InvalidArgumentError(f"{type(model).__name__} has no nn.Linear layer to train for int8: torchao's QAT "
                                   "fake-quantizes Linear (and Embedding) layers only")
    model = make_permanent(copy_model(model))
    quantize_(model, QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                               weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
                               step="prepare"))
    return model


def convert_qat(model: nn.Module, *, compiled: bool = False) -> nn.Module:
    """A CPU int8 copy of a `prepare_qat` model: fake quantization removed, then `quantize_int8` (Lesson 06, §9)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    if not any(isinstance(m, FakeQuantizedLinear) for m in check_module(model).modules()):
        raise InvalidArgumentError(f"{type(model).__name__} has no fake-quantized layer: convert_qat takes a model "
                                   "made by prepare_qat (and then trained)")
    model = copy_model(model)
    quantize_(model, QATConfig(step="convert"))  # FakeQuantizedLinear -> nn.Linear, same weights
    return quantize_int8(model, "dynamic", compiled=compiled)


def save_compressed(model: nn.Module, path: str | os.PathLike) -> int:
    """Write `model.state_dict()` to `path` as a gzipped torch.save file with its SHA-256; returns its size (Lesson 06, §8).

    The SHA-256 of the whole file (its own 32 bytes counted as zeros) sits in a gzip extra field
    (GZIP_SHA256_ID), so `gunzip` still reads the file and load_compressed detects any changed byte.
    Written atomically: a full disk raises CheckpointError naming the file, and the old file stays.
    """
    check_module(model)
    path = check_path(path)
    plain = gzip.compress(_state_dict_bytes(model), compresslevel=GZIP_LEVEL, mtime=0)
    # gzip.compress writes a 10-byte header without optional fields; add FEXTRA (flag 4) with one subfield
    header = plain[:3] + bytes([plain[3] | 0x04]) + plain[4:10]
    extra = len(GZIP_SHA256_ID + b"\0\0" + bytes(32)).to_bytes(2, "little") + GZIP_SHA256_ID + (32).to_bytes(2, "little")
    unsealed = header + extra + bytes(32) + plain[10:]
    digest = hashlib.sha256(unsealed).digest()
    with writing(path, CheckpointError) as tmp:
        tmp.write_bytes(unsealed[:_DIGEST_AT] + digest + unsealed[_DIGEST_AT + 32:])
    return path.stat().st_size


_DIGEST_AT = 10 + 2 + 4  # gzip header, XLEN, subfield id and length: then the 32-byte SHA-256


def load_compressed(path: str | os.PathLike) -> dict:
    """The state_dict in a file written by `save_compressed`, SHA-256 verified, loaded with weights_only=True (Lesson 06, §8).

    A file whose bytes differ from the SHA-256 recorded in it, or that has none (empty, truncated, a
    plain .gz written elsewhere), raises IntegrityError naming it; nothing is unpickled before that.
    """
    path = check_path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"no compressed model at {str(path)!r}")
    data = path.read_bytes()
    header = data[:_DIGEST_AT]
    expected_header = b"\x1f\x8b\x08", 0x04, (36).to_bytes(2, "little") + GZIP_SHA256_ID + (32).to_bytes(2, "little")
    if (len(data) < _DIGEST_AT + 32 + 18 or header[:3] != expected_header[0] or header[3] != expected_header[1]
            or header[10:] != expected_header[2]):
        raise IntegrityError(f"{str(path)!r} is not an intact file written by save_compressed ({len(data)} bytes, "
                             "no SHA-256 record in its gzip header): it is empty, truncated, damaged or another kind of file")
    recorded = data[_DIGEST_AT:_DIGEST_AT + 32]
    actual = hashlib.sha256(data[:_DIGEST_AT] + bytes(32) + data[_DIGEST_AT + 32:]).digest()
    if not hmac.compare_digest(recorded, actual):
        raise IntegrityError(f"{str(path)!r} does not match the SHA-256 recorded in it when save_compressed wrote it "
                             f"(expected {recorded.hex()}, got {actual.hex()}): the file is damaged or was changed")
    try:
        state = gzip.decompress(data)
    except (OSError, EOFError, ValueError) as exc:  # verified bytes that still fail: written by another program
        raise IntegrityError(f"{str(path)!r} has a valid SHA-256 but is not a gzip stream: {exc}") from exc
    try:
        with warnings.catch_warnings():  # loading int8 tensors goes through torch's own deprecated TypedStorage
            warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
            loaded = torch.load(io.BytesIO(state), weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} holds no state_dict loadable with weights_only=True: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(loaded).__name__}, not a state_dict")
    return loaded


# --- distillation (§7) ----------------------------------------------------------------------------

def split_labelled(dataset: ImageDataset, n_labelled: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """(the `n_labelled` examples that keep their label, the whole set with all other labels -1) (Lesson 06, §7)."""
    if not isinstance(dataset, ImageDataset):
        raise InvalidArgumentError(f"dataset must be an mvtk ImageDataset, got {type(dataset).__name__}")
    check_int(n_labelled, "n_labelled", low=1, high=len(dataset))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_labelled]
    hidden = torch.full_like(dataset.labels, UNLABELLED)
    hidden[chosen] = dataset.labels[chosen]
    return (ImageDataset(dataset.images[chosen], dataset.labels[chosen], dataset.transform),
            ImageDataset(dataset.images, hidden, dataset.transform))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float = 4.0, alpha: float = 0.5, task: str | None = None) -> torch.Tensor:
    """alpha·soft + (1-alpha)·hard: the student learns the teacher's outputs and the known labels (Lesson 06, §7).

    Classification (integer labels): soft = T²·KL(teacher_T ‖ student_T) on all examples, hard =
    cross-entropy on labelled ones (labels -1, UNLABELLED, count only in the soft term); T² keeps the
    soft term's gradient on the same scale as the cross-entropy's (Hinton et al., 2015). Regression
    (float targets): soft = MSE to the teacher's outputs, hard = MSE to the targets (NaN targets count
    only in the soft term); `temperature` does not apply. `task` None: read from the labels. Student and
    teacher must give outputs of the same shape.
    """
    _check_distillation(temperature, alpha)
    for what, value in (("student outputs", student_logits), ("teacher outputs", teacher_logits)):
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"{what} must be a tensor, got {type(value).__name__}")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidArgumentError(f"the student's outputs {tuple(student_logits.shape)} and the teacher's "
                                   f"{tuple(teacher_logits.shape)} differ in shape: distillation needs a student "
                                   "with the teacher's outputs (the same classes, or the same regression values)")
    task = task or infer_task(labels)  # integer labels (-1: hidden): classification; float: regression
    if task == "regression":
        targets = labels.float()
        check_outputs(student_logits, torch.zeros_like(targets), "regression")  # one output per target value
        soft = mse_loss(student_logits, teacher_logits)
        known = ~torch.isnan(targets.reshape(len(targets), -1)).any(dim=1)
        if not known.any():
            return alpha * soft + (1 - alpha) * (student_logits.sum() * 0)
        outputs, targets, _ = check_outputs(student_logits[known], targets[known], "regression")
        return alpha * soft + (1 - alpha) * mse_loss(outputs, targets)
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise InvalidArgumentError(f"classification distillation needs outputs of shape (N, classes) with 2 or more "
                                   f"classes, got {tuple(student_logits.shape)}: a softmax over one output is always "
                                   "1; distill a one-output model with task='regression' and float targets")
    soft = kl_div(log_softmax(student_logits / temperature, dim=1), softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean") * temperature ** 2
    known = labels != UNLABELLED
    if known.any():
        outputs, targets, _ = check_outputs(student_logits[known], labels[known], "classification")
        hard = cross_entropy(outputs, targets)
    else:
        hard = student_logits.sum() * 0
    return alpha * soft + (1 - alpha) * hard


def distill(student: nn.Module, teacher: nn.Module, loader: DataLoader, *, epochs: int,
            temperature: float = 4.0, alpha: float = 0.5, optimizer: torch.optim.Optimizer | None = None,
            device: torch.device | str | None = None, progress: bool = True, task: str | None = None) -> list[float]:
    """Train `student` to match the frozen `teacher`; returns the mean loss per epoch (Lesson 06, §7).

    The teacher runs in eval mode (no dropout) under torch.no_grad, and only the student's
    parameters are in the optimizer, so the teacher never changes; its mode is restored after.
    Each batch is one `mvtk.train.train_step` of the student with `distillation_loss`, for
    classification or regression (`task`, or read from the targets); batches are (inputs, targets),
    inputs a tensor or a tuple of tensors. A student that is the teacher, or trains its parameters, is refused.
    """
    check_module(student, "student")
    check_module(teacher, "teacher")
    shared = {id(p) for p in student.parameters() if p.requires_grad} & {id(p) for p in teacher.parameters()}
    if student is teacher or shared:
        what = ("the student is the teacher" if student is teacher
                else f"the student trains {len(shared)} of the teacher's parameters")
        raise InvalidArgumentError(f"{what}: training it would change the teacher it learns from; distill into a "
                                   "separate (smaller) model")
    _check_distillation(temperature, alpha)
    check_positive_int(epochs, "epochs")
    if task is not None and task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS} or None (read from the targets), got {task!r}")
    device = torch.device(device) if device is not None else model_device(student)
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(student.parameters(), lr=DEFAULT_LR)
    losses = []
    with eval_mode(teacher):
        for _ in tqdm(range(epochs), desc="distill", disable=not progress):
            student.train()
            total, count = 0.0, 0
            for batch in loader:
                inputs, labels = unpack_batch(batch, device)
                with torch.no_grad():  # the teacher's logits are targets, not something to train
                    teacher_logits = call_model(teacher, inputs)
                loss = train_step(student, inputs, labels, optimizer, lambda logits, targets: distillation_loss(
                    logits, teacher_logits, targets, temperature=temperature, alpha=alpha, task=task))
                total, count = total + loss.item() * len(labels), count + len(labels)
            if count == 0:
                raise InvalidArgumentError("loader yields no batches: distill needs at least one batch to train on")
            losses.append(total / count)
    return losses


# --- checks -----------------------------------------------------------------------------------------

def _parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter behind `module.<name>`: `<name>_orig` once pruned."""
    return module._parameters.get(f"{name}_orig", module._parameters.get(name))


def _mask_tied(model: nn.Module, pruned: Sequence[tuple[nn.Module, str]]) -> None:
    """Give every other layer that holds a just-pruned parameter (tied weights) the same mask, so the tie holds."""
    for module, name in pruned:
        param, mask = _parameter(module, name), getattr(module, f"{name}_mask")
        for other in model.modules():
            for other_name, value in list(other._parameters.items()):
                tensor_name = other_name.removesuffix("_orig")
                if value is param and not (other is module and tensor_name == name):
                    prune.custom_from_mask(other, tensor_name, mask)


def _quantized_storage(value: torch.Tensor) -> bool:
    """True for a tensor stored quantized: a legacy quantized tensor or a tensor subclass such as torchao's int8."""
    return value.is_quantized or type(value) not in (torch.Tensor, nn.Parameter)


def _check_untied(model: nn.Module) -> None:
    """Refuse one parameter that is the weight of two Linear layers (tied weights): quantize_ would untie it."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        param = _parameter(module, "weight") if isinstance(module, nn.Linear) else None  # a pruned one: weight_orig
        if param is not None:
            holders.setdefault(id(param), []).append(f"{module_name}.weight".lstrip("."))
    for names in holders.values():
        if len(names) > 1:
            raise InvalidArgumentError(f"{type(model).__name__} has tied weights: {' is '.join(names)}; torchao's "
                                       "int8 would give each layer its own copy (a larger file, and the tie lost). "
                                       "Untie them (one nn.Parameter per layer) first, or keep the tied model in float")


def _describe(inputs) -> str:
    if isinstance(inputs, (tuple, list)):
        return f"{len(inputs)} tensors (a model of several inputs)"
    if isinstance(inputs, torch.Tensor):
        return f"a {inputs.dtype} tensor"
    return type(inputs).__name__


def _check_amount(amount) -> None:
    check_number(amount, "amount", low=0, high=1, what="a fraction of weights")  # Lesson 06 prints this message


def _check_distillation(temperature, alpha) -> None:
    check_number(temperature, "temperature", low=0, low_open=True)
    check_number(alpha, "alpha", low=0, high=1, what="a weight")


def _module(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer) if layer else model
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and isinstance(m, PRUNABLE)]
        raise InvalidArgumentError(f"{type(model).__name__} has no layer {layer!r}; its layers are {names}") from None


def _prunable(model: nn.Module, layer: str, name: str) -> nn.Module:
    module = _module(model, layer)
    params = dict(module.named_parameters(recurse=False))
    if name not in params and f"{name}_orig" not in params:
        raise InvalidArgumentError(f"layer {layer!r} ({type(module).__name__}) has no parameter {name!r}; "
                                   f"its parameters are {sorted(params)}")
    return module


def _set_module(model: nn.Module, layer: str, new: nn.Module) -> None:
    parent, _, child = layer.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _state_dict_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(getattr(model, "_orig_mod", model).state_dict(), buffer)  # a torch.compile wrapper: the model's own keys
    return buffer.getvalue()




def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip().lower()) or "model"
