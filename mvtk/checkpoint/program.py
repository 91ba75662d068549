"""torch.export programs as bytes: capture one, refuse an archive that would run code, load it safely (Lesson 03, §5).

A `.pt2` archive (torch.export.save) holds a graph and its weights; loading it needs no Python
class, which is why the registry (Lesson 04) can keep one beside a version's weights, and Lesson 07
saves them as files. Loading one is not like loading safetensors: torch.export.load unpickles some
entries and can run native code, so `load_program` scans the bytes with `check_pt2_archive` first.
The lowest home of this scan: `mvtk.export` (Lesson 07, §6) re-exports it.
"""
from __future__ import annotations

import io
import json
import posixpath
import warnings
import zipfile

import torch
from torch import nn

from mvtk.errors import ExportError, InvalidArgumentError, check_bytes, check_module
from mvtk.models import copy_model

__all__ = ["BATCH_DIM", "PT2_TEXT_ENTRIES", "ExportedModule", "export_program", "check_pt2_archive", "load_program"]

BATCH_DIM = "batch"  # the name of the dynamic batch dimension, in torch.export and in ONNX graphs


def export_program(model: nn.Module, example: tuple, *, dynamic_batch: bool = True) -> bytes:
    """torch.export an eval-mode CPU copy of `model` on the inputs `example` (a tuple); the .pt2 bytes (Lesson 03, §5).

    The model itself is not changed. With `dynamic_batch`, the first dimension of every tensor input
    is the batch and may vary (a batch of 1 is repeated to 2 first, or torch would fix it to 1).
    ExportError names the model when torch.export cannot capture it.
    """
    check_module(model)
    if not isinstance(example, tuple) or not example or not all(isinstance(x, torch.Tensor) for x in example):
        raise InvalidArgumentError(f"example must be a non-empty tuple of input tensors, one per argument of "
                                   f"forward, e.g. (torch.rand(2, 4),), got {type(example).__name__}")
    example = tuple(x.detach().cpu() for x in example)
    if dynamic_batch:
        if any(x.dim() == 0 for x in example):
            raise InvalidArgumentError("a dynamic batch needs every example input to have a batch dimension first; "
                                       "pass dynamic_batch=False for scalar inputs")
        example = tuple(x.repeat(2, *[1] * (x.dim() - 1)) if x.shape[0] == 1 else x for x in example)
    batch = torch.export.Dim(BATCH_DIM)
    dynamic_shapes = tuple({0: batch} for _ in example) if dynamic_batch else None
    try:
        program = torch.export.export(copy_model(model).cpu().eval(), example, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise ExportError(f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}"
                          f"{': ' + lines[0] if lines else ''}") from exc
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


PT2_TEXT_ENTRIES = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")


def check_pt2_archive(data: bytes, name: str = "the .pt2 file") -> None:
    """Refuse a .pt2 archive in which torch.export.load could unpickle code; ExportError names the entry (Lesson 03, §5; Lesson 07, §6).

    torch 2.14's loader unpickles with weights_only=False, or runs native code, in these places:
    `_package._load_exported_programs` -> `serialize.deserialize_torch_artifact` for
    `data/sample_inputs/<model>.pt` (tries weights_only=True, then falls back to False);
    `_package._load_state_dict` / `_load_constants` for every weights/constants entry whose
    `*_config.json` says `"use_pickle": true` (torch.load weights_only=False), for constants named
    `custom_obj_*` (torch._C._pickle_load_obj) and `opaque_obj_*` (pickle.loads), and for the legacy
    `data/weights/<model>.pt` / `data/constants/<model>.pt` files (deserialize_torch_artifact);
    `load_pt2` loads AOTInductor shared libraries under `data/aotinductor/`; and `torch.export.load`
    falls back to torch 2.7's zip layout (serialized_*.json, deserialize_torch_artifact) when the
    archive holds no program. So, before torch sees the bytes: the archive must be one zip with
    every entry under one root folder, no duplicate names, no `..`, absolute or backslash names,
    an `archive_format` of "pt2" and no `data/aotinductor/` entry nor `custom_obj_`/`opaque_obj_`
    constant; every entry must be a known text entry (the version files, `models/*.json`, the
    `*_config.json` files, `extra/*`), raw tensor bytes that a config lists with use_pickle false,
    or load with torch.load(weights_only=True). What is not checked: the graph JSON itself, which
    can call any operator registered in this process; a .pt2 file is a program, not a sandbox.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ExportError(f"{name} is not a torch.export .pt2 archive (not a zip file: {exc})") from None
    names = [info.filename for info in infos]
    if not names:
        raise ExportError(f"{name} is an empty zip file, not a torch.export .pt2 archive")
    for entry in names:
        parts = entry.split("/")
        if entry.startswith("/") or "\\" in entry or ".." in parts or (len(entry) > 1 and entry[1] == ":"):
            raise ExportError(f"{name} refused: archive entry {entry!r} has an absolute or parent ('..') path")
    root = names[0].split("/")[0]
    relative = {}
    for info in infos:
        head, sep, rest = info.filename.partition("/")
        if head != root or not sep:
            raise ExportError(f"{name} refused: archive entry {info.filename!r} is outside the root folder {root!r}")
        if rest in relative:
            raise ExportError(f"{name} refused: archive entry {info.filename!r} appears twice")
        if not info.is_dir():
            relative[rest] = info

    def read(rest: str) -> bytes:
        try:
            return archive.read(relative[rest])
        except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
            raise ExportError(f"{name} refused: entry {root}/{rest} cannot be read ({exc})") from None

    if "archive_format" not in relative or read("archive_format") != b"pt2":
        raise ExportError(f"{name} refused: it has no {root}/archive_format entry saying 'pt2' (only the "
                          "torch.export.save layout of torch >= 2.8 is loaded)")
    raw = set()  # entries torch reads as raw tensor bytes, never unpickled
    for rest in relative:
        if rest.startswith("data/aotinductor/"):
            raise ExportError(f"{name} refused: entry {root}/{rest} is AOTInductor native code, which loading runs")
        folder = ("data/weights/" if rest.startswith("data/weights/") and rest.endswith("_weights_config.json")
                  else "data/constants/" if rest.startswith("data/constants/") and rest.endswith("_constants_config.json")
                  else None)
        if folder is None:
            continue
        try:
            config = json.loads(read(rest))["config"]
            payloads = [(fqn, meta["path_name"], bool(meta.get("use_pickle"))) for fqn, meta in config.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{name} refused: entry {root}/{rest} is not a payload config ({exc!r})") from None
        for fqn, path_name, use_pickle in payloads:
            if not isinstance(path_name, str) or posixpath.basename(path_name) != path_name or path_name in ("", ".", ".."):
                raise ExportError(f"{name} refused: {root}/{rest} points {fqn!r} at {path_name!r}, outside {folder}")
            if folder == "data/constants/" and path_name.startswith(("custom_obj_", "opaque_obj_")):
                raise ExportError(f"{name} refused: constant {fqn!r} ({root}/{folder}{path_name}) is a pickled "
                                  "Python object, which torch would unpickle without weights_only")
            if not use_pickle:
                raw.add(folder + path_name)
    for rest in relative:
        if (rest in PT2_TEXT_ENTRIES or rest in raw or rest.startswith("extra/")
                or rest.endswith(".json") and (rest.startswith("models/") or rest.endswith("_config.json"))):
            continue  # read as text or raw bytes: never unpickled
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(read(rest)), weights_only=True)
        except Exception as exc:
            raise ExportError(f"{name} refused: entry {root}/{rest} is not loadable with torch.load(weights_only=True) "
                              f"and torch.export.load would unpickle it ({type(exc).__name__})") from None



class ExportedModule(nn.Module):
    """A loaded torch.export program as an ordinary module: call it; train()/eval() are accepted (Lesson 03, §5).

    The program was captured in eval mode and keeps that behaviour (dropout off, BatchNorm's running
    statistics); `eval()` and `train()` only set the flag, where the bare program module would raise.
    """

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, *args):
        return self.program(*args)

    def train(self, mode: bool = True) -> "ExportedModule":
        """Set the training flag only: the program's behaviour was fixed when it was exported (Lesson 03, §5)."""
        self.training = bool(mode)
        return self


def load_program(data: bytes, name: str = "the .pt2 program") -> nn.Module:
    """The callable module of .pt2 bytes, after check_pt2_archive refused what would run code (Lesson 03, §5).

    Verify the bytes' checksum or signature before calling this: the scan stops planted pickles and
    native code, but the graph can call any operator registered in this process, so load programs
    only from people you trust. ExportError names `name` when the archive is refused or unreadable.
    """
    check_bytes(data, "data")
    check_pt2_archive(bytes(data), name)
    try:
        program = torch.export.load(io.BytesIO(bytes(data))).module()
    except Exception as exc:
        raise ExportError(f"{name} is not a loadable torch.export program: {type(exc).__name__}") from exc
    return ExportedModule(program)
