"""Lesson 04, §7: `python -m mvtk.registry` lists, shows, diffs, moves aliases, exports and checks from the shell."""
import json
import subprocess
import sys

import mvtk.registry
import mvtk.registry.cli
from mvtk.registry import main


def cli(capsys, reg, *argv):
    code = main(["--root", str(reg.root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_names_and_versions(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "list")
    assert code == 0 and "m" in out and "production -> v2" in out
    code, out, _ = cli(capsys, three_versions, "list", "m")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == ["v1", "v2", "v3"]


def test_cli_shows_a_version_by_alias(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "show", "m@production")
    assert code == 0 and out.startswith("m v2") and "sha256:" in out


def test_cli_shows_a_version_by_number(three_versions, capsys):
    code, out, _ = cli(capsys, three_versions, "show", "m", "--version", "2")
    assert code == 0 and out.startswith("m v2")


def test_cli_sets_lists_and_rolls_back_aliases(three_versions, capsys):
    assert cli(capsys, three_versions, "alias", "m", "production", "1")[1].strip() == "m@production -> v1"
    cli(capsys, three_versions, "alias", "m", "production", "3")
    assert cli(capsys, three_versions, "alias", "m")[1].strip() == "production -> v3"
    assert cli(capsys, three_versions, "rollback", "m", "production")[1].strip() == "m@production -> v1"
    history = cli(capsys, three_versions, "alias", "m", "production")[1]
    assert [line.split()[1] for line in history.splitlines()[2:]] == ["set", "set", "rollback"]


def test_cli_promotes_staging_to_production(three_versions, capsys):
    three_versions.set_alias("m", "staging", 3)
    code, out, _ = cli(capsys, three_versions, "promote", "m")
    assert code == 0 and out.strip() == "m@production -> v3"
    assert three_versions.aliases("m") == {"production": 3, "staging": 3}
    code, out, _ = cli(capsys, three_versions, "promote", "m", "--source", "production", "--target", "canary")
    assert code == 0 and three_versions.aliases("m")["canary"] == 3


def test_cli_removes_an_alias(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "alias", "m", "production", "--remove")
    assert code == 0 and out.strip() == "removed m@production"
    assert three_versions.aliases("m") == {} and len(three_versions.versions("m")) == 3


def test_cli_uses_the_registry_named_by_the_environment(three_versions, capsys, monkeypatch):
    monkeypatch.setenv("MVTK_REGISTRY", str(three_versions.root))
    assert main(["list", "m"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["v1", "v2", "v3"]


def test_cli_diffs_two_versions(three_versions, capsys):
    code, out, _ = cli(capsys, three_versions, "diff", "m", "1", "2")
    assert code == 0 and out.startswith("m: v1 -> v2") and "changed" in out


def test_cli_exports_the_index(three_versions, capsys, tmp_path):
    code, out, _ = cli(capsys, three_versions, "export")
    assert code == 0 and json.loads(out)["format"] == "mvtk-registry-index/1"
    cli(capsys, three_versions, "export", "--output", str(tmp_path / "index.json"))
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(out)


def test_cli_reports_errors_on_stderr_in_one_line_with_exit_code_2(three_versions, capsys):
    code, out, err = cli(capsys, three_versions, "show", "digits")
    assert code == 2 and not out and "NotFoundError: no model named 'digits'" in err and err.count("\n") == 1


def test_cli_check_exits_1_when_a_blob_is_corrupt(three_versions, capsys):
    three_versions.blob_path(three_versions.get("m", 1).sha256).write_bytes(b"bad")
    code, out, _ = cli(capsys, three_versions, "check")
    assert code == 1 and "corrupt: m v1" in out


def test_cli_check_exits_0_on_a_sound_registry(three_versions, capsys):
    code, out, _ = cli(capsys, three_versions, "check")
    assert code == 0 and out.strip() == "3 versions checked: ok"


def test_the_command_line_drives_the_one_registry_class():
    assert mvtk.registry.cli.Registry is mvtk.registry.Registry


def test_cli_help_runs_as_a_module(repo_root):
    result = subprocess.run([sys.executable, "-m", "mvtk.registry", "--help"], cwd=repo_root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("list", "show", "diff", "alias", "promote", "rollback", "export", "check"):
        assert command in result.stdout


def test_cli_lists_a_registry_when_run_as_a_module(three_versions, repo_root):
    three_versions.set_alias("m", "production", 2)
    result = subprocess.run([sys.executable, "-m", "mvtk.registry", "--root", str(three_versions.root), "list"],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == str(three_versions.table()) + "\n" and "production -> v2" in result.stdout


def test_cli_export_never_writes_over_the_registrys_own_index(three_versions, capsys):
    code, out, err = cli(capsys, three_versions, "export", "--output", str(three_versions.index))
    assert code == 2 and not out and "is inside the registry folder" in err and err.count("\n") == 1
    assert three_versions.names() == ["m"] and three_versions.check().ok
    code, _, err = cli(capsys, three_versions, "export", "--bundle", str(three_versions.root / "blobs" / "b"), "m")
    assert code == 2 and "is inside the registry folder" in err and not (three_versions.root / "blobs" / "b").exists()


def test_cli_export_makes_no_missing_folder_and_replaces_another_file_only_with_force(three_versions, capsys,
                                                                                      tmp_path):
    code, _, err = cli(capsys, three_versions, "export", "--output", str(tmp_path / "nowhere" / "x.json"))
    assert code == 2 and "nowhere' does not exist" in err and not (tmp_path / "nowhere").exists()
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    code, _, err = cli(capsys, three_versions, "export", "--output", str(other))
    assert code == 2 and "exists already" in err and "--force" in err and other.read_text() == "keep me"
    code, out, _ = cli(capsys, three_versions, "export", "--output", str(other), "--force")
    assert code == 0 and json.loads(other.read_text())["format"] == "mvtk-registry-index/1"
