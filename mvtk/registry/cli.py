"""The registry's command line, `python -m mvtk.registry`: list, show, diff, alias, promote, rollback (Lesson 04, §7).

Also export, import and check. Every command opens an existing registry (`--root`, default $MVTK_REGISTRY
or ./registry), prints plain text and exits 0. A mistake (an unknown name, version or alias, a
malformed argument, a missing root, a damaged index, a file that cannot be read or written) prints
one line, `error: Type: message`, on stderr and exits 2, never a traceback; so does output that
cannot be written (a full disk behind `> file`), while a reader that stops early (`| head`) ends it
quietly with exit 141, as a killed-by-SIGPIPE program would. `check` exits 1 when a
blob is missing or corrupt (or, with `--verify-key`, a version is unsigned or badly signed).
`export --output FILE` writes outside the registry folder only, into a folder that exists, and replaces
an existing file only when it is an earlier export or with `--force`.
`--verify-key PUBLIC.pem` makes diff and export verify each version's signature first, import verify
the bundle's and each version's, and check report versions that are unsigned or badly signed.
`export --bundle FOLDER [NAME ...]` writes versions with their weights for `import FOLDER` into
another registry; `--signing-key PRIVATE.pem` signs the bundle (export) or the renumbered versions (import). `python -m mvtk.registry` runs `main` through the package's `__main__.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mvtk.errors import InvalidArgumentError, MvtkError
from mvtk.registry.registry import Registry
from mvtk.registry.text import alias_cell

__all__ = ["main", "DEFAULT_ROOT_ENV"]

DEFAULT_ROOT_ENV = "MVTK_REGISTRY"  # the registry folder when --root is not given


def main(argv: list[str] | None = None) -> int:
    """`python -m mvtk.registry`: list, show, diff, alias, promote, rollback, export, import, check (Lesson 04, §7)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "alias" and args.remove and (args.alias is None or args.version is not None):
            parser.error("alias NAME ALIAS --remove takes one alias and no version")
    except _UsageError as exc:
        return _fail("UsageError", str(exc))
    try:
        registry = Registry(args.root, create=args.command == "import", verify_key=args.verify_key,
                            signing_key=args.signing_key)
        text, code = _run(registry, args)
    except MvtkError as exc:
        return _fail(type(exc).__name__, str(exc))
    except OSError as exc:  # a root or output path that cannot be read or written
        return _fail(type(exc).__name__, f"{exc.strerror or exc}: {exc.filename!r}")
    return _print(text, code)


class _UsageError(Exception):
    """A malformed command line: reported in one line, like every other mistake."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints the usage and exits 2
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _fail(kind: str, message: str) -> int:
    try:
        print(f"error: {kind}: {' '.join(message.split(chr(10)))}", file=sys.stderr)
    except (OSError, ValueError):  # stderr itself is gone: the exit code still tells
        pass
    return 2


def _print(text: str, code: int) -> int:
    """Print the result; a closed pipe ends quietly (141), any other failure to write is one line, exit 2."""
    try:
        print(text)
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`): print wrote nothing
            sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped (`| head`): as the Python docs' SIGPIPE recipe does
        _discard_stdout()
        return 141
    except (OSError, UnicodeEncodeError) as exc:  # a full disk behind `> file`, a terminal that cannot show it
        _discard_stdout()
        return _fail(type(exc).__name__, f"cannot write the output to stdout: "
                                         f"{getattr(exc, 'strerror', None) or exc}")
    return code


def _discard_stdout() -> None:
    """Point stdout at os.devnull, so the interpreter's last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (captured in-process): nothing to flush at exit
        pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mvtk.registry",
                                     description="Inspect and manage an mvtk model registry (Lesson 04).")
    parser.add_argument("--root", default=os.environ.get(DEFAULT_ROOT_ENV, "registry"),
                        help=f"the registry folder (default: ${DEFAULT_ROOT_ENV} or ./registry)")
    parser.add_argument("--verify-key", metavar="PUBLIC_PEM",
                        help="verify every version's signature with this public key before using its weights")
    parser.add_argument("--signing-key", metavar="PRIVATE_PEM",
                        help="sign an exported bundle, or the versions an import renumbers, with this private key")
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
    cmd = sub.add_parser("export", help="print the index as JSON (or write it with --output); with --bundle, "
                                        "write versions and their weights for another registry to import")
    cmd.add_argument("--output", "-o", help="a file outside the registry folder, in a folder that exists")
    cmd.add_argument("--force", action="store_true", help="replace --output even when it is not an earlier export")
    cmd.add_argument("--bundle", metavar="FOLDER", help="a new folder to write the versions of NAMES (default: all) to")
    cmd.add_argument("names", nargs="*", metavar="NAME")
    cmd = sub.add_parser("import", help="add the versions of a bundle (export --bundle), verified first; prints "
                                        "each version's new number")
    cmd.add_argument("bundle", metavar="FOLDER")
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
    if args.command == "export" and (args.bundle is not None or args.names):
        if args.bundle is None or args.output is not None:
            raise InvalidArgumentError("export NAME ... writes a bundle: give --bundle FOLDER (and no --output)")
        folder = registry.export_versions(args.bundle, args.names or None)
        return f"wrote {folder}", 0
    if args.command == "import":
        return str(registry.import_versions(args.bundle)), 0
    if args.command == "export":
        text = registry.export(args.output, overwrite=args.force)
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
