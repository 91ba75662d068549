"""Lesson 04, §7: the index exports as stable, sorted JSON that changes only where the registry did."""
import difflib
import json

import pytest

from mvtk.errors import InvalidArgumentError


def test_export_is_stable_sorted_json_that_changes_only_where_the_registry_did(three_versions, tmp_path):
    reg = three_versions
    reg.set_alias("m", "production", 1)
    first = reg.export(tmp_path / "index.json")
    assert first == reg.export() == (tmp_path / "index.json").read_text()
    data = json.loads(first)
    assert [v["version"] for v in data["models"]["m"]["versions"]] == [1, 2, 3]
    reg.set_alias("m", "production", 2)
    lines = difflib.unified_diff(first.splitlines(), reg.export().splitlines(), lineterm="", n=0)
    changed = [line for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    removed = [line[1:].strip() for line in changed if line.startswith("-")]
    added = [line[1:].strip() for line in changed if line.startswith("+")]
    assert removed == ['"production": 1'] and '"production": 2' in added  # plus the new history entry
    assert len(added) <= 12


def test_export_holds_every_field_but_the_name_tensor_order_and_module_tree(three_versions):
    data = json.loads(three_versions.export())
    version = data["models"]["m"]["versions"][0]
    assert "name" not in version and "tensor_keys" not in version and "modules" not in version
    assert {"sha256", "architecture", "metrics", "params", "tags", "notes", "parent", "created", "git_commit",
            "torch_version", "mvtk_version", "data_fingerprint", "version", "signature", "class_path", "init_args",
            "program_sha256"} == set(version)
    assert version["class_path"] == "mvtk.models:MLP" and version["init_args"]["hidden"] == 16
    assert version["signature"] is None  # registered without a signing key


# -- where an export may be written: outside the registry, never over another file, no folders made ---------------


def index_state(reg):
    return reg.names(), [mv.sha256 for mv in reg.versions("m")], reg.check().ok


@pytest.mark.parametrize("inside", ["index.sqlite", "new.json", "blobs/new.json", "blobs/../index.sqlite", "."])
def test_export_refuses_any_path_inside_the_registry_folder(three_versions, inside):
    before = index_state(three_versions)
    with pytest.raises(InvalidArgumentError, match="is inside the registry folder"):
        three_versions.export(three_versions.root / inside, overwrite=True)
    assert index_state(three_versions) == before and not (three_versions.root / "new.json").exists()


def test_export_refuses_a_symlink_that_leads_into_the_registry(three_versions, tmp_path):
    link = tmp_path / "index.json"
    link.symlink_to(three_versions.index)
    with pytest.raises(InvalidArgumentError, match="is inside the registry folder"):
        three_versions.export(link, overwrite=True)
    assert index_state(three_versions)[2] and link.is_symlink()


def test_export_replaces_an_earlier_export_but_another_file_only_with_overwrite(three_versions, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(InvalidArgumentError, match=r"notes\.txt' exists already.*overwrite=True"):
        three_versions.export(other)
    assert other.read_text() == "keep me"
    three_versions.export(other, overwrite=True)
    three_versions.set_alias("m", "production", 1)
    three_versions.export(other)  # an earlier export: replaced, as re-exporting for a git diff does
    assert json.loads(other.read_text())["models"]["m"]["aliases"] == {"production": 1}


def test_export_makes_no_missing_folder(three_versions, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"the folder '.*nowhere/deeper' does not exist"):
        three_versions.export(tmp_path / "nowhere" / "deeper" / "index.json")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("where, expected", [("inside", "is inside the registry folder"),
                                             ("in blobs", "is inside the registry folder"),
                                             ("no parent", "does not exist")])
def test_a_bundle_goes_outside_the_registry_into_a_folder_that_exists(three_versions, tmp_path, where, expected):
    folder = {"inside": three_versions.root / "bundle", "in blobs": three_versions.root / "blobs" / "bundle",
              "no parent": tmp_path / "nowhere" / "bundle"}[where]
    with pytest.raises(InvalidArgumentError, match=expected):
        three_versions.export_versions(folder)
    assert not folder.exists() and not (tmp_path / "nowhere").exists() and three_versions.check().orphans == ()
