"""The registry as text: tables that print aligned and show as HTML in Jupyter, and their cells (Lesson 04, §2-§4).

`Registry.table` and `Registry.history_table` build these tables; the cell helpers word the
registry's messages and its command line's output.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

from mvtk.registry.records import AliasEvent, ModelVersion

__all__ = ["Table", "names_table", "versions_table", "history_table", "cell", "alias_cell", "ranges"]


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


# -- cells -------------------------------------------------------------------------------------------------------


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


def ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'; [] -> 'none' (Lesson 04, §2)."""
    parts: list[list[int]] = []
    for n in numbers:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ", ".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts) or "none"
