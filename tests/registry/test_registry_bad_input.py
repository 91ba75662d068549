"""Lesson 04, §2-§3, §7: every bad input, damaged file and full disk gets an mvtk error naming what was wrong."""
import contextlib
import os
import sqlite3
import subprocess
import sys

import pytest

from mvtk.errors import InvalidArgumentError, NotFoundError, RegistryError
from mvtk.registry import Registry
from mvtk.registry.records import MAX_VERSION

BAD_VERSIONS = [2**63, 2**64, -1, 0, True, 1.0, "1", None]


def damage(root) -> None:
    """Garbage over the index, as a bad disk or a stray `cp` leaves it."""
    for leftover in ("index.sqlite-wal", "index.sqlite-shm"):
        (root / leftover).unlink(missing_ok=True)
    (root / "index.sqlite").write_bytes(os.urandom(64) + b"not a database" * 300)


# -- a damaged index ------------------------------------------------------------------------------------------


def test_a_damaged_index_is_a_registry_error_naming_the_file(three_versions):
    root = three_versions.root
    three_versions.close()
    damage(root)
    with pytest.raises(RegistryError, match=r"index\.sqlite.*damaged or is not an SQLite database"):
        Registry(root)


def blob_files(root) -> list:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


@pytest.mark.parametrize("create", [True, False])
def test_an_emptied_index_beside_stored_weights_is_refused_not_taken_for_a_new_registry(three_versions, create):
    root, blobs = three_versions.root, blob_files(three_versions.root)
    three_versions.close()
    (root / "index.sqlite").write_bytes(b"")  # a zero-byte index, as a failed copy or `> index.sqlite` leaves it
    with pytest.raises(RegistryError, match=r"index\.sqlite' is empty.*damaged.*restore index\.sqlite from a backup"):
        Registry(root, create=create)
    assert (root / "index.sqlite").stat().st_size == 0 and blob_files(root) == blobs  # nothing changed


def test_a_lost_index_beside_stored_weights_is_refused_not_recreated(three_versions):
    root, blobs = three_versions.root, blob_files(three_versions.root)
    three_versions.close()
    (root / "index.sqlite").unlink()
    with pytest.raises(RegistryError, match=r"index\.sqlite' is missing.*restore index\.sqlite from a backup"):
        Registry(root)
    assert not (root / "index.sqlite").exists() and blob_files(root) == blobs


def test_create_false_refuses_an_empty_index_and_create_initialises_only_a_folder_without_weights(tmp_path):
    root = tmp_path / "registry"
    root.mkdir()
    (root / "index.sqlite").write_bytes(b"")  # a first Registry() killed before its tables were written
    with pytest.raises(RegistryError, match=r"no registry at .*index\.sqlite' is empty"):
        Registry(root, create=False)
    with Registry(root) as reg:  # nothing stored yet: a new registry, so it is initialised
        assert reg.names() == [] and reg.check().ok


def test_an_sqlite_file_of_another_program_is_not_taken_for_an_index(tmp_path):
    root = tmp_path / "registry"
    root.mkdir()
    with contextlib.closing(sqlite3.connect(root / "index.sqlite")) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(RegistryError, match=r"index\.sqlite' is an SQLite file but not an mvtk registry index"):
        Registry(root)


def test_gc_refuses_to_delete_weights_when_the_index_records_no_version(three_versions):
    root, blobs = three_versions.root, blob_files(three_versions.root)
    with contextlib.closing(sqlite3.connect(root / "index.sqlite")) as conn, conn:  # emptied by hand
        conn.execute("DELETE FROM versions")
        conn.execute("DELETE FROM models")
    with pytest.raises(RegistryError, match=r"gc refused: the index .*index\.sqlite' records no version.*nothing "
                                            "was deleted"):
        three_versions.gc()
    assert blob_files(root) == blobs and len(blobs) == 3


def test_an_emptied_index_on_the_command_line_is_one_line_and_exit_2(three_versions, repo_root):
    root = three_versions.root
    three_versions.close()
    (root / "index.sqlite").write_bytes(b"")
    for command in ("check", "list"):
        result = run_cli(repo_root, "--root", str(root), command)
        assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert "RegistryError: registry index" in result.stderr and "is empty" in result.stderr


# -- aliases and promote ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["source", "target"])
def test_promote_refuses_none_instead_of_promoting_the_latest(three_versions, argument):
    three_versions.set_alias("m", "staging", 1)
    with pytest.raises(InvalidArgumentError, match=f"^{argument} must be a str"):
        three_versions.promote("m", **{argument: None})
    assert three_versions.aliases("m") == {"staging": 1}


# None means "every alias" to alias_history and "no alias" to get, as documented: not a bad input there.
ALIAS_CASES = [(method, alias) for method in ["rollback", "remove_alias", "set_alias", "alias_history", "get"]
               for alias in [None, 3, b"production", ["production"]]
               if not (alias is None and method in ("alias_history", "get"))]


@pytest.mark.parametrize("method, alias", ALIAS_CASES, ids=[f"{m}-{a!r}" for m, a in ALIAS_CASES])
def test_an_alias_that_is_not_a_str_is_refused(three_versions, method, alias):
    three_versions.set_alias("m", "production", 2)
    args = {"rollback": ("m", alias), "remove_alias": ("m", alias), "set_alias": ("m", alias, 1),
            "alias_history": ("m", alias), "get": ("m", None, alias)}[method]
    with pytest.raises(InvalidArgumentError, match="^alias must be a str"):
        getattr(three_versions, method)(*args)
    assert three_versions.aliases("m") == {"production": 2}


# -- version numbers ---------------------------------------------------------------------------------------------


VERSION_CALLS = {
    "get": lambda reg, v: reg.get("m", v),
    "load": lambda reg, v: reg.load("m", v),
    "load_model": lambda reg, v: reg.load_model("m", v),
    "lineage": lambda reg, v: reg.lineage("m", v),
    "set_alias": lambda reg, v: reg.set_alias("m", "production", v),
    "delete_version": lambda reg, v: reg.delete_version("m", v),
    "diff": lambda reg, v: reg.diff("m", v, 1),
    "register_parent": lambda reg, v: reg.register("m", reg.load_model("m", 1), parent=v),
}


# None means "the latest" to get/load/load_model/lineage and "no parent" to register, as documented.
VERSION_CASES = [(call, version) for call in sorted(VERSION_CALLS) for version in BAD_VERSIONS
                 if not (version is None and call in ("get", "load", "load_model", "lineage", "register_parent"))]


@pytest.mark.parametrize("call, version", VERSION_CASES, ids=[f"{c}-{v!r}" for c, v in VERSION_CASES])
def test_a_version_that_is_no_version_number_is_refused_by_every_method(three_versions, call, version):
    if version == "1" and call == "diff":
        version = "99999999999999999999"  # diff takes numbers as digit strings, as the command line passes them
    with pytest.raises(InvalidArgumentError, match=r"(version|parent|a) must be a version number"):
        VERSION_CALLS[call](three_versions, version)
    assert [mv.version for mv in three_versions.versions("m")] == [1, 2, 3]


@pytest.mark.parametrize("call", ["get", "load", "lineage", "set_alias", "delete_version", "diff"])
def test_the_largest_version_number_is_simply_not_found(three_versions, call):
    with pytest.raises(NotFoundError, match=f"m has no version {MAX_VERSION}; its versions: 1-3"):
        VERSION_CALLS[call](three_versions, MAX_VERSION)


# -- hostile names -----------------------------------------------------------------------------------------------

HOSTILE = ["a/b", "../escape", "..", "a\x00b", "a\nb", "x" * 10_000, "modèle", "模型", "", " m", "m@prod", "C:\\x"]


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:20])
def test_a_hostile_name_is_refused_with_a_short_clear_error_and_writes_nothing(registry, mlp, tmp_path, name):
    before = sorted(p for p in tmp_path.rglob("*") if "registry" not in p.parts or p.suffix != ".sqlite-shm")
    for call in (lambda: registry.register(name, mlp), lambda: registry.versions(name),
                 lambda: registry.aliases(name), lambda: registry.get(name, 1)):
        # 'm@prod' is read as name@alias where a reference is: then a version and an alias clash
        with pytest.raises(InvalidArgumentError, match="model name must be a str of 1-128 ASCII|not both") as refused:
            call()
        assert len(str(refused.value)) < 400 and "\n" not in str(refused.value)
    after = sorted(p for p in tmp_path.rglob("*") if "registry" not in p.parts or p.suffix != ".sqlite-shm")
    assert after == before and registry.names() == []


@pytest.mark.parametrize("alias", HOSTILE + ["1production", "p" * 65], ids=lambda n: repr(n)[:20])
def test_a_hostile_alias_is_refused_with_a_short_clear_error(three_versions, alias):
    with pytest.raises(InvalidArgumentError, match="alias must be a str that starts with a letter") as refused:
        three_versions.set_alias("m", alias, 1)
    assert len(str(refused.value)) < 400 and "\n" not in str(refused.value)
    assert three_versions.aliases("m") == {}


def test_hostile_text_in_metadata_is_stored_as_data_and_read_back_exactly(registry, mlp):
    text = "../../etc/passwd\x00\n'; DROP TABLE versions; --" + "é模" * 5000
    mv = registry.register("m", mlp, notes=text, tags={text: text}, params={"path": "/" + text})
    assert registry.get("m", mv.version).notes == text and registry.get("m").tags == {text: text}
    assert [p.name for p in registry.root.iterdir() if not p.name.startswith("index.sqlite")] == ["blobs"]


# -- a full disk -------------------------------------------------------------------------------------------------


def test_a_full_disk_during_register_is_a_registry_error_naming_the_file_and_loses_nothing(full_disk, seeded_mlp):
    reg = Registry(full_disk / "registry")
    error = None
    for seed in range(1000):
        try:
            reg.register("m", seeded_mlp(seed), notes="x" * 2000)
        except RegistryError as exc:
            error = exc
            break
    assert error is not None, "the 256 KiB disk never filled"
    assert "registry" in str(error) and ("index.sqlite" in str(error) or "blobs/" in str(error)), str(error)
    assert isinstance(error.__cause__, OSError) or "full" in str(error)
    reg.close()
    reg = Registry(full_disk / "registry")  # reopens on the still-full disk
    assert reg.check().ok
    listed = reg.versions("m")
    assert len(listed) == seed and [mv.version for mv in listed] == list(range(1, seed + 1))
    for mv in listed:
        reg.load_model("m", mv.version)
    reg.close()


# -- the command line: one line, exit 2, never a traceback ------------------------------------------------------


def run_cli(repo_root, *argv):
    return subprocess.run([sys.executable, "-m", "mvtk.registry", *argv], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv, expected", [
    (["show", "digits"], "NotFoundError: no model named 'digits'"),
    (["show", "m", "--version", "99999999999999999999"], "version must be a version number"),
    (["show", "m", "--version", "abc"], "UsageError: argument --version: invalid int value: 'abc'"),
    (["alias", "m", "production", "-3"], "version must be a version number"),
    (["rollback", "m", "../prod"], "alias must be a str"),
    (["diff", "m", "1", "x/y"], "b must be a str that starts with a letter"),
    (["list", "a\nb"], "model name must be a str"),
    (["frobnicate"], "UsageError: argument COMMAND: invalid choice"),
    (["alias", "m", "--remove"], "UsageError: alias NAME ALIAS --remove takes one alias and no version"),
    (["alias", "m", "production", "1", "--remove"], "UsageError: alias NAME ALIAS --remove takes one alias"),
    (["export", "--bundle", ""], "InvalidArgumentError: folder must be a str or os.PathLike"),
], ids=["unknown name", "huge version", "version not a number", "negative version", "bad alias", "bad diff ref",
        "newline in name", "unknown command", "remove without alias", "remove with a version", "empty bundle path"])
def test_a_mistake_on_the_command_line_is_one_line_and_exit_2(three_versions, repo_root, argv, expected):
    result = run_cli(repo_root, "--root", str(three_versions.root), *argv)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and expected in result.stderr, \
        result.stderr


def test_a_damaged_index_on_the_command_line_is_one_line_naming_the_file(three_versions, repo_root):
    root = three_versions.root
    three_versions.close()
    damage(root)
    result = run_cli(repo_root, "--root", str(root), "list")
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert f"RegistryError: registry index {str(root / 'index.sqlite')!r}" in result.stderr


def test_a_missing_root_on_the_command_line_is_one_line(tmp_path, repo_root):
    result = run_cli(repo_root, "--root", str(tmp_path / "nowhere"), "list")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "RegistryError: no registry at" in result.stderr and "nowhere" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_a_reader_that_stops_early_ends_the_command_line_quietly(three_versions, repo_root):
    # `... export | head -c1`, made certain: the reading end is closed before anything is written
    writer = subprocess.Popen([sys.executable, "-m", "mvtk.registry", "--root", str(three_versions.root), "export"],
                              cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdout.close()
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=120) in (0, 141) and err == "", err


def test_output_that_cannot_be_written_is_one_line_and_exit_2(three_versions, repo_root):
    if not os.path.exists("/dev/full"):
        pytest.skip("SKIPPED LOUDLY: no /dev/full on this system to stand for a full disk")
    with open("/dev/full", "w") as full:  # `... list > /dev/full`
        result = subprocess.run([sys.executable, "-m", "mvtk.registry", "--root", str(three_versions.root), "list"],
                                cwd=repo_root, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: OSError: cannot write the output") and "No space left" in result.stderr
