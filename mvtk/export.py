"""ONNX export, checking, ONNX Runtime inference, int8, torch.export and a Predictor (Lesson 07).

`export_onnx` uses the current exporter (`torch.onnx.export(..., dynamo=True)`, built on
`torch.export`) with a dynamic batch dimension; `check_parity` proves the ONNX graph computes
what PyTorch computes; `Predictor` is the deployment end: a registered version, exported once
into a cache keyed by its SHA-256, behind input validation.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import hmac
import inspect
import json
import os
import stat
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mvtk.checkpoint.program import BATCH_DIM, check_pt2_archive, export_program, load_program
from mvtk.compress import (GZIP_LEVEL, cast, check_float_model, convert_qat, drop_pruned_neurons, prepare_qat,
                           prune_global, prune_neurons, quantize_int8, saved_size)
from mvtk.errors import (ExportError, check_int, check_path, InputShapeError, IntegrityError, InvalidArgumentError, check_module,
                         check_positive_int)
from mvtk.files import atomic_write, sha256_bytes, sha256_file, write_error
from mvtk.models import MODELS, copy_model, eval_mode, model_device, sample_shape, unwrap
from mvtk.timing import median_latencies
from mvtk.train import fit

__all__ = [
    "INPUT_NAME", "OUTPUT_NAME", "BATCH_DIM", "PARITY_RTOL", "PARITY_ATOL", "INT8_OP_TYPES", "SOURCE_TRACE_KEY",
    "MANIFEST_SUFFIX", "SOURCE_KEY", "GENERIC_INPUT_NAME", "GENERIC_OUTPUT_NAME", "TASK_KEY", "VALUE_RANGE_KEY", "TASKS",
    "io_names",
    "predict_logits", "manifest_path", "write_manifest", "verify_manifest", "export_onnx", "drop_source_traces", "check_onnx", "OnnxSummary", "describe_onnx",
    "onnx_files", "onnx_size", "load_session", "run_onnx", "Parity", "check_parity", "Latency",
    "compare_latency", "engine_latencies", "quantize_onnx", "MIN_INT8_CONV_DEPTH", "CALIBRATION_SIZE", "CALIBRATION_BATCH",
    "calibration_images", "quantize_onnx_static", "quantize_pt2e", "save_exported", "check_pt2_archive", "load_exported",
    "MAP_PATHS", "MAP_BATCHES", "MAP_PRUNE_AMOUNT", "MAP_NEURON_FRACTIONS", "MAP_VAL_TOLERANCE", "MAP_EVAL_BATCH", "MapEntry", "deployment_map", "map_table",
    "plot_map", "Prediction",
    "Predictor", "cpu_eval_copy",
]

INPUT_NAME = "images"    # the graph's input and output names for the course's models, as a deployment reads them
OUTPUT_NAME = "logits"
GENERIC_INPUT_NAME = "input"    # ... and for any other model (export_onnx's input_name/output_name choose others)
GENERIC_OUTPUT_NAME = "output"
TASK_KEY = "mvtk.task"                # ONNX metadata: what Predictor.predict does with the outputs
VALUE_RANGE_KEY = "mvtk.value_range"  # ONNX metadata: the (low, high) input range Predictor checks, JSON
TASKS = ("classification", "regression")
PARITY_RTOL, PARITY_ATOL = 1e-3, 1e-5  # ONNX Runtime vs PyTorch, float32 on the CPU
INT8_OP_TYPES = ("MatMul", "Gemm")     # quantize the linear layers; ConvInteger is slow on ORT's CPU
SOURCE_TRACE_KEY = "pkg.torch.onnx.stack_trace"  # node metadata holding the exporting machine's file paths
MANIFEST_SUFFIX = ".sha256"  # model.onnx -> model.onnx.sha256: `sha256sum` lines for the file and its .data
SOURCE_KEY = "mvtk.source_sha256"  # ONNX metadata: SHA-256 of the registry weights the Predictor exported


# -- §1 preparing for inference ---------------------------------------------------------------------------


def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Logits for `images` in eval mode under torch.inference_mode, in batches, on the CPU (Lesson 07, §1).

    The model's train/eval mode is restored afterwards; the input goes to the model's device. A model
    whose forward takes more than one input is refused (InvalidArgumentError): call it yourself.
    """
    check_module(model)
    images = _one_input(model, images, "images", users="predict_logits, export_onnx, check_parity and Predictor",
                        fix="call the model yourself under torch.inference_mode()")
    check_positive_int(batch_size, "batch_size")
    device = model_device(model)  # the CPU for a model without parameters or buffers
    with eval_mode(model), torch.inference_mode():
        parts = [model(chunk.to(device)).cpu() for chunk in images.split(batch_size)]
    return torch.cat(parts)


# -- §2 exporting and inspecting --------------------------------------------------------------------------


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the SHA-256 manifest of a file mvtk exported lives: `<path>.sha256` beside it (Lesson 07, §2)."""
    path = check_path(path, "path")
    return path.with_name(path.name + MANIFEST_SUFFIX)


def write_manifest(path: str | os.PathLike, files: Sequence[str | os.PathLike] | None = None) -> Path:
    """Record the SHA-256 of `path` and of `files` beside it in `<path>.sha256`; returns that path (Lesson 07, §2).

    One `sha256sum` line per file (`<hex>  <name>`), so `sha256sum -c model.onnx.sha256` checks it
    too. `files` default to `path` alone; every file must sit in `path`'s folder. Written atomically.
    """
    path = check_path(path, "path")
    files = [path] if files is None else [check_path(f, "files") for f in files]
    lines = []
    for file in files:
        if file.parent != path.parent:
            raise InvalidArgumentError(f"a manifest covers files in one folder; {str(file)!r} is not beside {path.name}")
        lines.append(f"{sha256_file(file)}  {file.name}\n")
    target = manifest_path(path)
    _write_or_explain(target, lambda tmp: tmp.write_text("".join(lines)))
    return target


def verify_manifest(path: str | os.PathLike) -> bool:
    """Check `path` and the files its `<path>.sha256` lists against their recorded SHA-256 (Lesson 07, §2).

    Returns True when every file matches, False when there is no manifest (a file exported
    elsewhere: accepted, but unverified). A missing file, a different SHA-256, a damaged manifest, or
    something else where the manifest should be (a folder, a symlink, a fifo) raises IntegrityError
    naming the file. A checksum detects corruption, not a deliberate edit:
    whoever can change the file can rewrite its manifest too.
    """
    recorded = _recorded(path)
    if recorded is None:
        return False
    path = Path(path)
    for name, expected in recorded.items():
        file = path.parent / name
        if not file.is_file():
            raise IntegrityError(f"{str(file)!r} is missing: {manifest_path(path).name} lists it as part of {path.name}")
        _check_digest(file, sha256_file(file), expected, manifest_path(path).name)
    return True


def _recorded(path) -> dict[str, str] | None:
    """File name -> SHA-256 from `<path>.sha256`, with `path` itself listed; None without a manifest."""
    target = manifest_path(path)
    kind = _kind(target)
    if kind is None:
        return None
    if kind != "file":  # never "no manifest": that would load the file unverified
        raise IntegrityError(f"{str(target)!r} should be the SHA-256 manifest of {Path(path).name} but is {kind}; "
                             f"cannot verify {Path(path).name}: remove it and export again")
    try:
        text = target.read_text(encoding="ascii")
        recorded = {}
        for line in text.splitlines():
            digest, name = line.split("  ", 1)
            if len(digest) != 64 or set(digest) - set("0123456789abcdef") or Path(name).name != name or name in (".", ".."):
                raise ValueError(line)
            recorded[name] = digest
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{str(target)!r} is not a SHA-256 manifest written by mvtk (damaged line "
                             f"{str(exc)[:60]!r}); cannot verify {Path(path).name}") from None
    except OSError as exc:  # no permission, an I/O error
        raise IntegrityError(f"cannot read the SHA-256 manifest {str(target)!r}: {exc.strerror or exc}; "
                             f"cannot verify {Path(path).name}") from exc
    if Path(path).name not in recorded:
        raise IntegrityError(f"{str(target)!r} does not list {Path(path).name}; cannot verify it")
    return recorded


def _kind(path: Path) -> str | None:
    """What is at `path`, a link not followed: None (nothing), 'file', 'a folder', 'a symlink' or 'a special file'."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "file" if stat.S_ISREG(mode) else "a folder" if stat.S_ISDIR(mode) else "a special file (not a regular file)"


def _manifest_slot(path: Path) -> Path:
    """`<path>.sha256`, after refusing (ExportError) a folder there: checked before anything is written."""
    target = manifest_path(path)
    if _kind(target) == "a folder":
        raise ExportError(f"cannot write the SHA-256 manifest {str(target)!r}: it is a folder; remove it and "
                          "export again (nothing was written)")
    return target


def _check_digest(file: Path, actual: str, expected: str, manifest: str) -> None:
    if not hmac.compare_digest(actual, expected):
        raise IntegrityError(f"{str(file)!r} does not match the SHA-256 recorded in {manifest} when mvtk wrote it "
                             f"(expected {expected}, got {actual}): the file is damaged or was changed")


def _write_or_explain(path: Path, write: Callable[[Path], Any], error: type[Exception] = ExportError) -> None:
    """atomic_write `path` with `write(tmp)`; an OSError (a full disk) becomes `error` naming the file."""
    try:
        with atomic_write(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise write_error(path, exc, error) from exc


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                dynamic_batch: bool = True, external_data: bool = False, opset: int | None = None,
                metadata: dict[str, str] | None = None, input_name: str | None = None,
                output_name: str | None = None) -> Path:
    """Export an eval-mode CPU copy of `model` to ONNX at `path` with the dynamo exporter; returns the path.

    Lesson 07, §2. The model itself is not changed. `example` is one batch of input; with
    `dynamic_batch` the graph accepts any batch size. `external_data=True` writes the weights to
    `<path>.data` beside the graph (torch's default layout, needed above 2 GB); False writes one
    self-contained file. `opset` picks the ONNX operator-set version (None: the exporter's default).
    `metadata` (str -> str) goes into the model's metadata_props, e.g. where the weights came from.
    Files are written atomically and the result passes `onnx.checker`; a model the exporter cannot
    capture raises ExportError, and so does a full disk (naming the file; the old files stay as they
    were). `<path>.sha256` records the SHA-256 of the graph and its .data (see verify_manifest), and
    check_onnx, describe_onnx, load_session and Predictor verify it. The exporter's per-node Python stack traces are dropped: they hold absolute paths of the
    exporting machine, so without them the same model gives the same bytes wherever it is exported.
    `input_name`/`output_name` name the graph's input and output (default: see io_names). The model must
    take one input tensor: a forward with more inputs is refused with InvalidArgumentError.
    """
    check_module(model)
    example = _one_input(model, example)
    names = io_names(model, input_name, output_name)
    path = _check_onnx_path(path)
    _manifest_slot(path)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(x, str) for kv in metadata.items() for x in kv)):
        raise InvalidArgumentError(f"metadata must be a dict of str to str or None, got {metadata!r}")
    program = _to_onnx_program(model, example, dynamic_batch, opset, names)
    proto = drop_source_traces(program.model_proto)
    if metadata:
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_checked(proto, path, external_data)
    except OSError as exc:  # a full disk, a read-only folder: name the file, say that the old one is intact
        raise write_error(path, exc, ExportError) from exc
    return path


def drop_source_traces(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the exporter's stack-trace metadata (absolute source paths) from every node, in place (Lesson 07, §2)."""
    nodes = [node for function in proto.functions for node in function.node]
    graphs = [proto.graph]
    while graphs:  # the main graph and the bodies of If/Loop/Scan nodes
        graph = graphs.pop()
        nodes.extend(graph.node)
        for attr in (attr for node in graph.node for attr in node.attribute):
            graphs.extend([attr.g] if attr.HasField("g") else attr.graphs)
    for node in nodes:
        kept = [prop for prop in node.metadata_props if prop.key != SOURCE_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return proto


def io_names(model: nn.Module, input_name: str | None = None, output_name: str | None = None) -> tuple[str, str]:
    """The ONNX graph's (input, output) names: 'images'/'logits' for the course's models, else 'input'/'output' (Lesson 07, §2).

    A name given wins; it must be a non-empty str.
    """
    course = isinstance(unwrap(check_module(model)), tuple(MODELS.values()))
    names = []
    for given, course_name, generic, what in ((input_name, INPUT_NAME, GENERIC_INPUT_NAME, "input_name"),
                                               (output_name, OUTPUT_NAME, GENERIC_OUTPUT_NAME, "output_name")):
        if given is not None and (not isinstance(given, str) or not given):
            raise InvalidArgumentError(f"{what} must be a non-empty str or None, got {given!r}")
        names.append(given or (course_name if course else generic))
    return names[0], names[1]


def _one_input(model: nn.Module, example, name: str = "example",
               users: str = "export_onnx, check_parity and Predictor",
               fix: str = "export it with torch.onnx.export(model, (a, b), ...) directly") -> torch.Tensor:
    """`example` checked as one input batch, after making sure the model's forward takes one input.

    The refusal names `users`, the functions that assume one input, and `fix`, what to do instead.
    """
    try:
        parameters = inspect.signature(unwrap(model).forward).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1 or isinstance(example, (tuple, list)):
        shown = f"forward({', '.join(required)})" if len(required) > 1 else f"{len(example)} example inputs"
        raise InvalidArgumentError(f"{type(model).__name__} takes more than one input ({shown}); {users} "
                                   f"assume one input tensor: {fix}, or wrap it in a module that takes one tensor")
    return _check_tensor(example, name)


def _to_onnx_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool, opset: int | None,
                     names: tuple[str, str]):
    example = example.detach().cpu()
    if dynamic_batch and example.shape[0] == 1:
        example = example.repeat(2, *[1] * (example.dim() - 1))  # a batch of 1 would be specialised to 1
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    try:
        cpu_model = cpu_eval_copy(model)
        return torch.onnx.export(cpu_model, (example,), dynamo=True, verbose=False, opset_version=opset,
                                 input_names=[names[0]], output_names=[names[1]],
                                 dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # the exporter raises many types; the lesson needs one with the model's name
        raise ExportError(f"could not export {type(model).__name__} to ONNX with input of shape "
                          f"{tuple(example.shape)}: {_first_line(exc)}") from exc


def _save_checked(proto: onnx.ModelProto, path: Path, external_data: bool) -> None:
    data_path = path.with_name(path.name + ".data")
    # Save under the final names in a staging folder and check there, so a model that fails the
    # checker never reaches `path`; then move the data first, the graph next and the manifest last,
    # each atomically, so the .onnx file on disk never points at data that is not there yet, and an
    # export killed half-way fails verification instead of loading a mix of old and new files.
    with tempfile.TemporaryDirectory(dir=path.parent) as staging:
        staged = Path(staging) / path.name
        if external_data:
            onnx.save_model(copy.deepcopy(proto), os.fspath(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_path.name)
        else:
            onnx.save_model(proto, os.fspath(staged))
        check_onnx(staged)
        files = [staged, staged.with_name(data_path.name)] if external_data else [staged]
        write_manifest(staged, files)
        if external_data:
            with atomic_write(data_path) as tmp:
                os.replace(staged.with_name(data_path.name), tmp)
        with atomic_write(path) as tmp:
            os.replace(staged, tmp)
        with atomic_write(manifest_path(path)) as tmp:
            os.replace(manifest_path(staged), tmp)
    if not external_data:
        data_path.unlink(missing_ok=True)  # an older two-file export's weights, no longer referenced


def check_onnx(path: str | os.PathLike) -> Path:
    """Verify a saved model's SHA-256 manifest, then run onnx.checker (full check); returns its path (Lesson 07, §2).

    Raises ExportError naming the file when it is missing, unreadable or invalid, IntegrityError when
    it (or its .data) differs from `<path>.sha256`. A file without a manifest (exported elsewhere) is
    checked by onnx.checker only: its bytes are unverified.
    """
    path = _existing_onnx(path)
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)  # a path, so external data is found
    except Exception as exc:
        raise ExportError(f"{path.name} is not a valid ONNX model: {_first_line(exc)}") from exc
    return path


def _existing_onnx(path) -> Path:
    """`path` as a Path after checking that it is an existing file and matches its manifest, if any."""
    path = check_path(path, "path")
    if not path.is_file():
        raise ExportError(f"no ONNX file at {str(path)!r}")
    verify_manifest(path)
    return path


@dataclass(frozen=True)
class OnnxSummary:
    """What is inside an ONNX file: opset, operators, inputs/outputs, weights and files (Lesson 07, §2)."""
    opset: int
    operators: dict[str, int]                     # op type -> how many nodes, in graph order
    inputs: list[tuple[str, tuple, str]]          # (name, shape with named dynamic dims, dtype)
    outputs: list[tuple[str, tuple, str]]
    parameters: int                               # scalars in initializers: the weights + small constants
    files: dict[str, int]                         # file name -> bytes: the graph and any external data

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())


def describe_onnx(path: str | os.PathLike) -> OnnxSummary:
    """Summarise a saved ONNX model, its manifest verified when present, weights left on disk (Lesson 07, §2)."""
    path = _existing_onnx(path)
    proto = _load_graph_only(path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxSummary(
        opset=opset,
        operators=dict(Counter(node.op_type for node in proto.graph.node)),
        inputs=[_value_info(v) for v in proto.graph.input],
        outputs=[_value_info(v) for v in proto.graph.output],
        parameters=sum(int(np.prod(t.dims)) for t in proto.graph.initializer),
        files={p.name: p.stat().st_size for p in onnx_files(path)})


def onnx_files(path: str | os.PathLike) -> list[Path]:
    """The files an ONNX model consists of: the .onnx graph, then its external data files (Lesson 07, §2)."""
    path = check_path(path, "path")
    proto = _load_graph_only(path)
    locations = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if Path(location).name != location or location in (".", ".."):  # ORT refuses these too
                raise ExportError(f"{path.name} points at external data outside its folder: {location!r}")
            if location not in locations:
                locations.append(location)
    return [path] + [path.parent / location for location in locations]


def onnx_size(path: str | os.PathLike) -> int:
    """Bytes on disk of an ONNX model, graph and external data together (Lesson 07, §5)."""
    return sum(p.stat().st_size for p in onnx_files(path))


def _load_graph_only(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ExportError(f"no ONNX file at {str(path)!r}")
    try:
        return onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path.name} is not a readable ONNX file: {type(exc).__name__}") from exc


def _value_info(value: onnx.ValueInfoProto) -> tuple[str, tuple, str]:
    tensor = value.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    return value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name


# -- §3 running with ONNX Runtime --------------------------------------------------------------------------


def load_session(path: str | os.PathLike, *, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for a saved model with `threads` intra-op threads (Lesson 07, §3).

    None (the default) uses torch's current thread count, `torch.get_num_threads()`, so the two
    engines are timed on equal terms. The file's `<path>.sha256` manifest is verified first
    (IntegrityError on a mismatch); a file without one, exported elsewhere, is loaded unverified.
    """
    threads = torch.get_num_threads() if threads is None else threads
    check_positive_int(threads, "threads")
    path = _existing_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {path.name}: {_first_line(exc)}") from exc


def run_onnx(session: ort.InferenceSession, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """The session's first output (the logits) for a batch, as a numpy array (Lesson 07, §3).

    The batch is converted to the dtype the graph's input declares (float32 for the course's models).
    A graph with more than one input is refused with ExportError.
    """
    array = _to_numpy(images, "images")
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise ExportError(f"the ONNX graph takes {len(graph_inputs)} inputs "
                          f"({', '.join(i.name for i in graph_inputs)}); run_onnx and Predictor feed one")
    dtype = _onnx_dtype(graph_inputs[0].type)
    return session.run(None, {graph_inputs[0].name: np.ascontiguousarray(array, dtype=dtype)})[0]


class Parity(NamedTuple):
    """How closely ONNX Runtime matches PyTorch on a set of inputs (Lesson 07, §3)."""
    max_abs_diff: float   # largest |onnx - torch| over all logits
    agreement: float      # fraction of samples with the same predicted class
    samples: int


def check_parity(model: nn.Module, session: ort.InferenceSession, images: torch.Tensor, *,
                 rtol: float = PARITY_RTOL, atol: float = PARITY_ATOL) -> Parity:
    """Compare ONNX Runtime's logits with PyTorch's on `images`; raise ExportError beyond rtol/atol (Lesson 07, §3).

    PyTorch runs a CPU copy of the model, as ONNX Runtime runs on the CPU here (a GPU's TF32
    convolutions would differ by more than atol).
    """
    check_module(model)
    _one_input(model, images)
    expected = predict_logits(cpu_eval_copy(model), images).numpy()
    actual = run_onnx(session, images)
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX output has shape {actual.shape}, PyTorch's has {expected.shape}")
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise ExportError(f"ONNX Runtime and PyTorch disagree: max |difference| {diff:.3g} is beyond "
                          f"rtol={rtol:g}, atol={atol:g}; was the model exported in eval() mode, from these weights?")
    if expected.ndim == 2 and expected.shape[1] > 1:  # class scores: do the predicted classes agree?
        agreement = float(np.mean(actual.argmax(axis=1) == expected.argmax(axis=1))) if len(expected) else 1.0
    else:  # other outputs (a regression's values): samples within the tolerance, all of them by now
        agreement = 1.0
    return Parity(max_abs_diff=diff, agreement=agreement, samples=len(expected))


# -- §4 speed ---------------------------------------------------------------------------------------------


class Latency(NamedTuple):
    """Median seconds per batch for PyTorch eager and ONNX Runtime, both on the CPU (Lesson 07, §4)."""
    batch: int
    eager_s: float
    onnx_s: float

    @property
    def speedup(self) -> float:
        """How many times faster ONNX Runtime is than eager PyTorch."""
        return self.eager_s / self.onnx_s


def compare_latency(model: nn.Module, session: ort.InferenceSession, input_shape: Sequence[int],
                    batch_sizes: Sequence[int] = (1, 256), *, budget_s: float = 0.5) -> list[Latency]:
    """Time eager PyTorch (a CPU copy, inference_mode) against ONNX Runtime per batch size (Lesson 07, §4).

    `input_shape` is one sample's shape, e.g. (1, 16, 16); inputs are random, made on the CPU; the two
    engines are timed in alternating blocks (see engine_latencies); `budget_s` is per batch size.
    """
    check_module(model)
    for batch in batch_sizes:
        check_positive_int(batch, "batch size")
    eager = cpu_eval_copy(model)
    rows = []
    for batch in batch_sizes:
        times = engine_latencies(torch.rand(batch, *input_shape), models={"eager": eager},
                                 sessions={"onnx": session}, budget_s=budget_s)
        rows.append(Latency(batch, times["eager"], times["onnx"]))
    return rows


def engine_latencies(images: torch.Tensor, *, models: dict[str, nn.Module] | None = None,
                     sessions: dict[str, ort.InferenceSession] | None = None, repeats: int | None = None,
                     warmup: int = 2, budget_s: float = 0.5) -> dict[str, float]:
    """Median seconds per call on `images` of each eager model and each ONNX Runtime session (Lesson 07, §4-§5).

    Models run as eval-mode CPU copies under torch.inference_mode, sessions on the same values as a
    numpy array; all are timed in alternating warmed-up blocks (mvtk.timing.median_latencies), so a
    change in machine load hits every engine alike. Returns label -> seconds, models first.
    """
    images = _check_tensor(images, "images").detach().cpu()
    models, sessions = dict(models or {}), dict(sessions or {})
    if not models and not sessions or set(models) & set(sessions):
        raise InvalidArgumentError(f"give at least one model or session, each under its own label; got models "
                                   f"{sorted(models)} and sessions {sorted(sessions)}")
    array = images.numpy()
    runners = {}
    for label, model in models.items():
        check_module(model)
        runners[label] = _eager_runner(cpu_eval_copy(model), images)
    for label, session in sessions.items():
        runners[label] = lambda session=session: run_onnx(session, array)
    times = median_latencies(list(runners.values()), repeats=repeats, warmup=warmup, budget_s=budget_s)
    return dict(zip(runners, times))


def _eager_runner(model: nn.Module, images: torch.Tensor) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(images)
    return run


# -- §5 int8 for deployment -------------------------------------------------------------------------------


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *,
                  op_types: Sequence[str] | None = INT8_OP_TYPES, per_channel: bool = False,
                  compact: bool = True) -> Path:
    """Write an int8 copy of an ONNX model with onnxruntime's quantize_dynamic; returns `dst` (Lesson 07, §5).

    Weights of `op_types` nodes become int8 (None: every supported op, Conv included);
    activations are quantized on the fly. The model is pre-processed (shape inference,
    graph optimisation) first, as ONNX Runtime recommends. One self-contained file is written, with
    its `<dst>.sha256` manifest; `src`'s manifest is verified first when it has one. Refused: `dst` the
    same file as `src`, and a `src` that is already quantized. `compact` (default) drops what the model
    does not run on: every node's metadata and doc string (the exporter's debug records of module names
    and classes) and the opset imports no node uses, with onnx-ir's own passes; on the 64-128-10 MLP
    that is 6 % of the gzipped int8 file. The graph, weights and model metadata stay.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = check_path(src, "src"), _check_onnx_path(dst)
    _manifest_slot(dst)
    check_onnx(src)
    _check_float_onnx(src, dst)
    if op_types is not None and (isinstance(op_types, str) or not all(isinstance(o, str) for o in op_types)):
        raise InvalidArgumentError(f"op_types must be a list of ONNX op names such as ['MatMul', 'Gemm'] or None, "
                                   f"got {op_types!r}")

    def quantize(prepared, out):
        quantize_dynamic(prepared, out, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=None if op_types is None else list(op_types))

    return _write_quantized(src, dst, quantize, compact)


def _write_quantized(src: Path, dst: Path, quantize: Callable[[str, str], None], compact: bool) -> Path:
    """Pre-process `src` as ONNX Runtime recommends, `quantize(prepared, out)` into `dst` atomically, compact
    and check it, then write its manifest; the shared tail of quantize_onnx and quantize_onnx_static."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with tempfile.TemporaryDirectory() as work, atomic_write(dst) as tmp:
            prepared = os.path.join(work, "prepared.onnx")
            quant_pre_process(os.fspath(src), prepared)
            quantize(prepared, os.fspath(tmp))
            if compact:
                _compact_onnx(tmp)
            check_onnx(tmp)
    except OSError as exc:
        raise write_error(dst, exc, ExportError) from exc
    write_manifest(dst)
    return dst


def _compact_onnx(path) -> None:
    """Drop every node's metadata and doc string and the unused opset imports from a fresh int8 file, in place.

    onnx-ir's own passes (ClearMetadataAndDocStringPass, RemoveUnusedOpsetsPass): what goes is the
    exporter's per-node debug records (module names and classes) and the domains the quantizer declares
    but never uses; the graph, weights and model-level metadata (the Predictor's settings) stay. For the
    self-contained file onnxruntime's quantizer has just written, before its manifest.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass, RemoveUnusedOpsetsPass

    model = ir.from_proto(onnx.load(os.fspath(path)))
    for compaction in (ClearMetadataAndDocStringPass(), RemoveUnusedOpsetsPass()):
        compaction(model)
    onnx.save_model(ir.to_proto(model), os.fspath(path))


MIN_INT8_CONV_DEPTH = 32   # a Conv summing fewer products per output stays float32 in static int8 (Lesson 07, §5)
CALIBRATION_SIZE = 64       # training images that calibrate static int8: a tie with 256 on the digits (Lesson 07, §5)
CALIBRATION_BATCH = 32      # images per calibration batch fed to ONNX Runtime or the PT2E observers


def calibration_images(images: torch.Tensor, size: int = CALIBRATION_SIZE, *, seed: int = 0) -> torch.Tensor:
    """`size` images drawn without replacement from `images` (the training split, never test) by `seed` (Lesson 07, §5)."""
    images = _check_tensor(images, "images")
    check_positive_int(size, "size")
    if size > len(images):
        raise InvalidArgumentError(f"size={size} calibration images asked for, but the split holds only {len(images)}")
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]]


def quantize_onnx_static(src: str | os.PathLike, dst: str | os.PathLike, calibration: torch.Tensor | np.ndarray, *,
                         per_channel: bool = True, batch_size: int = CALIBRATION_BATCH, compact: bool = True,
                         min_conv_depth: int = MIN_INT8_CONV_DEPTH) -> Path:
    """Write a static int8 (QDQ) copy of an ONNX model, activation ranges calibrated on `calibration` (Lesson 07, §5).

    onnxruntime's quantize_static after quant_pre_process: weights int8 (per output channel when
    `per_channel`), activations uint8 with a scale fixed from the min/max they reach on the
    calibration batch (from the training split), Conv included (but see `min_conv_depth`). The graph's input must be float32
    and `calibration` a non-empty batch of finite samples of its shape; a wrong shape, an empty batch, a
    missing/invalid or already quantized `src`, or `dst` the same file as `src` raises an mvtk error
    naming it. One self-contained file with its manifest; `compact`: as in quantize_onnx.

    A Conv whose outputs each sum fewer than `min_conv_depth` products (in_channels / groups x kernel
    height x width) stays float32, its neighbours int8. Int8 kernels pay per output for im2col and
    requantization and win it back only on long sums; a first layer on 1-channel images sums 9, and
    ONNX Runtime runs it far faster in float32 (its NCHWc kernel): on SmallCNN its int8 conv1 took
    about ten times its float time in ONNX Runtime's profiler. 1 quantizes every Conv;
    benchmarks/export.py measures the result against fp32.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = check_path(src, "src"), _check_onnx_path(dst)
    check_positive_int(batch_size, "batch_size")
    check_positive_int(min_conv_depth, "min_conv_depth")
    _manifest_slot(dst)
    check_onnx(src)
    _check_float_onnx(src, dst)
    name, shape, dtype = describe_onnx(src).inputs[0]
    array = _check_calibration(calibration, f"{src.name}'s input {name}", shape)
    if dtype != "float32":
        raise InvalidArgumentError(f"static int8 calibrates float32 inputs; {src.name} takes {dtype}")
    batches = [{name: np.ascontiguousarray(array[i:i + batch_size], dtype=np.float32)}
               for i in range(0, len(array), batch_size)]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    def quantize(prepared, out):
        quantize_static(prepared, out, Batches(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=_shallow_convs(prepared, min_conv_depth))

    return _write_quantized(src, dst, quantize, compact)


def _shallow_convs(path: str, depth: int) -> list[str]:
    """Names of the Conv nodes in the model at `path` whose outputs each sum fewer than `depth` products.

    Depth: the weight's in_channels / groups x kernel size, read from its initializer. A shallow Conv
    without a name gets one (the quantizer excludes nodes by name), and the model is saved again.
    """
    proto = onnx.load(path)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    shallow = []
    for index, node in enumerate(proto.graph.node):
        weight = shapes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is not None and len(weight) >= 3 and int(np.prod(weight[1:])) < depth:
            node.name = node.name or f"shallow_conv_{index}"
            shallow.append(node.name)
    if shallow:
        onnx.save_model(proto, path)
    return shallow


def quantize_pt2e(model: nn.Module, calibration: torch.Tensor, *, batch_size: int = CALIBRATION_BATCH) -> nn.Module:
    """A static int8 copy of `model` by the PT2E flow: torch.export, X86InductorQuantizer, calibrate, convert (Lesson 07, §5).

    The returned module holds int8 weights between quantize/dequantize nodes; it runs eagerly as a
    reference, and torch.compile lowers it to int8 kernels. `calibration` (training images) sets the
    activation scales (a non-empty batch of finite values; one image is enough); the batch dimension
    stays dynamic. The model itself is not changed; a model already int8 or on the meta device is refused.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    check_float_model(model)
    calibration = _check_tensor(calibration, "calibration").detach().cpu()
    _check_calibration(calibration, f"{type(model).__name__}'s input")
    check_positive_int(batch_size, "batch_size")
    example = calibration[[0, 0]] if len(calibration) == 1 else calibration[:2]  # batch 1 would fix the batch size
    copy_ = cpu_eval_copy(model)
    try:
        with torch.no_grad():
            copy_(example)
    except Exception as exc:
        raise InvalidArgumentError(f"calibration of shape {tuple(calibration.shape)} does not fit "
                                   f"{type(model).__name__}: {_first_line(exc)[:160]}") from None
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    try:
        captured = torch.export.export(copy_, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        prepared = prepare_pt2e(captured.module(), quantizer)
    except Exception as exc:
        raise ExportError(f"PT2E cannot capture {type(model).__name__}: {_first_line(exc)[:200]}") from exc
    with torch.no_grad():
        for chunk in calibration.split(batch_size):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    read = {node.target for node in converted.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in converted.named_parameters()] + [n for n, _ in converted.named_buffers()]:
        if name not in read:  # the float weights the int8 graph no longer reads: not part of what it runs
            owner, _, attr = name.rpartition(".")
            delattr(converted.get_submodule(owner), attr)
    return converted


# -- §6 torch.export (.pt2) -------------------------------------------------------------------------------


def save_exported(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                  dynamic_batch: bool = True) -> Path:
    """torch.export an eval-mode CPU copy of `model` and save the program as a .pt2 file (Lesson 07, §6).

    `example` is one input batch, or a tuple of them for a forward with several inputs (each batch first).
    The file is written atomically, with `<path>.sha256` beside it (load_exported verifies it); a full
    disk raises ExportError naming the file, and the old file stays as it was.
    """
    check_module(model)
    if isinstance(example, (tuple, list)) and example:
        example = tuple(_check_tensor(x, f"example[{i}]") for i, x in enumerate(example))
    else:
        example = (_check_tensor(example, "example"),)
    path = check_path(path, "path")
    if path.suffix != ".pt2":
        raise InvalidArgumentError(f"path must end in .pt2, got {str(path)!r}")
    manifest = _manifest_slot(path)
    data = export_program(model, example, dynamic_batch=dynamic_batch)  # lesson 03's home, shared with the registry
    _write_or_explain(path, lambda tmp: tmp.write_bytes(data))
    _write_or_explain(manifest, lambda tmp: tmp.write_text(f"{sha256_bytes(data)}  {path.name}\n"))
    return path


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Load a .pt2 file saved by save_exported as a callable module, no Python class needed (Lesson 07, §6).

    The bytes are read once: checked against `<path>.sha256` when it exists (IntegrityError on a
    mismatch; without one the file is unverified), then scanned by check_pt2_archive (ExportError for
    an archive torch would unpickle code from), and only then handed to torch.export.load. The
    graph can still call any registered operator: load .pt2 files only from people you trust.
    """
    path = check_path(path, "path")
    if not path.is_file():
        raise ExportError(f"no .pt2 file at {str(path)!r}")
    data = path.read_bytes()
    recorded = _recorded(path)
    if recorded is not None:
        _check_digest(path, sha256_bytes(data), recorded[path.name], manifest_path(path).name)
    return load_program(data, path.name)  # scanned by check_pt2_archive before torch sees the bytes


# -- §7 a Predictor for deployment ------------------------------------------------------------------------


_RECORDED = object()  # Predictor's default for value_range and task: what the file records, else the course's


class Prediction(NamedTuple):
    """Predicted class per sample and the softmax probabilities behind it (Lesson 07, §7)."""
    labels: np.ndarray         # int64, shape (N,)
    probabilities: np.ndarray  # float32, shape (N, classes), rows sum to 1


class Predictor:
    """An ONNX Runtime model behind input checks: shape, dtype, NaN/inf, value range (Lesson 07, §7).

    Build it from a file, with `Predictor.from_model` from a model and an example batch, or with
    `Predictor.from_registry` from a registered version. What it checks and returns is declared, not
    guessed: the input's name, shape and dtype are the graph's (taken from the example it was exported
    with), the value range and task are given or recorded in the file.
    """

    def __init__(self, onnx_path: str | os.PathLike, *, value_range=_RECORDED, threads: int | None = None,
                 source: str | None = None, task=_RECORDED, postprocess="task"):
        """Open `onnx_path` (manifest verified when present, checked, then loaded in an ONNX Runtime CPU session).

        `threads`: see load_session. A file with a `<onnx_path>.sha256` that does not match raises
        IntegrityError; a file without one (exported elsewhere) is served unverified.

        `value_range` is the (low, high) range of input values seen in training: a batch with values
        outside it is refused; None turns that check off. Default: the range recorded in the file
        (from_model and from_registry record it), else (0, 1) for a graph whose input is named 'images'
        (the course's pixels), else None. `task` ('classification', 'regression' or None) decides what
        predict returns; default: recorded in the file, else 'classification' for an output named
        'logits', else None. `postprocess`: "task" (predict follows `task`), None (predict returns the
        raw outputs) or a function of the raw outputs. `source` names the model in messages and in
        repr, e.g. "digits-cnn v1"; default: the file name.
        """
        self.path = check_onnx(onnx_path)  # verifies <onnx_path>.sha256 when it exists
        self.session = load_session(self.path, threads=threads)
        graph_inputs = self.session.get_inputs()
        if len(graph_inputs) != 1:
            raise ExportError(f"{self.path.name} takes {len(graph_inputs)} inputs "
                              f"({', '.join(i.name for i in graph_inputs)}); Predictor serves models with one input")
        graph_input = graph_inputs[0]
        self.input_name, self.output_name = graph_input.name, self.session.get_outputs()[0].name
        self.dtype = np.dtype(_onnx_dtype(graph_input.type))
        self.input_shape = tuple(graph_input.shape[1:])   # one sample, e.g. (1, 16, 16)
        if not all(isinstance(d, int) for d in self.input_shape):
            raise ExportError(f"{self.path.name}: only the batch dimension may be dynamic, "
                              f"got input shape {graph_input.shape}")
        recorded = {p.key: p.value for p in _load_graph_only(self.path).metadata_props}
        if value_range is _RECORDED:
            value_range = (json.loads(recorded[VALUE_RANGE_KEY]) if VALUE_RANGE_KEY in recorded
                           else (0.0, 1.0) if self.input_name == INPUT_NAME else None)
        if task is _RECORDED:
            task = recorded.get(TASK_KEY) or ("classification" if self.output_name == OUTPUT_NAME else None)
        if value_range is not None and not _is_range(value_range):
            raise InvalidArgumentError(f"value_range must be (low, high) with low < high, or None, got {value_range!r}")
        if task is not None and task not in TASKS:
            raise InvalidArgumentError(f"task must be one of {TASKS} or None (raw outputs), got {task!r}")
        if not (postprocess in ("task", None) or callable(postprocess)):
            raise InvalidArgumentError(f"postprocess must be 'task', None (raw outputs) or a function of the "
                                       f"outputs, got {postprocess!r}")
        if source is not None and not isinstance(source, str):
            raise InvalidArgumentError(f"source must be a str such as 'digits-cnn v1' or None, got {type(source).__name__}")
        self.value_range = None if value_range is None else tuple(value_range)
        self.task, self.postprocess = task, postprocess
        self.source = source or self.path.name
        image = self.input_name == INPUT_NAME  # the course's wording: images and pixels
        self._words = ("image", "images", "pixel values") if image else ("sample", "inputs", "values")

    def __repr__(self) -> str:
        return f"Predictor({self.source}, input (N, {', '.join(map(str, self.input_shape))}))"

    @classmethod
    def from_model(cls, model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                   value_range: tuple[float, float] | None = None, task: str | None = None,
                   input_name: str | None = None, output_name: str | None = None, **kwargs) -> "Predictor":
        """Export `model` to ONNX at `path` for inputs like `example`, check parity, and serve it (Lesson 07, §7).

        `example` is one batch of real inputs: its shape (after the batch dimension) and dtype become
        the ones the Predictor accepts. `value_range` (default None: no check) and `task` (default:
        'classification' for the course's models, else None: raw outputs) are recorded in the file.
        `input_name`/`output_name`: see io_names. `kwargs` go to Predictor (threads, source, postprocess).
        """
        if task is not None and task not in TASKS:
            raise InvalidArgumentError(f"task must be one of {TASKS} or None (raw outputs), got {task!r}")
        if value_range is not None and not _is_range(value_range):
            raise InvalidArgumentError(f"value_range must be (low, high) with low < high, or None, got {value_range!r}")
        if task is None and isinstance(unwrap(check_module(model)), tuple(MODELS.values())):
            task = "classification"
        path = export_onnx(model, example, path, input_name=input_name, output_name=output_name,
                           metadata=_settings(task, value_range))
        check_parity(model, load_session(path), example)
        return cls(path, **kwargs)

    @classmethod
    def from_registry(cls, registry, name: str, *, alias: str | None = "production", version: int | None = None,
                      cache_dir: str | os.PathLike, input_shape: Sequence[int] | None = None,
                      example: torch.Tensor | None = None, value_range=_RECORDED, task=_RECORDED,
                      input_name: str | None = None, output_name: str | None = None, **kwargs) -> "Predictor":
        """Serve a registered version (by alias or number) as ONNX, exported once per SHA-256 (Lesson 07, §7).

        The input comes from `example` (a batch like the ones it will serve: shape and dtype), else
        from `input_shape` (float32), else, for the course's models only, from the model
        (mvtk.models.sample_shape); any other model needs one of the two. Default `value_range`:
        (0, 1) for the course's models, else None (no check); default `task`: 'classification' for
        the course's models, else None (raw outputs). The export goes to
        `cache_dir/<name>-v<version>-<sha256[:16]>.onnx` (plus a tag of the input and names when they
        are not the course's defaults) once it has been checked for parity with the PyTorch weights
        (it is exported and checked under a staging name first, so a file that fails the check never
        reaches the cache); a later call for the same weights reuses it. Before reuse, the cached file
        is verified against its `.sha256` manifest and its recorded source (the registry version's
        full weights SHA-256, in the ONNX metadata under SOURCE_KEY); a file that fails either
        (damaged, edited, or left half-written) is rebuilt, with a warning.
        `kwargs` go to Predictor (threads, source, postprocess).
        """
        mv = registry.get(name, version=version, alias=None if version is not None else alias)
        course = mv.architecture is not None
        if value_range is _RECORDED:
            value_range = (0.0, 1.0) if course else None
        if task is _RECORDED:
            task = "classification" if course else None
        if example is not None:
            example = _check_tensor(example, "example").detach().cpu()
        tag = {"shape": None if example is None else list(example.shape[1:]),
               "dtype": None if example is None else str(example.dtype),
               "input_shape": None if input_shape is None else list(input_shape),
               "names": [input_name, output_name]}
        custom = any(v is not None for v in (example, input_shape, input_name, output_name)) and not course
        suffix = "-" + hashlib.sha256(json.dumps(tag).encode()).hexdigest()[:8] if custom or example is not None else ""
        cache = check_path(cache_dir, "cache_dir")
        path = cache / f"{mv.name}-v{mv.version}-{mv.sha256[:16]}{suffix}.onnx"
        problem = _cache_problem(path, mv.sha256)
        if problem is not None:
            if path.exists():
                warnings.warn(f"rebuilding {path.name}: {problem}", stacklevel=2)
            _manifest_slot(path)
            model = registry.load_model(mv.name, version=mv.version)
            if example is None:
                example = torch.rand(2, *_input_shape(model, input_shape, course), generator=torch.Generator().manual_seed(0))
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache, prefix=".staging-") as staging:
                staged = export_onnx(model, example, Path(staging) / path.name, input_name=input_name,
                                     output_name=output_name,
                                     metadata={SOURCE_KEY: mv.sha256, **_settings(task, value_range)})
                check_parity(model, load_session(staged), example)
                os.replace(staged, path)  # the graph, then its manifest: each one atomic rename
                os.replace(manifest_path(staged), manifest_path(path))
        return cls(path, source=f"{mv.name} v{mv.version}", value_range=value_range, task=task, **kwargs)

    def validate(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The batch as a numpy array of the graph's dtype, or InputShapeError saying what is wrong and how to fix it."""
        one, many, values = self._words
        array = _to_numpy(images, many, error=InputShapeError)
        expected = f"(N, {', '.join(map(str, self.input_shape))})"
        if array.dtype != self.dtype:
            torch_cast, numpy_cast = _CASTS.get(self.dtype.name, (f"to(torch.{self.dtype.name})", f"np.{self.dtype.name}"))
            raise InputShapeError(f"{self.source} expects {self.dtype.name} {many}, got {array.dtype}; convert with "
                                  f"{many}.{torch_cast} (torch) or {many}.astype({numpy_cast}) (numpy)")
        if array.ndim == len(self.input_shape) and tuple(array.shape) == self.input_shape:
            raise InputShapeError(f"{self.source} expects a batch of shape {expected}, got one {one} of shape "
                                  f"{tuple(array.shape)}; add the batch dimension with {many}[None]")
        if array.ndim != len(self.input_shape) + 1 or tuple(array.shape[1:]) != self.input_shape:
            raise InputShapeError(f"{self.source} expects a batch of shape {expected}, got {tuple(array.shape)}")
        if array.shape[0] == 0:
            raise InputShapeError(f"{self.source} got an empty batch of shape {tuple(array.shape)}; send at least one {one}")
        if array.dtype.kind == "f":
            bad = ~np.isfinite(array)
            if bad.any():
                samples = np.flatnonzero(bad.reshape(len(array), -1).any(axis=1))
                raise InputShapeError(f"{self.source} got {int(bad.sum())} NaN/inf value(s) in {len(samples)} {one}(s), "
                                      f"first in {one} {int(samples[0])}; clean or drop those {many}")
        if self.value_range is not None:
            low, high = self.value_range
            lo, hi = float(array.min()), float(array.max())
            if lo < low or hi > high:
                raise InputShapeError(f"{self.source} expects {values} in [{low:g}, {high:g}] as in training, "
                                      f"got values from {lo:.3g} to {hi:.3g}; scale the {many} the same way")
        return array

    def outputs(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The model's raw outputs for a validated batch, no post-processing (Lesson 07, §7)."""
        return run_onnx(self.session, self.validate(images))

    def predict(self, images: torch.Tensor | np.ndarray):
        """A validated batch's prediction, post-processed as chosen (Lesson 07, §7).

        With task 'classification': a Prediction of labels and softmax probabilities. With 'regression'
        or no task, or `postprocess=None`: the raw outputs. With a function as `postprocess`: its result.
        """
        outputs = self.outputs(images)
        if self.postprocess is None:
            return outputs
        if callable(self.postprocess):
            return self.postprocess(outputs)
        if self.task != "classification":
            return outputs
        if outputs.ndim != 2 or outputs.shape[1] < 2:
            raise ExportError(f"{self.source} is served as a classifier, but its output has shape {outputs.shape}, "
                              "not (N, classes >= 2); use task='regression' or postprocess=None for raw outputs")
        shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probabilities = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
        return Prediction(labels=probabilities.argmax(axis=1).astype(np.int64), probabilities=probabilities)


# -- §8 one measured map ------------------------------------------------------------------------------------


MAP_PATHS = ("fp32", "bf16", "torch.ao int8 (legacy)", "torchao int8 weight-only", "torchao int8 dynamic",
             "torchao int8 compiled", "PT2E int8 static", "QAT int8 (torchao)", "pruned 50% + int8",
             "neurons -50% + int8", "ORT fp32", "ORT int8 dynamic", "ORT int8 static", "neurons removed + ORT int8")
MAP_BATCHES = (1, 256)  # one request, and a batch where matrix kernels dominate
MAP_PRUNE_AMOUNT = 0.5  # weights zeroed (global, unstructured) or hidden neurons removed, before int8
MAP_NEURON_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)  # "neurons removed + ORT int8" tries these, on validation data
MAP_VAL_TOLERANCE = 0.005  # ... and keeps the largest within 0.5 points of fp32's validation accuracy
MAP_EVAL_BATCH = 256    # accuracy is computed in batches of this size, the last one padded (one compiled shape)


@dataclass(frozen=True)
class MapEntry:
    """One deployment path of one model: gzip size, accuracy per seed, latency and speed-up over fp32 (Lesson 07, §8)."""
    model: str
    path: str
    gzip_bytes: int                # the first seed's saved artifact (state_dict or .onnx file) after gzip -6: like with like
    accuracies: tuple[float, ...]  # test accuracy, one per seed
    latency_ms: dict[int, float]   # batch -> median ms, the first seed's model
    speedup: dict[int, float]      # batch -> fp32 (eager PyTorch) ms / this ms, timed in turns in one run
    detail: str = ""               # how the path was chosen, when it was (map_table prints it under the table)

    @property
    def accuracy(self) -> float:
        """Mean test accuracy over the seeds."""
        return float(np.mean(self.accuracies))

    @property
    def spread(self) -> float:
        """Highest minus lowest test accuracy over the seeds."""
        return float(np.max(self.accuracies) - np.min(self.accuracies))


def deployment_map(name: str, build: Callable[[], nn.Module], loaders, *, epochs: int, folder: str | os.PathLike,
                   seeds: Sequence[int] = (0, 1, 2), paths: Sequence[str] = MAP_PATHS,
                   calibration_size: int = CALIBRATION_SIZE, qat_epochs: int = 1,
                   neuron_layers: tuple[str, str] = ("fc1", "fc2"), repeats: int | None = None,
                   budget_s: float = 0.05) -> list[MapEntry]:
    """Measure every deployment path of one model on the CPU: size, accuracy over seeds, latency (Lesson 07, §8).

    Per seed, `build()` is trained for `epochs` on `loaders.train` (validated on `loaders.val`), then
    turned into each of `paths` (MAP_PATHS) and scored once on `loaders.test`. Static int8 calibrates on
    `calibration_size` training images; QAT fine-tunes `qat_epochs` more epochs; "neurons -50%" removes
    half of `neuron_layers[0]`'s neurons. The first seed's variants are timed at MAP_BATCHES in
    alternating blocks with fp32: `repeats` calls each, or as many as fit `budget_s` per path (5 at
    least). The compiled path sees two shapes: batch 1 and MAP_EVAL_BATCH (accuracy on padded batches).
    "neurons removed + ORT int8" removes, per seed, the largest fraction of `neuron_layers[0]`'s neurons in
    MAP_NEURON_FRACTIONS whose float model stays within MAP_VAL_TOLERANCE of fp32's accuracy on
    `loaders.val` (none: nothing removed), then writes ONNX Runtime dynamic int8 (quantize_onnx); the
    fractions chosen are in its `detail`. Test data is used only to score.
    Files go below `folder`. "fp32" must be in `paths`; any single-input classifier works.
    """
    check_positive_int(epochs, "epochs")
    check_positive_int(qat_epochs, "qat_epochs")
    paths = list(paths)
    unknown = [p for p in paths if p not in MAP_PATHS]
    if unknown or "fp32" not in paths or not seeds:
        raise InvalidArgumentError(f"paths must include 'fp32' and come from {MAP_PATHS}, with at least one seed; "
                                   f"got paths {paths} (unknown: {unknown}) and seeds {list(seeds)}")
    folder = check_path(folder, "folder")
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"folder {str(folder)!r} is a file; deployment_map writes its models into a folder")
    test_images, test_labels = _collect(loaders.test, "loaders.test")
    train_images, _ = _collect(loaders.train, "loaders.train")
    validation = _collect(loaders.val, "loaders.val") if "neurons removed + ORT int8" in paths else None
    chosen: list[float] = []
    accuracies: dict[str, list[float]] = {p: [] for p in paths}
    sizes: dict[str, int] = {}
    times: dict[int, dict[str, float]] = {}
    for index, seed in enumerate(seeds):
        check_int(seed, "seed", low=0)
        torch.manual_seed(seed)
        model = build()
        fit(model, loaders.train, loaders.val, epochs=epochs, progress=False)
        model = cpu_eval_copy(model)
        calibration = calibration_images(train_images, min(calibration_size, len(train_images)), seed=seed)
        if validation is not None:
            chosen.append(_neuron_fraction(model, neuron_layers, *validation))
        variants = _map_variants(model, paths, folder / f"{name}-seed{seed}", test_images[:2], calibration,
                                 loaders, qat_epochs, neuron_layers, chosen[-1] if chosen else 0.0)
        for label, (engine, size) in variants.items():
            predicted = _map_logits(engine, test_images, pad=label == "torchao int8 compiled").argmax(axis=1)
            accuracies[label].append(float(np.mean(predicted == test_labels.numpy())))
            sizes.setdefault(label, size)
        if index == 0:
            for batch in MAP_BATCHES:
                images = torch.rand(batch, *test_images.shape[1:], generator=torch.Generator().manual_seed(batch))
                runners = [_map_runner(engine, images) for engine, _ in variants.values()]
                times[batch] = dict(zip(variants, median_latencies(runners, repeats=repeats, warmup=1,
                                                                   budget_s=budget_s * len(runners))))
    return [MapEntry(model=name, path=p, gzip_bytes=sizes[p], accuracies=tuple(accuracies[p]),
                     latency_ms={b: 1e3 * times[b][p] for b in MAP_BATCHES},
                     speedup={b: times[b]["fp32"] / times[b][p] for b in MAP_BATCHES},
                     detail=_neuron_detail(neuron_layers[0], chosen) if p == "neurons removed + ORT int8" else "")
            for p in paths]


def map_table(entries: Sequence[MapEntry]) -> str:
    """The map as text: gzip size and times smaller, accuracy mean ± spread and change, ms and speed-up (Lesson 07, §8).

    Ratios are against each model's fp32 row; accuracy change in points, mean over the seeds.
    """
    base = {e.model: e for e in entries if e.path == "fp32"}
    head = (f"{'model':6}{'path':26}{'gzip KiB':>9}{'smaller':>9}{'accuracy':>9}{'± spread':>9}{'Δ pts':>7}"
            + "".join(f"{f'ms@{b}':>9}{f'faster@{b}':>11}" for b in MAP_BATCHES))
    lines = [head, "-" * len(head)]
    for e in entries:
        fp32 = base[e.model]
        line = (f"{e.model:6}{e.path:26}{e.gzip_bytes / 1024:>9.1f}{fp32.gzip_bytes / e.gzip_bytes:>8.2f}x"
                f"{e.accuracy:>9.3f}{e.spread:>9.3f}{100 * (e.accuracy - fp32.accuracy):>+7.1f}")
        lines.append(line + "".join(f"{e.latency_ms[b]:>9.3f}{e.speedup[b]:>10.2f}x" for b in MAP_BATCHES))
    lines += [f"{e.model} {e.path}: {e.detail}" for e in entries if e.detail]
    return "\n".join(lines)


def plot_map(entries: Sequence[MapEntry], axes=None, *, batch: int = 256):
    """One panel per model: times smaller than fp32 (gzip) against speed-up over fp32 at `batch` (Lesson 07, §8).

    Colour shows the accuracy change in points (mean over seeds); returns the axes.
    """
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(e.model for e in entries))
    if axes is None:
        axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)[1][0]
    for ax, model in zip(axes, models):
        rows = [e for e in entries if e.model == model]
        fp32 = next(e for e in rows if e.path == "fp32")
        x = [fp32.gzip_bytes / e.gzip_bytes for e in rows]
        y = [e.speedup[batch] for e in rows]
        drop = [100 * (e.accuracy - fp32.accuracy) for e in rows]
        dots = ax.scatter(x, y, c=drop, cmap="RdYlGn", vmin=-3, vmax=3, s=45, edgecolors="black", linewidths=0.5)
        for e, xi, yi in zip(rows, x, y):
            ax.annotate(e.path, (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set(xscale="log", yscale="log", title=model, xlabel="times smaller than fp32 (gzip against gzip)",
               ylabel=f"speed-up over fp32 at batch {batch}")
    plt.colorbar(dots, ax=list(axes), label="accuracy change (points)")
    return axes


def _collect(loader, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (inputs, labels) of a loader, concatenated on the CPU."""
    inputs, labels = [], []
    for batch in loader:
        inputs.append(batch[0].cpu())
        labels.append(batch[1].cpu())
    if not inputs:
        raise InvalidArgumentError(f"{what} yields no batches")
    return torch.cat(inputs), torch.cat(labels)


def _neuron_fraction(model: nn.Module, layers: tuple[str, str], images: torch.Tensor, labels: torch.Tensor) -> float:
    """The largest of MAP_NEURON_FRACTIONS of `layers[0]`'s neurons that can go within MAP_VAL_TOLERANCE on validation; 0 if none."""
    def accuracy(m):
        return float((predict_logits(m, images).argmax(dim=1) == labels).float().mean())
    floor = accuracy(model) - MAP_VAL_TOLERANCE
    for fraction in sorted(MAP_NEURON_FRACTIONS, reverse=True):
        if accuracy(_without_neurons(model, layers, fraction)) >= floor:
            return fraction
    return 0.0


def _without_neurons(model: nn.Module, layers: tuple[str, str], fraction: float) -> nn.Module:
    """A copy of `model` with `fraction` of `layers[0]`'s neurons (smallest L2 norm) removed (Lesson 06, §3)."""
    return drop_pruned_neurons(prune_neurons(copy_model(model), layers[0], fraction), *layers)


def _neuron_detail(layer: str, fractions: Sequence[float]) -> str:
    return (f"{', '.join(f'{f:.0%}' for f in fractions)} of {layer}'s neurons removed per seed (the most within "
            f"{100 * MAP_VAL_TOLERANCE:g} points of fp32 on validation data)")


def _map_variants(model, paths, folder: Path, example, calibration, loaders, qat_epochs, neuron_layers,
                  neuron_fraction: float = 0.0) -> dict:
    """label -> (module or ONNX Runtime session, gzip bytes of its saved form), for each path asked for."""
    folder.mkdir(parents=True, exist_ok=True)
    makers = {
        "fp32": lambda: model,
        "bf16": lambda: cast(model, torch.bfloat16),
        "torch.ao int8 (legacy)": lambda: _legacy_int8(model),
        "torchao int8 weight-only": lambda: quantize_int8(model, "weight_only"),
        "torchao int8 dynamic": lambda: quantize_int8(model, "dynamic"),
        "torchao int8 compiled": lambda: quantize_int8(model, "dynamic", compiled=True),
        "PT2E int8 static": lambda: quantize_pt2e(model, calibration),
        "QAT int8 (torchao)": lambda: _qat_int8(model, loaders, qat_epochs),
        "pruned 50% + int8": lambda: quantize_int8(prune_global(copy_model(model), MAP_PRUNE_AMOUNT)),
        "neurons -50% + int8": lambda: quantize_int8(_without_neurons(model, neuron_layers, MAP_PRUNE_AMOUNT)),
    }
    variants = {}
    for label in paths:
        if label in makers:
            variant = makers[label]()
            variants[label] = (variant, saved_size(variant, folder / f"{len(variants):02d}.pt")[1])
    onnx_paths = {}
    if any(p.startswith("ORT") for p in paths):
        onnx_paths["ORT fp32"] = export_onnx(model, example, folder / "fp32.onnx")
    if "ORT int8 dynamic" in paths:
        onnx_paths["ORT int8 dynamic"] = quantize_onnx(onnx_paths["ORT fp32"], folder / "int8_dynamic.onnx")
    if "ORT int8 static" in paths:
        onnx_paths["ORT int8 static"] = quantize_onnx_static(onnx_paths["ORT fp32"], folder / "int8_static.onnx",
                                                             calibration)
    if "neurons removed + ORT int8" in paths:
        smaller = _without_neurons(model, neuron_layers, neuron_fraction) if neuron_fraction else model
        onnx_paths["neurons removed + ORT int8"] = quantize_onnx(export_onnx(smaller, example, folder / "neurons.onnx"),
                                                                 folder / "neurons_int8.onnx")
    for label, path in onnx_paths.items():
        if label in paths:
            variants[label] = (load_session(path), len(gzip.compress(path.read_bytes(), compresslevel=GZIP_LEVEL, mtime=0)))
    return {label: variants[label] for label in paths}


def _legacy_int8(model: nn.Module) -> nn.Module:
    """The map's one legacy column: torch.ao.quantization.quantize_dynamic (deprecated; it warns) on the Linear layers."""
    return torch.ao.quantization.quantize_dynamic(copy_model(model).eval(), {nn.Linear}, dtype=torch.qint8)


def _qat_int8(model: nn.Module, loaders, epochs: int) -> nn.Module:
    """Lesson 06's QAT: int8 fake quantization for `epochs` more epochs of training, then int8."""
    trained = prepare_qat(model)
    fit(trained, loaders.train, loaders.val, epochs=epochs, progress=False, device="cpu")
    return convert_qat(trained)


def _map_logits(engine, images: torch.Tensor, *, pad: bool) -> np.ndarray:
    """Logits of a module or session in MAP_EVAL_BATCH batches; `pad`: the last one padded (compiled: one shape)."""
    parts = []
    for chunk in images.split(MAP_EVAL_BATCH):
        padded = torch.cat([chunk, chunk.new_zeros(MAP_EVAL_BATCH - len(chunk), *chunk.shape[1:])]) if pad else chunk
        parts.append(_map_runner(engine, padded)()[: len(chunk)])
    return np.concatenate(parts)


def _map_runner(engine, images: torch.Tensor) -> Callable[[], np.ndarray]:
    if isinstance(engine, ort.InferenceSession):
        array = images.numpy()
        return lambda: run_onnx(engine, array)

    def run():
        with torch.inference_mode():
            return engine(images).float().numpy()
    return run


# -- argument checks ----------------------------------------------------------------------------------------


def cpu_eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of `model`; the model itself is not changed (Lesson 07, §2-§4).

    Uses Lesson 06's copy, which also copes with a pruned model that has taken a training step.
    """
    return copy_model(model).cpu().eval()


_CASTS = {"float32": ("float()", "np.float32"), "float64": ("double()", "np.float64"),
          "int64": ("long()", "np.int64"), "int32": ("int()", "np.int32")}
_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _onnx_dtype(type_name: str):
    if type_name not in _ONNX_DTYPES:
        raise ExportError(f"the ONNX graph's input has type {type_name}, which mvtk does not feed")
    return _ONNX_DTYPES[type_name]


def _settings(task: str | None, value_range) -> dict[str, str]:
    """The Predictor settings recorded in the ONNX metadata."""
    return {TASK_KEY: task or "", VALUE_RANGE_KEY: json.dumps(None if value_range is None else list(value_range))}


def _input_shape(model: nn.Module, input_shape, course: bool) -> tuple[int, ...]:
    """One sample's shape: given, or a course model's (sample_shape); any other model must say."""
    if input_shape is not None:
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
            raise InvalidArgumentError(f"input_shape must be one sample's shape, positive ints, got {input_shape!r}")
        return tuple(input_shape)
    if not course:
        raise InvalidArgumentError(f"cannot tell the input of {type(model).__name__} (not a course model); pass "
                                   "example= (a batch like the ones it will serve: shape and dtype) or input_shape=")
    return sample_shape(model)


def _cache_problem(path: Path, weights_sha256: str) -> str | None:
    """Why the cached ONNX file at `path` cannot be served for these weights, or None when it can."""
    if not path.is_file():
        return "not in the cache"
    try:
        if not verify_manifest(path):
            return f"no {manifest_path(path).name} to verify it against"
        props = {p.key: p.value for p in _load_graph_only(path).metadata_props}
    except (IntegrityError, ExportError) as exc:
        return str(exc)
    if props.get(SOURCE_KEY) != weights_sha256:
        return f"it was exported from other weights ({props.get(SOURCE_KEY, 'unrecorded')[:12]}...)"
    return None


def _is_range(value) -> bool:
    try:
        low, high = value
    except (TypeError, ValueError):
        return False
    numbers = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in (low, high))
    return numbers and bool(low < high)


def _check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor batch such as torch.rand(2, 1, 8, 8), "
                                   f"got {type(value).__name__}")
    if value.dim() < 1 or value.shape[0] < 1:
        raise InvalidArgumentError(f"{name} must be a non-empty batch with the batch dimension first, "
                                   f"got shape {tuple(value.shape)}")
    return value


def _check_calibration(calibration, source: str, shape: Sequence | None = None) -> np.ndarray:
    """`calibration` as an array if it is a non-empty batch of finite values (shaped like `shape`, batch first)."""
    array = _to_numpy(calibration, "calibration")
    if (array.ndim == 0 or len(array) == 0
            or shape is not None and (array.ndim != len(shape) or tuple(array.shape[1:]) != tuple(shape[1:]))):
        like = f" shaped like {source} {tuple(shape)}" if shape is not None else ""
        raise InvalidArgumentError(f"calibration must be a non-empty batch{like}, got shape {tuple(array.shape)}")
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise InvalidArgumentError(f"calibration for {source} must hold finite values; it holds {bad} NaN/inf, "
                                   "which would make every activation scale NaN")
    return array


def _check_float_onnx(src: Path, dst: Path) -> None:
    """Refuse `dst` naming the same file as `src`, and a `src` that already holds quantization nodes."""
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise InvalidArgumentError(f"dst {str(dst)!r} is the source model {str(src)!r}: the int8 copy would overwrite "
                                   "the float model; write it to another file")
    quantized = sorted(op for op in describe_onnx(src).operators
                       if op in ("QuantizeLinear", "DynamicQuantizeLinear") or op.startswith("QLinear")
                       or op.endswith("Integer"))
    if quantized:
        raise InvalidArgumentError(f"{src.name} is already quantized (it holds {', '.join(quantized)} nodes); "
                                   "quantize the float model")


def _check_onnx_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix != ".onnx":
        raise InvalidArgumentError(f"path must be a file path ending in .onnx, got {path!r}")
    return Path(path)




def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _to_numpy(images, name: str, error: type[Exception] = InvalidArgumentError) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.layout != torch.strided:
            raise error(f"{name} must be a dense tensor, got layout {images.layout}; convert with images.to_dense()")
        if images.device.type == "meta":
            raise error(f"{name} is a meta tensor: it has a shape but no values; pass a tensor with data")
        if images.is_quantized or images.is_complex():
            raise error(f"{name} must hold real float32 values, got dtype {images.dtype}; convert with images.float()")
        try:
            return images.detach().cpu().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as exc:  # bfloat16, float8: dtypes numpy has no type for
            raise error(f"{name} has dtype {images.dtype}, which numpy cannot hold; convert with images.float() "
                        f"({_first_line(exc)[:80]})") from None
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biuf":
            raise error(f"{name} must hold real numbers (float32), got a numpy array of dtype {images.dtype}")
        return images
    raise error(f"{name} must be a torch.Tensor or numpy array, got {type(images).__name__}")
