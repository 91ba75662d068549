"""Lesson 04, §7: the index exports as stable, sorted JSON that changes only where the registry did."""
import difflib
import json


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


def test_export_holds_every_field_but_the_name_and_tensor_order(three_versions):
    data = json.loads(three_versions.export())
    version = data["models"]["m"]["versions"][0]
    assert "name" not in version and "tensor_keys" not in version
    assert {"sha256", "architecture", "metrics", "params", "tags", "notes", "parent", "created", "git_commit",
            "torch_version", "mvtk_version", "data_fingerprint", "version", "signature"} == set(version)
    assert version["signature"] is None  # registered without a signing key
