"""Comparing two registered versions: tensors, architecture, metrics and params (Lesson 04, §4).

`Registry.diff` loads both versions' weights and builds a `VersionDiff`, which prints as a heading
and three tables and shows as HTML in Jupyter.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from mvtk.registry.records import ModelVersion, model_label
from mvtk.registry.text import Table, cell

__all__ = ["TensorChange", "LayerChange", "VersionDiff", "compare_states", "compare_modules"]


@dataclass(frozen=True)
class TensorChange:
    """How one state_dict entry differs between two versions (Lesson 04, §4)."""
    key: str
    status: str                       # "unchanged", "changed", "reshaped", "added" or "removed"
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    relative_change: float | None     # ||b - a|| / ||a|| when the shapes agree


@dataclass(frozen=True)
class LayerChange:
    """A layer (submodule) that one version has and the other lacks, or that differs (Lesson 04, §4).

    Layers without weights count: a Dropout added between v1 and v2 is a LayerChange.
    """
    name: str
    status: str                       # "added", "removed" or "changed" (its type or settings)
    layer_a: str | None               # "Dropout(p=0.5)" in version a; None when absent
    layer_b: str | None


@dataclass(frozen=True, repr=False)
class VersionDiff:
    """Two versions side by side: architecture, tensors, metrics and params (Lesson 04, §4)."""
    a: ModelVersion
    b: ModelVersion
    tensors: tuple[TensorChange, ...]

    def _keys(self, status: str) -> list[str]:
        return [t.key for t in self.tensors if t.status == status]

    added = property(lambda self: self._keys("added"))
    removed = property(lambda self: self._keys("removed"))
    reshaped = property(lambda self: self._keys("reshaped"))
    changed = property(lambda self: self._keys("changed"))
    unchanged = property(lambda self: self._keys("unchanged"))

    @property
    def architecture_changed(self) -> bool:
        """True when the versions' recipes (course architecture, class, init args) or layers differ."""
        return (self.a.architecture != self.b.architecture or self.a.class_path != self.b.class_path
                or self.a.init_args != self.b.init_args or bool(self.layers))

    @property
    def layers(self) -> tuple[LayerChange, ...]:
        """The layers added, removed or changed, from the stored module trees; () when either is unknown."""
        return compare_modules(self.a.modules, self.b.modules)

    @property
    def relative_change(self) -> dict[str, float]:
        """||b - a|| / ||a|| per tensor whose shape did not change."""
        return {t.key: t.relative_change for t in self.tensors if t.relative_change is not None}

    @property
    def metric_deltas(self) -> dict[str, float | None]:
        """b minus a per metric; None where one side lacks it."""
        return {key: _delta(self.a.metrics.get(key), self.b.metrics.get(key))
                for key in _union(self.a.metrics, self.b.metrics)}

    @property
    def param_changes(self) -> dict[str, tuple[Any, Any]]:
        """(a, b) for every hyper-parameter that differs (None where one side lacks it)."""
        return {key: (self.a.params.get(key), self.b.params.get(key)) for key in _union(self.a.params, self.b.params)
                if self.a.params.get(key) != self.b.params.get(key)}

    def tables(self) -> list[Table]:
        """The diff as three tables: tensors, metrics, params."""
        va, vb = f"v{self.a.version}", f"v{self.b.version}"
        tensors = Table(("tensor", "status", f"shape {va}", f"shape {vb}", "rel. change"), tuple(
            (t.key, t.status, _shape(t.shape_a), _shape(t.shape_b), cell(t.relative_change)) for t in self.tensors),
            title=f"tensors ({len(self.tensors)})")
        metrics = Table(("metric", va, vb, "delta"), tuple(
            (k, cell(self.a.metrics.get(k)), cell(self.b.metrics.get(k)), cell(d, signed=True))
            for k, d in self.metric_deltas.items()), title="metrics")
        params = Table(("param", va, vb, "delta"), tuple(
            (k, cell(self.a.params.get(k)), cell(self.b.params.get(k)),
             _change(self.a.params.get(k), self.b.params.get(k)) if k in self.param_changes else "")
            for k in _union(self.a.params, self.b.params)), title="params")
        layers = Table(("layer", "status", va, vb), tuple(
            (c.name or "(model)", c.status, c.layer_a or "-", c.layer_b or "-") for c in self.layers),
            title=f"layers ({len(self.layers)} differ)")
        return ([layers] if self.layers else []) + [tensors, metrics, params]

    def heading(self) -> str:
        """Two lines: 'name: vA -> vB', then both architectures, or one followed by '(same)'."""
        label_a, label_b = model_label(self.a), model_label(self.b)
        if not self.architecture_changed:
            arch = f"{label_a} (same)"
        elif label_a != label_b:
            arch = f"{label_a} -> {label_b}"
        else:
            arch = f"{label_a}, layers differ"
        return f"{self.a.name}: v{self.a.version} -> v{self.b.version}\narchitecture: {arch}"

    def __str__(self) -> str:
        return "\n\n".join([self.heading()] + [str(t) for t in self.tables()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        heading = "<br>".join(html.escape(line) for line in self.heading().splitlines())
        return f"<div><p><b>{heading}</b></p>" + "".join(t._repr_html_() for t in self.tables()) + "</div>"


def compare_states(state_a: Mapping[str, torch.Tensor],
                   state_b: Mapping[str, torch.Tensor]) -> tuple[TensorChange, ...]:
    """One TensorChange per key of either state_dict, a's keys first (Lesson 04, §4)."""
    return tuple(_compare_tensor(key, state_a.get(key), state_b.get(key)) for key in _union(state_a, state_b))


def compare_modules(tree_a, tree_b) -> tuple[LayerChange, ...]:
    """The layers that differ between two module trees of (name, type, extra_repr); () if either is empty (Lesson 04, §4)."""
    if not tree_a or not tree_b:
        return ()
    a = {name: _layer(kind, extra) for name, kind, extra in tree_a}
    b = {name: _layer(kind, extra) for name, kind, extra in tree_b}
    changes = []
    for name in _union(a, b):
        if name not in b or name not in a:
            changes.append(LayerChange(name, "removed" if name not in b else "added", a.get(name), b.get(name)))
        elif a[name] != b[name] and name:  # the model itself differs only through its children
            changes.append(LayerChange(name, "changed", a[name], b[name]))
    return tuple(changes)


def _layer(kind: str, extra: str) -> str:
    return f"{kind}({extra})"


def _compare_tensor(key: str, a: torch.Tensor | None, b: torch.Tensor | None) -> TensorChange:
    shape_a = None if a is None else tuple(a.shape)
    shape_b = None if b is None else tuple(b.shape)
    if a is None or b is None:
        return TensorChange(key, "added" if a is None else "removed", shape_a, shape_b, None)
    if shape_a != shape_b:
        return TensorChange(key, "reshaped", shape_a, shape_b, None)
    a64, b64 = a.double(), b.double()
    norm = a64.norm().item()
    change = (b64 - a64).norm().item()
    relative = change / norm if norm > 0 else (0.0 if change == 0 else math.inf)
    return TensorChange(key, "unchanged" if torch.equal(a, b) else "changed", shape_a, shape_b, relative)


def _union(a: Mapping, b: Mapping) -> list[str]:
    return list(a) + [k for k in b if k not in a]


def _delta(a, b) -> float | None:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return b - a if numbers else None


def _change(a, b) -> str:
    delta = _delta(a, b)
    return "changed" if delta is None else cell(delta, signed=True)


def _shape(shape: tuple | None) -> str:
    return "-" if shape is None else str(tuple(shape))
