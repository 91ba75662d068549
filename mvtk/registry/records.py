"""What the registry records, and the rules it records by (Lesson 04, §2-§3).

The bottom of `mvtk.registry`: the records a reader gets back (`ModelVersion`, `AliasEvent`,
`CheckReport`), the rules for names, aliases, version numbers and checksums, and
`new_version_row`, which checks a registration's arguments and turns them into the safetensors
bytes for the blob store and one index row. Nothing here touches the disk.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

import mvtk
from mvtk.checkpoint import check_plain_tensors, check_state_dict_fits, export_program
from mvtk.env import git_commit, utc_now
from mvtk.errors import InvalidArgumentError, RegistryError, check_int
from mvtk.files import sha256_bytes
from mvtk.models import MODELS, build_model, unwrap
from mvtk.registry.recipe import capture_recipe, class_path, module_tree, recipe_label

__all__ = [
    "ModelVersion", "AliasEvent", "CheckReport", "ImportResult", "REBUILD_FIELDS",
    "NAME_PATTERN", "ALIAS_PATTERN", "SHA256_PATTERN",
    "check_name", "check_alias", "check_version_number", "is_sha256", "architecture_label", "shown",
    "MAX_VERSION", "STATEMENT_PREFIX", "version_statement", "new_version_row", "infer_architecture", "weights_and_architecture", "version_from_row", "row_from_version", "event_from_row", "model_label",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no '@' or '/': `name@alias` stays readable
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")      # starts with a letter: never mistaken for a version
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")  # a SHA-256 as hexdigest() writes it: blob names, data fingerprints
MAX_VERSION = 2**63 - 1       # SQLite's largest INTEGER: a larger number can never name a version
STATEMENT_PREFIX = b"mvtk-registry-version/1\n"  # what a version's signature signs: this + version_statement's JSON
JSON_COLUMNS = ("architecture", "metrics", "params", "tags", "tensor_keys", "init_args", "modules")  # JSON text
REBUILD_FIELDS = ("class_path", "init_args", "modules", "program_sha256")  # added later: signed only when set


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its weights' SHA-256 and everything needed to reproduce it (Lesson 04, §2)."""
    name: str
    version: int
    sha256: str                       # of the safetensors bytes in the blob store
    architecture: dict | None         # {"name": "mlp", "kwargs": {...}} for mvtk.models.build_model
    metrics: dict
    params: dict
    tags: dict
    notes: str
    parent: int | None                # the version this one was fine-tuned from
    created: str                      # ISO 8601, UTC
    git_commit: str | None            # HEAD of the git working tree it was registered from
    torch_version: str
    mvtk_version: str
    data_fingerprint: str | None      # mvtk.data.fingerprint of the training data
    tensor_keys: tuple[str, ...] = field(default=(), repr=False)
    signature: str | None = field(default=None, repr=False)  # Ed25519 over version_statement(); None: unsigned
    class_path: str | None = field(default=None, repr=False)   # 'package.module:QualName' of the model's class
    init_args: dict | None = field(default=None, repr=False)   # its constructor's keyword arguments
    modules: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)  # (name, type, extra_repr) per layer
    program_sha256: str | None = field(default=None, repr=False)  # a torch.export program (.pt2) in the blob store

    @property
    def ref(self) -> str:
        """A short label such as 'digits v3'."""
        return f"{self.name} v{self.version}"

    def describe(self) -> str:
        """Every field on its own line, as `python -m mvtk.registry show` prints it (Lesson 04, §2)."""
        lines = [f"{self.ref}"]
        for key in ("sha256", "architecture", "metrics", "params", "tags", "notes", "parent", "created",
                    "git_commit", "torch_version", "mvtk_version", "data_fingerprint", "class_path", "init_args",
                    "program_sha256", "signature"):
            value = getattr(self, key)
            shown = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
            lines.append(f"  {key}: {'-' if shown is None else shown}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias: set, promote, rollback or remove, with the version before and after (Lesson 04, §3)."""
    seq: int
    name: str
    alias: str
    action: str
    version: int | None
    previous: int | None
    at: str


@dataclass(frozen=True)
class ImportResult:
    """What `Registry.import_versions` did: each source version's new number, and the aliases it set (Lesson 04, §7).

    `versions` maps name -> {number in the export: number here}; a name the registry already had gets
    numbers after its own (numbers only count up), a new name keeps the exported numbers.
    `aliases` maps name -> {alias: number here} for the aliases imported with their history;
    `skipped_aliases` names the aliases left alone because the name already existed here.
    """
    versions: dict[str, dict[int, int]]
    aliases: dict[str, dict[str, int]]
    skipped_aliases: dict[str, tuple[str, ...]]

    def __str__(self) -> str:
        lines = [f"{name} v{old} -> {name} v{new}" for name, moved in self.versions.items() for old, new in moved.items()]
        lines += [f"{name}@{alias} -> v{v}" for name, aliases in self.aliases.items() for alias, v in aliases.items()]
        lines += [f"{name}: aliases not imported (the name existed here): {', '.join(skipped)}"
                  for name, skipped in self.skipped_aliases.items() if skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckReport:
    """What `Registry.check` found: versions whose blob is missing or corrupt, and leftovers (Lesson 04, §6).

    With a verify key, also the versions that are unsigned or whose signature does not verify.
    """
    versions: int
    missing: tuple[str, ...]          # versions whose blob file is gone
    corrupt: tuple[str, ...]          # versions whose blob no longer matches its SHA-256
    orphans: tuple[str, ...]          # blobs no version uses (an interrupted register or delete); harmless
    temp_files: tuple[str, ...]       # half-written files a killed writer left; harmless
    unsigned: tuple[str, ...] = ()    # versions without a signature (listed only when a verify key is given)
    bad_signature: tuple[str, ...] = ()  # versions whose record changed after signing, or another key signed it

    @property
    def ok(self) -> bool:
        """True when every version's weights are present and match their checksum (and signature, if checked)."""
        return not (self.missing or self.corrupt or self.unsigned or self.bad_signature)


# -- the rules --------------------------------------------------------------------------------------------------


def check_name(name, what: str = "model name") -> str:
    """Return `name` if it is a valid model name, else raise InvalidArgumentError naming `what` (Lesson 04, §2).

    A name never becomes part of a file path (blobs are named by their SHA-256), but the rule keeps
    names readable in `name@alias` and on the command line: no '/', '..', NUL, newline or '@'.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(f"{what} must be a str of 1-128 ASCII letters, digits, '.', '_' or '-' starting "
                                   f"with a letter or digit (no '@' or '/'), got {shown(name)}")
    return name


def check_alias(alias, what: str = "alias") -> str:
    """Return `alias` if it is a valid alias such as 'production', else raise InvalidArgumentError (Lesson 04, §3)."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgumentError(f"{what} must be a str that starts with a letter and holds only letters, digits, "
                                   f"'_' or '-', 1 to 64 characters (e.g. 'production'), got {shown(alias)}")
    return alias


def check_version_number(version, what: str) -> int:
    """Return `version` if it is an int in [1, 2**63 - 1], else raise InvalidArgumentError naming `what` (Lesson 04, §2)."""
    if isinstance(version, str):  # "3" is not a version number: say so without echoing a 10 kB str
        raise InvalidArgumentError(f"{what} must be a version number (an int) in [1, {MAX_VERSION}], "
                                   f"got the str {shown(version)}")
    return check_int(version, what, low=1, high=MAX_VERSION, what="a version number (an int)")


def shown(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters with its length noted, for error messages (Lesson 04, §2)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value) if isinstance(value, (str, bytes)) else len(text)} characters)"


def version_statement(mv: "ModelVersion") -> bytes:
    """What a version's signature signs: every field recorded at registration, as canonical JSON (Lesson 04, §6).

    Name, number, the weights' SHA-256, tensor order, architecture, metrics, params and the rest:
    whoever edits any of them in the index (or swaps the weights and their SHA-256) breaks the signature.
    """
    fields = {key: getattr(mv, key) for key in ModelVersion.__dataclass_fields__ if key != "signature"}
    for key in REBUILD_FIELDS:  # absent from versions registered before mvtk recorded them: their signatures hold
        if fields[key] in (None, ()):
            del fields[key]
    return STATEMENT_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def is_sha256(value) -> bool:
    """True when `value` is a str of 64 lowercase hex digits, as hashlib's hexdigest() writes a SHA-256 (Lesson 04, §2)."""
    return isinstance(value, str) and SHA256_PATTERN.fullmatch(value) is not None


def architecture_label(architecture: dict | None) -> str:
    """{'name': 'mlp', 'kwargs': {'hidden': 16}} -> 'mlp(hidden=16)'; None -> 'unknown' (Lesson 04, §4)."""
    if architecture is None:
        return "unknown"
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(architecture.get("kwargs", {}).items()))
    return f"{architecture['name']}({kwargs})"


# -- a registration: checked arguments -> index row + blob bytes -------------------------------------------------


def new_version_row(name: str, model_or_state_dict, *, architecture: dict | None, metrics: dict | None,
                    params: dict | None, tags: dict | None, notes: str, parent: int | None, dataset,
                    init_args: dict | None = None, program_example: tuple | None = None
                    ) -> tuple[dict, bytes, bytes | None]:
    """Check a registration's arguments; return its index row (all but the version), weights and program (Lesson 04, §2).

    The row records the weights' SHA-256, the git commit, torch and mvtk versions, the time, the
    data's fingerprint, and how to rebuild the model: class path, constructor arguments and module
    tree (see mvtk.registry.recipe), plus the SHA-256 of a torch.export program when
    `program_example` (a tuple of example inputs) is given; those bytes come back third (else None).
    """
    check_name(name)
    check_plain_tensors(model_or_state_dict, "the registry", "register the float model and quantize_int8 it "
                        "after loading (load_model), or keep the int8 model in a checkpoint (save_checkpoint)")
    if program_example is not None and not isinstance(model_or_state_dict, nn.Module):
        raise InvalidArgumentError("program_example needs the model itself (an nn.Module) to export, "
                                   "not a state_dict")
    state, architecture, recipe = weights_and_architecture(model_or_state_dict, architecture, init_args,
                                                           program=program_example is not None)
    if not isinstance(notes, str):
        raise InvalidArgumentError(f"notes must be a str, got {type(notes).__name__}")
    if parent is not None:
        check_version_number(parent, "parent")
    program = None
    if program_example is not None:
        if isinstance(program_example, torch.Tensor):
            program_example = (program_example,)
        program = export_program(_plain(model_or_state_dict), program_example)
    data = safetensors_save(state)
    path, kwargs, modules = recipe
    row = {"name": name, "sha256": sha256_bytes(data), "tensor_keys": json.dumps(list(state)),
           "architecture": None if architecture is None else _to_json(architecture, "architecture"),
           "metrics": _to_json(_check_metrics(metrics), "metrics"), "params": _to_json(params or {}, "params"),
           "tags": _to_json(tags or {}, "tags"), "notes": notes, "parent": parent, "created": utc_now(),
           "git_commit": git_commit(), "torch_version": torch.__version__, "mvtk_version": mvtk.__version__,
           "data_fingerprint": _data_fingerprint(dataset), "class_path": path,
           "init_args": None if kwargs is None else json.dumps(kwargs, sort_keys=True),
           "modules": json.dumps([list(m) for m in modules]) if modules else None,
           "program_sha256": None if program is None else sha256_bytes(program)}
    return row, data, program


def infer_architecture(model: nn.Module) -> dict | None:
    """The build_model recipe {"name", "kwargs"} of a course model; None for any other model (Lesson 04, §2).

    The kwargs are the ones the model was built with (mvtk.models.remember_init_args keeps them).
    """
    names = [key for key, cls in MODELS.items() if cls is type(model)]
    kwargs = model.__dict__.get("init_args")
    if not names or not isinstance(kwargs, Mapping):
        return None
    return {"name": names[0], "kwargs": json.loads(json.dumps(dict(kwargs)))}


def weights_and_architecture(obj, architecture: dict | None, init_args: dict | None = None, *, program: bool = False
                             ) -> tuple[dict[str, torch.Tensor], dict | None, tuple]:
    """A CPU copy of the state_dict of a model (unwrapped) or a state_dict, its checked recipe (Lesson 04, §2).

    Returns (weights, course architecture or None, (class path, init args, module tree)). For a
    model, the class path and init args come from mvtk.registry.recipe.capture_recipe; when they
    cannot be found and no program is stored either, a RegistryError says what to pass. A state_dict
    records no class: only `architecture` (a course model's recipe) can rebuild it.
    """
    recipe: tuple = (None, None, ())
    if isinstance(obj, nn.Module):
        obj = _plain(obj)
        if architecture is None and init_args is None:
            architecture = infer_architecture(obj)
        if architecture is not None and init_args is None:  # a course model: build_model rebuilds it, checked below
            course = isinstance(architecture, dict) and MODELS.get(architecture.get("name")) is type(obj)
            path, kwargs = class_path(type(obj)), architecture.get("kwargs", {}) if course else None
        else:
            try:
                path, kwargs = capture_recipe(obj, init_args)
            except RegistryError:
                if not program:
                    raise
                path, kwargs = class_path(type(obj)), None  # the stored program rebuilds it
        recipe = (path, kwargs, module_tree(obj))
        obj = obj.state_dict()
    elif init_args is not None:
        raise InvalidArgumentError("init_args needs the model (an nn.Module) to know its class; "
                                   "register the model itself, or pass architecture= for a course model")
    if not isinstance(obj, Mapping):
        raise InvalidArgumentError(f"expected an nn.Module or a state_dict (a mapping of names to tensors), "
                                   f"got {type(obj).__name__}")
    if not obj:
        raise InvalidArgumentError("the state_dict is empty: there are no weights to register")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"state_dict entry {key!r} is a {type(value).__name__}, expected a tensor "
                                       "under a str key; pass model.state_dict(), not a whole checkpoint")
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in obj.items()}
    if architecture is not None:
        built = _check_architecture(architecture, state)
        if not recipe[2]:  # a state_dict: its layers are the course model's
            recipe = (None, None, module_tree(built))
    return state, architecture, recipe


def model_label(mv: "ModelVersion") -> str:
    """What a version's model is, for a diff's heading: 'mlp(hidden=16)', 'Net(p=0.1)', or 'unknown' (Lesson 04, §4)."""
    if mv.architecture is not None:
        return architecture_label(mv.architecture)
    return recipe_label(mv.class_path, mv.init_args) or "unknown"


# -- index rows -> records ------------------------------------------------------------------------------------------


def version_from_row(row) -> ModelVersion:
    """The ModelVersion of one index row (a mapping of column -> value) (Lesson 04, §2)."""
    row = dict(row)
    for key in JSON_COLUMNS:
        row[key] = None if row.get(key) is None else json.loads(row[key])
    modules = tuple(tuple(m) for m in row.get("modules") or ())
    return ModelVersion(**{**row, "tensor_keys": tuple(row["tensor_keys"]), "modules": modules})


def row_from_version(mv: ModelVersion) -> dict:
    """The index row of a record, JSON columns as text: version_from_row's inverse (Lesson 04, §7)."""
    row = {key: getattr(mv, key) for key in ModelVersion.__dataclass_fields__}
    for key in JSON_COLUMNS:
        row[key] = None if row[key] is None else json.dumps(row[key], sort_keys=True)
    row["tensor_keys"] = json.dumps(list(mv.tensor_keys))
    row["modules"] = json.dumps([list(m) for m in mv.modules]) if mv.modules else None
    return row


def event_from_row(row) -> AliasEvent:
    """The AliasEvent of one row of the alias history (Lesson 04, §3)."""
    return AliasEvent(**dict(row))


# -- helpers ------------------------------------------------------------------------------------------------------


def _check_architecture(architecture: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    if (not isinstance(architecture, dict) or architecture.get("name") not in MODELS
            or not isinstance(architecture.get("kwargs", {}), dict) or set(architecture) - {"name", "kwargs"}):
        raise InvalidArgumentError(f"architecture must be {{'name': one of {sorted(MODELS)}, 'kwargs': {{...}}}} "
                                   f"as accepted by mvtk.models.build_model, got {architecture!r}")
    try:
        model = build_model(architecture["name"], **architecture.get("kwargs", {}))
    except TypeError as exc:  # a keyword the model's constructor does not take
        raise InvalidArgumentError(f"architecture {architecture!r} cannot be built: {exc}") from None
    check_state_dict_fits(model, state, f"the weights given for architecture {architecture_label(architecture)}")
    return model


def _plain(model: nn.Module) -> nn.Module:
    """The model itself, out of a DataParallel/DDP wrapper (no 'module.' prefix, Lesson 05) or torch.compile's."""
    model = unwrap(model)
    return getattr(model, "_orig_mod", model)


def _check_metrics(metrics: dict | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise InvalidArgumentError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    clean = {}
    for key, value in metrics.items():
        try:
            number = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        if not isinstance(key, str) or not math.isfinite(number):
            raise InvalidArgumentError(f"metric {key!r} must map a str to a finite number, got {value!r}")
        clean[key] = value if isinstance(value, int) else number
    return clean


def _data_fingerprint(dataset) -> str | None:
    if dataset is None or is_sha256(dataset):
        return dataset
    from mvtk.data import ImageDataset, fingerprint  # here, not at the top: torchvision adds seconds at start

    if not isinstance(dataset, ImageDataset):
        shown = repr(dataset) if isinstance(dataset, str) else type(dataset).__name__
        raise InvalidArgumentError(f"dataset must be an mvtk ImageDataset or its fingerprint (a str of 64 lowercase "
                                   f"hex digits, as mvtk.data.fingerprint returns), got {shown}")
    return fingerprint(dataset)


def _to_json(value, what: str) -> str:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidArgumentError(f"{what} must be a dict with str keys, got {value!r}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} must hold only JSON values (str, number, bool, None, list, dict): "
                                   f"{exc}") from None
