"""How a version rebuilds its model, for any class: class path, constructor arguments, module tree (Lesson 04, §2, §6).

The lowest file of `mvtk.registry`. At registration the registry records the model's importable
class (`module:QualName`) and the arguments its constructor was called with, found the way
Lightning's `save_hyperparameters` finds them: given as `init_args=`, kept by the class itself
(`mvtk.models.remember_init_args` sets `model.init_args`; Lightning sets `model.hparams`), or read
back from attributes named like the constructor's parameters (torch.nn's layers keep them so).
Whatever the source, the recipe is checked by rebuilding the class and comparing module trees and
tensor shapes, so a recipe that would rebuild another model is refused at registration, not at load.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from typing import Mapping

import torch
from torch import nn

from mvtk.errors import InvalidArgumentError, RegistryError

__all__ = ["CLASS_PATH_PATTERN", "class_path", "module_tree", "capture_recipe", "check_init_args", "rebuild",
           "import_class", "recipe_label"]

CLASS_PATH_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:"
                                r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
SKIPPED_PARAMETERS = ("device", "dtype")  # where a layer is built, not what it is: never recorded
_MISSING = object()


def class_path(cls: type) -> str:
    """'package.module:QualName' of a class, as `import_class` reads it back (Lesson 04, §2)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def module_tree(model: nn.Module) -> tuple[tuple[str, str, str], ...]:
    """(qualified name, type name, extra_repr) of every submodule, the model itself first as '' (Lesson 04, §4).

    Layers without weights (Dropout, ReLU, Flatten) are in it too, so a diff sees them come and go.
    """
    return tuple((name, type(module).__name__, module.extra_repr()) for name, module in model.named_modules())


def check_init_args(init_args, what: str = "init_args") -> dict:
    """`init_args` as JSON-safe keyword arguments (tuples become lists); else an InvalidArgumentError (Lesson 04, §2)."""
    if not isinstance(init_args, Mapping) or not all(isinstance(k, str) for k in init_args):
        raise InvalidArgumentError(f"{what} must be a dict of the constructor's keyword arguments (str keys), "
                                   f"got {type(init_args).__name__}")
    try:
        return json.loads(json.dumps(dict(init_args), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{what} must hold only JSON values (str, number, bool, None, list, dict) to be "
                                   f"recorded: {exc}; pass program_example= to store a torch.export program "
                                   "instead") from None


def capture_recipe(model: nn.Module, init_args: Mapping | None) -> tuple[str, dict]:
    """(class path, constructor arguments) that rebuild `model`'s architecture, checked by rebuilding it (Lesson 04, §2).

    Tries, in order: `init_args` when given; the model's own `init_args` or `hparams` attribute; the
    attributes named like the constructor's parameters. The first recipe whose rebuilt model has the
    same module tree and tensor names and shapes wins. RegistryError says what is missing when none does.
    """
    cls = type(model)
    path = class_path(cls)
    if "<locals>" in cls.__qualname__:
        raise RegistryError(f"{cls.__qualname__} is defined inside a function, so it cannot be imported to rebuild "
                            "it; define the class at the top level of a module, or pass program_example=")
    if init_args is not None:
        given = check_init_args(init_args)
        problem = _rebuild_problem(model, cls, given)
        if problem:
            raise RegistryError(f"init_args {_short(given)} do not rebuild {cls.__name__}: {problem}")
        return path, given
    tried = []
    for source, candidate in _candidates(model, cls):
        if candidate is None:  # `source` says why this way cannot work
            tried.append(source)
            continue
        try:
            candidate = check_init_args(candidate, source)
        except InvalidArgumentError as exc:
            tried.append(f"{source}: {exc}")
            continue
        problem = _rebuild_problem(model, cls, candidate)
        if not problem:
            return path, candidate
        tried.append(f"{source} {_short(candidate)}: {problem}")
    raise RegistryError(f"cannot tell how to rebuild {cls.__name__} ({path}): "
                        f"{'; '.join(tried) or 'it keeps no record of its constructor arguments'}; "
                        "pass init_args={...} (its constructor's keyword arguments), decorate the class with "
                        "mvtk.models.remember_init_args, pass program_example=(example_input,) to store a "
                        "torch.export program, or register model.state_dict() to keep the weights alone")


def import_class(path: str) -> type:
    """The nn.Module class at 'module:QualName'; importing runs that module's code (Lesson 04, §6).

    RegistryError when the path is malformed, the module cannot be imported, or the name is not an
    nn.Module class there. Only the recorded module is imported: load only from registries you trust.
    """
    if not isinstance(path, str) or not CLASS_PATH_PATTERN.fullmatch(path):
        raise RegistryError(f"the recorded class path {path!r} is not of the form 'package.module:ClassName'")
    module_name, _, qualname = path.partition(":")
    try:
        found = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (" (a class defined in a notebook or script lives in __main__, which another process does not "
                "have: move it into a module)" if module_name == "__main__" else "")
        raise RegistryError(f"cannot import {module_name!r} to rebuild {qualname}: {exc}{hint}") from None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        hint = " (a class defined in a notebook lives in __main__: define it again, or move it into a module)" \
            if module_name == "__main__" else ""
        raise RegistryError(f"{path} is not an nn.Module class in {module_name!r}{hint}")
    return found


def rebuild(path: str, init_args: dict) -> nn.Module:
    """A new model of the class at `path`, built with `init_args` (its weights still random) (Lesson 04, §6)."""
    cls = import_class(path)
    try:
        return cls(**init_args)
    except Exception as exc:  # the user's constructor may raise anything
        raise RegistryError(f"{path}(**{_short(init_args)}) failed: {type(exc).__name__}: {exc}") from exc


def recipe_label(path: str | None, init_args: dict | None) -> str | None:
    """'Net(hidden=8)' from a class path and its arguments; None without a class path (Lesson 04, §4)."""
    if path is None:
        return None
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted((init_args or {}).items()))
    return f"{path.rpartition(':')[2]}({kwargs})"


# -- helpers ------------------------------------------------------------------------------------------------------


def _candidates(model: nn.Module, cls: type):
    """(where, arguments) to try, in order."""
    for attribute in ("init_args", "hparams"):
        found = model.__dict__.get(attribute)
        if isinstance(found, Mapping):
            yield f"model.{attribute}", found
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    read, missing = {}, []
    for name, parameter in list(parameters.items())[1:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL and parameter.default is inspect.Parameter.empty:
                missing.append(f"*{name}")
            continue
        if name in SKIPPED_PARAMETERS:
            continue
        value = model.__dict__.get(name, _MISSING)
        if value is not _MISSING and _is_json(value):
            read[name] = value
        elif parameter.default is inspect.Parameter.empty:
            missing.append(name)
    if missing:
        yield f"its constructor takes {', '.join(missing)}, which the model does not keep as attributes", None
    else:
        yield "its attributes", read


def _rebuild_problem(model: nn.Module, cls: type, init_args: dict) -> str | None:
    """Why cls(**init_args) would not rebuild `model`, or None when it does."""
    try:
        rebuilt = cls(**init_args)
    except Exception as exc:  # a missing or unknown argument, or the constructor's own check
        return f"the constructor raised {type(exc).__name__}: {exc}"
    tree, want = module_tree(rebuilt), module_tree(model)
    if tree != want:
        pairs = [b for a, b in zip(tree, want) if a != b]
        differs = pairs[0] if pairs else (want[len(tree):] or tree[len(want):])[0]
        return f"the rebuilt model's layers differ, first at {differs[0] or '(the model)'!r}: {differs[1]}({differs[2]})"
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in rebuilt.state_dict().items()}
    wanted = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if shapes != wanted:
        key = next(k for k in list(wanted) + list(shapes) if shapes.get(k) != wanted.get(k))
        return f"tensor {key!r} would be {shapes.get(key, 'missing')}, the model's is {wanted.get(key, 'missing')}"
    return None


def _is_json(value) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(value, nn.Module):
        return False
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
