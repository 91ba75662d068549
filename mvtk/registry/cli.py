"""The registry's command line, `python -m mvtk.registry`: list, show, diff, alias, promote, rollback (Lesson 04, §7).

Also export and check. Every command opens an existing registry (`--root`, default $MVTK_REGISTRY
or ./registry), prints plain text and exits 0. A mistake (an unknown name, version or alias, a
malformed argument, a missing root, a damaged index, a file that cannot be read or written) prints
one line, `error: Type: message`, on stderr and exits 2, never a traceback. `check` exits 1 when a
blob is missing or corrupt (or, with `--verify-key`, a version is unsigned or badly signed).
`--verify-key PUBLIC.pem` makes diff and export verify each version's signature first, and check
report versions that are unsigned or badly signed. `python -m mvtk.registry` runs `main` through the package's `__main__.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mvtk.errors import MvtkError
from mvtk.registry.registry import Registry
from mvtk.registry.text import alias_cell

__all__ = ["main", "DEFAULT_ROOT_ENV"]

DEFAULT_ROOT_ENV = "MVTK_REGISTRY"  # the registry folder when --root is not given


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.registry`: list, show, diff, alias, promote, rollback, export, check (Lesson 04, §7)."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        return _fail("UsageError", str(exc))
    try:
        registry = Registry(args.root, create=False, verify_key=args.verify_key)
        text, code = _run(registry, args)
    except MvtkError as exc:
        return _fail(type(exc).__name__, str(exc))
    except OSError as exc:  # a root or output path that cannot be read or written
        return _fail(type(exc).__name__, f"{exc.strerror or exc}: {exc.filename!r}")
    print(text)
    return code


class _UsageError(Exception):
    """A malformed command line: reported in one line, like every other mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints the usage and exits 2
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _fail(kind: str, message: str) -> int:
    print(f"error: {kind}: {' '.join(message.split(chr(10)))}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mvtk.registry",
                                     description="Inspect and manage an mvtk model registry (Lesson 04).")
    parser.add_argument("--root", default=os.environ.get(DEFAULT_ROOT_ENV, "registry"),
                        help=f"the registry folder (default: ${DEFAULT_ROOT_ENV} or ./registry)")
    parser.add_argument("--verify-key", metavar="PUBLIC_PEM",
                        help="verify every version's signature with this public key before using its weights")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = sub.add_parser("list", help="list names, or the versions of one name")
    cmd.add_argument("name", nargs="?")
    cmd = sub.add_parser("show", help="show one version: NAME (latest), NAME@ALIAS or NAME --version N")
    cmd.add_argument("ref")
    cmd.add_argument("--version", type=int)
    cmd = sub.add_parser("diff", help="compare two versions (numbers or aliases) of one name")
    cmd.add_argument("name")
    cmd.add_argument("a")
    cmd.add_argument("b")
    cmd = sub.add_parser("alias", help="list aliases; show an alias's history; or set/remove an alias")
    cmd.add_argument("name")
    cmd.add_argument("alias", nargs="?")
    cmd.add_argument("version", nargs="?", type=int)
    cmd.add_argument("--remove", action="store_true", help="remove the alias (the version stays)")
    cmd = sub.add_parser("promote", help="point one alias where another points (staging -> production)")
    cmd.add_argument("name")
    cmd.add_argument("--source", default="staging")
    cmd.add_argument("--target", default="production")
    cmd = sub.add_parser("rollback", help="move an alias back to its previous version")
    cmd.add_argument("name")
    cmd.add_argument("alias")
    cmd = sub.add_parser("export", help="print the index as JSON (or write it with --output)")
    cmd.add_argument("--output", "-o")
    sub.add_parser("check", help="verify every blob against its checksum; exit 1 on a problem")
    return parser


def _run(registry: Registry, args: argparse.Namespace) -> tuple[str, int]:
    if args.command == "list":
        return str(registry.table(args.name)), 0
    if args.command == "show":
        return registry.get(args.ref, version=args.version).describe(), 0
    if args.command == "diff":
        return str(registry.diff(args.name, args.a, args.b)), 0
    if args.command == "promote":
        mv = registry.promote(args.name, args.source, args.target)
        return f"{args.name}@{args.target} -> v{mv.version}", 0
    if args.command == "rollback":
        mv = registry.rollback(args.name, args.alias)
        return f"{args.name}@{args.alias} -> v{mv.version}", 0
    if args.command == "export":
        text = registry.export(args.output)
        return (f"wrote {args.output}" if args.output else text.rstrip("\n")), 0
    if args.command == "check":
        report = registry.check()
        lines = [f"{report.versions} versions checked: {'ok' if report.ok else 'PROBLEMS'}"]
        lines += [f"{what}: {', '.join(items)}" for what, items in
                  (("missing", report.missing), ("corrupt", report.corrupt), ("unsigned", report.unsigned),
                   ("bad signature", report.bad_signature), ("orphans", report.orphans),
                   ("temp files", report.temp_files)) if items]
        return "\n".join(lines), 0 if report.ok else 1
    return _run_alias(registry, args), 0


def _run_alias(registry: Registry, args: argparse.Namespace) -> str:
    if args.alias is None:
        return alias_cell(registry.aliases(args.name)).replace(", ", "\n") or f"{args.name} has no aliases"
    if args.remove:
        registry.remove_alias(args.name, args.alias)
        return f"removed {args.name}@{args.alias}"
    if args.version is not None:
        mv = registry.set_alias(args.name, args.alias, args.version)
        return f"{args.name}@{args.alias} -> v{mv.version}"
    return str(registry.history_table(args.name, args.alias))
