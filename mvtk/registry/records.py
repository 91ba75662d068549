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
from mvtk.checkpoint import check_state_dict_fits
from mvtk.env import git_commit, utc_now
from mvtk.errors import InvalidArgumentError, check_int
from mvtk.files import sha256_bytes
from mvtk.models import MLP, MODELS, MLPv2, SmallCNN, build_model, unwrap

__all__ = [
    "ModelVersion", "AliasEvent", "CheckReport",
    "NAME_PATTERN", "ALIAS_PATTERN", "SHA256_PATTERN",
    "check_name", "check_alias", "check_version_number", "is_sha256", "architecture_label", "shown",
    "MAX_VERSION", "STATEMENT_PREFIX", "version_statement", "new_version_row", "infer_architecture", "weights_and_architecture", "version_from_row", "event_from_row",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no '@' or '/': `name@alias` stays readable
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")      # starts with a letter: never mistaken for a version
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")  # a SHA-256 as hexdigest() writes it: blob names, data fingerprints
MAX_VERSION = 2**63 - 1       # SQLite's largest INTEGER: a larger number can never name a version
STATEMENT_PREFIX = b"mvtk-registry-version/1\n"  # what a version's signature signs: this + version_statement's JSON
JSON_COLUMNS = ("architecture", "metrics", "params", "tags", "tensor_keys")  # stored as JSON text in the index


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

    @property
    def ref(self) -> str:
        """A short label such as 'digits v3'."""
        return f"{self.name} v{self.version}"

    def describe(self) -> str:
        """Every field on its own line, as `python -m mvtk.registry show` prints it (Lesson 04, §2)."""
        lines = [f"{self.ref}"]
        for key in ("sha256", "architecture", "metrics", "params", "tags", "notes", "parent", "created",
                    "git_commit", "torch_version", "mvtk_version", "data_fingerprint", "signature"):
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
                                   f"'_' or '-' (e.g. 'production'), got {shown(alias)}")
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
                    params: dict | None, tags: dict | None, notes: str, parent: int | None,
                    dataset) -> tuple[dict, bytes]:
    """Check a registration's arguments; return its index row (all but the version) and blob bytes (Lesson 04, §2).

    The row records the weights' SHA-256, the git commit, torch and mvtk versions, the time and
    the data's fingerprint.
    """
    check_name(name)
    state, architecture = weights_and_architecture(model_or_state_dict, architecture)
    if not isinstance(notes, str):
        raise InvalidArgumentError(f"notes must be a str, got {type(notes).__name__}")
    if parent is not None:
        check_version_number(parent, "parent")
    data = safetensors_save(state)
    row = {"name": name, "sha256": sha256_bytes(data), "tensor_keys": json.dumps(list(state)),
           "architecture": None if architecture is None else _to_json(architecture, "architecture"),
           "metrics": _to_json(_check_metrics(metrics), "metrics"), "params": _to_json(params or {}, "params"),
           "tags": _to_json(tags or {}, "tags"), "notes": notes, "parent": parent, "created": utc_now(),
           "git_commit": git_commit(), "torch_version": torch.__version__, "mvtk_version": mvtk.__version__,
           "data_fingerprint": _data_fingerprint(dataset)}
    return row, data


def infer_architecture(model: nn.Module) -> dict | None:
    """The build_model recipe {"name", "kwargs"} of a course model; None for any other model (Lesson 04, §2)."""
    if type(model) is MLP:
        kwargs = {"in_features": model.fc1.in_features, "hidden": model.fc1.out_features,
                  "num_classes": model.fc2.out_features}
    elif type(model) is MLPv2:
        kwargs = {"in_features": model.fc1.in_features, "hidden": model.fc1.out_features,
                  "num_classes": model.fc3.out_features, "dropout": model.drop.p}
    elif type(model) is SmallCNN:
        kwargs = {"in_channels": model.input_shape[0], "input_size": model.input_shape[1],
                  "num_classes": model.fc2.out_features, "hidden": model.fc1.out_features,
                  "channels": [model.features.conv1.out_channels, model.features.conv2.out_channels]}
    else:
        return None
    return {"name": next(key for key, cls in MODELS.items() if cls is type(model)), "kwargs": kwargs}


def weights_and_architecture(obj, architecture: dict | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A CPU copy of the state_dict of a model (unwrapped) or a state_dict, and its checked recipe (Lesson 04, §2)."""
    if isinstance(obj, nn.Module):
        obj = unwrap(obj)  # register the model, not its wrapper: no 'module.' prefix (Lesson 05)
        obj = getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper
        if architecture is None:
            architecture = infer_architecture(obj)
        obj = obj.state_dict()
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
        _check_architecture(architecture, state)
    return state, architecture


# -- index rows -> records ------------------------------------------------------------------------------------------


def version_from_row(row) -> ModelVersion:
    """The ModelVersion of one index row (a mapping of column -> value) (Lesson 04, §2)."""
    row = dict(row)
    for key in JSON_COLUMNS:
        row[key] = None if row[key] is None else json.loads(row[key])
    return ModelVersion(**{**row, "tensor_keys": tuple(row["tensor_keys"])})


def event_from_row(row) -> AliasEvent:
    """The AliasEvent of one row of the alias history (Lesson 04, §3)."""
    return AliasEvent(**dict(row))


# -- helpers ------------------------------------------------------------------------------------------------------


def _check_architecture(architecture: dict, state: dict[str, torch.Tensor]) -> None:
    if (not isinstance(architecture, dict) or architecture.get("name") not in MODELS
            or not isinstance(architecture.get("kwargs", {}), dict) or set(architecture) - {"name", "kwargs"}):
        raise InvalidArgumentError(f"architecture must be {{'name': one of {sorted(MODELS)}, 'kwargs': {{...}}}} "
                                   f"as accepted by mvtk.models.build_model, got {architecture!r}")
    try:
        model = build_model(architecture["name"], **architecture.get("kwargs", {}))
    except TypeError as exc:  # a keyword the model's constructor does not take
        raise InvalidArgumentError(f"architecture {architecture!r} cannot be built: {exc}") from None
    check_state_dict_fits(model, state, f"the weights given for architecture {architecture_label(architecture)}")


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
