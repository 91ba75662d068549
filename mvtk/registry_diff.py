"""Comparing two registered versions and rendering registry tables as text and HTML (Lesson 04, §4).

`Registry.diff` builds a `VersionDiff`; `Registry.table` and `Registry.history_table` build `Table`s. The small formatting helpers here are shared by the registry's
messages and its command line.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from mvtk.registry import AliasEvent, ModelVersion


@dataclass(frozen=True, repr=False)
class Table:
    """Rows of text under column headers: prints aligned, shows as an HTML table in Jupyter (Lesson 04, §4)."""
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    title: str = ""

    def __str__(self) -> str:
        cells = [self.columns] + list(self.rows)
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class TensorChange:
    """How one state_dict entry differs between two versions (Lesson 04, §4)."""
    key: str
    status: str                       # "unchanged", "changed", "reshaped", "added" or "removed"
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    relative_change: float | None     # ||b - a|| / ||a|| when the shapes agree


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
        """True when the two versions recorded different build_model recipes (name or kwargs)."""
        return self.a.architecture != self.b.architecture

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
        return [tensors, metrics, params]

    def heading(self) -> str:
        """Two lines: 'name: vA -> vB', then both architectures, or one followed by '(same)'."""
        arch = (f"{architecture_label(self.a.architecture)} -> {architecture_label(self.b.architecture)}"
                if self.architecture_changed else f"{architecture_label(self.a.architecture)} (same)")
        return f"{self.a.name}: v{self.a.version} -> v{self.b.version}\narchitecture: {arch}"

    def __str__(self) -> str:
        return "\n\n".join([self.heading()] + [str(t) for t in self.tables()])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        heading = "<br>".join(html.escape(line) for line in self.heading().splitlines())
        return f"<div><p><b>{heading}</b></p>" + "".join(t._repr_html_() for t in self.tables()) + "</div>"


def names_table(entries: list[tuple[str, list[ModelVersion], dict[str, int]]]) -> Table:
    """One row per (name, versions, aliases): how many versions, the latest, the aliases (Lesson 04, §2)."""
    rows = tuple((name, str(len(versions)), f"v{versions[-1].version}", alias_cell(aliases))
                 for name, versions, aliases in entries)
    return Table(("name", "versions", "latest", "aliases"), rows)


def versions_table(name: str, versions: list[ModelVersion], aliases: dict[str, int]) -> Table:
    """One row per version of `name`: architecture, metrics, parent, aliases, checksum, time (Lesson 04, §2)."""
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = tuple((f"v{mv.version}", cell(mv.architecture and mv.architecture["name"]), cell(mv.metrics),
                  "" if mv.parent is None else f"v{mv.parent}", ", ".join(sorted(by_version.get(mv.version, []))),
                  mv.sha256[:12], mv.created) for mv in versions)
    return Table(("version", "architecture", "metrics", "parent", "aliases", "sha256", "created"), rows, title=name)


def history_table(name: str, events: list[AliasEvent], alias: str | None = None) -> Table:
    """One row per alias move: seq, alias (unless the events are of one `alias`), action, from, to, time (Lesson 04, §3)."""
    rows = tuple((str(e.seq),) + (() if alias else (e.alias,))
                 + (e.action, cell(e.previous and f"v{e.previous}"), cell(e.version and f"v{e.version}"), e.at)
                 for e in events)
    columns = ("seq",) + (() if alias else ("alias",)) + ("action", "from", "to", "at")
    return Table(columns, rows, title=f"{name}@{alias}" if alias else f"{name}: alias history")


def compare_states(state_a: Mapping[str, torch.Tensor],
                   state_b: Mapping[str, torch.Tensor]) -> tuple[TensorChange, ...]:
    """One TensorChange per key of either state_dict, a's keys first (Lesson 04, §4)."""
    return tuple(_compare_tensor(key, state_a.get(key), state_b.get(key)) for key in _union(state_a, state_b))


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


# -- text for tables and messages ----------------------------------------------------------------------------------


def cell(value, signed: bool = False) -> str:
    """A value as table text: floats to 4 decimals, dicts as k=v, None as '-' (Lesson 04, §4)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and signed:
        return f"{value:+d}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) if value else "-"
    return str(value)


def alias_cell(aliases: dict[str, int]) -> str:
    """{'production': 2, 'staging': 3} -> 'production -> v2, staging -> v3' (Lesson 04, §3)."""
    return ", ".join(f"{alias} -> v{version}" for alias, version in sorted(aliases.items()))


def architecture_label(architecture: dict | None) -> str:
    """{'name': 'mlp', 'kwargs': {'hidden': 16}} -> 'mlp(hidden=16)'; None -> 'unknown' (Lesson 04, §4)."""
    if architecture is None:
        return "unknown"
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(architecture.get("kwargs", {}).items()))
    return f"{architecture['name']}({kwargs})"


def ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'; [] -> 'none' (Lesson 04, §2)."""
    parts: list[list[int]] = []
    for n in numbers:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts) or "none"


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
