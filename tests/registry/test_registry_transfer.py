"""Lesson 04, §7: versions move between registries with weights, records, aliases and history, verified."""
import json
import os
import sys
import threading

import pytest
import torch

from mvtk.checkpoint import new_signing_key
from mvtk.errors import IntegrityError, InvalidArgumentError, RegistryError, SignatureError
from mvtk.registry import Registry, main


@pytest.fixture
def source(three_versions):
    """'m' v1-v3 with production moved twice and a program on v3's weights registered as 'seq'."""
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "production", 2)
    three_versions.set_alias("m", "staging", 3)
    return three_versions


def test_a_new_name_arrives_with_its_numbers_aliases_and_history(source, tmp_path):
    folder = source.export_versions(tmp_path / "bundle")
    with Registry(tmp_path / "target") as target:
        result = target.import_versions(folder)
        assert result.versions == {"m": {1: 1, 2: 2, 3: 3}} and result.aliases == {"m": {"production": 2, "staging": 3}}
        assert target.aliases("m") == source.aliases("m")
        assert [(e.alias, e.action, e.version) for e in target.alias_history("m")] == \
            [(e.alias, e.action, e.version) for e in source.alias_history("m")]
        for v in (1, 2, 3):
            want, got = source.load("m", v), target.load("m", v)
            assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert target.get("m", 2).init_args == source.get("m", 2).init_args
        assert target.rollback("m", "production").version == 1  # the history came too
        assert type(target.load_model("m", 3)).__name__ == "MLP"


def test_an_existing_name_gets_new_numbers_and_a_clear_mapping(source, tmp_path, seeded_mlp):
    folder = source.export_versions(tmp_path / "bundle", "m")
    with Registry(tmp_path / "target") as target:
        target.register("m", seeded_mlp(7))
        target.set_alias("m", "production", 1)
        result = target.import_versions(folder)
        assert result.versions == {"m": {1: 2, 2: 3, 3: 4}} and result.skipped_aliases == {"m": ("production", "staging")}
        assert "m v1 -> m v2" in str(result)
        assert target.aliases("m") == {"production": 1}  # the target's own aliases are left alone
        assert torch.equal(target.load("m", 4)["fc1.weight"], source.load("m", 3)["fc1.weight"])


def test_edited_weights_are_refused_before_anything_is_written(source, tmp_path):
    folder = source.export_versions(tmp_path / "bundle")
    blob = next((folder / "blobs").glob("*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with Registry(tmp_path / "target") as target:
        with pytest.raises(IntegrityError, match="does not match its SHA-256"):
            target.import_versions(folder)
        assert target.names() == [] and not list((target.root / "blobs").rglob("*.safetensors"))


def test_an_edited_manifest_is_refused(source, tmp_path):
    folder = source.export_versions(tmp_path / "bundle")
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["models"]["m"]["versions"][0]["metrics"] = {"acc": 0.99}
    (folder / "bundle.json").write_text(json.dumps(manifest))
    with Registry(tmp_path / "target") as target:
        with pytest.raises(IntegrityError, match="bundle.json does not match"):
            target.import_versions(folder)
        assert target.names() == []


def test_a_signed_bundle_catches_an_edit_whose_checksum_was_recomputed(tmp_path, seeded_mlp):
    import hashlib

    private, public = new_signing_key(tmp_path / "k.key", tmp_path / "k.pub")
    with Registry(tmp_path / "source", signing_key=private) as signed:
        signed.register("m", seeded_mlp(0))
        folder = signed.export_versions(tmp_path / "bundle")
    data = (folder / "bundle.json").read_bytes().replace(b'"notes": ""', b'"notes": "edited"')
    (folder / "bundle.json").write_bytes(data)
    (folder / "bundle.json.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  bundle.json\n")
    with Registry(tmp_path / "target", verify_key=public) as target:
        with pytest.raises(SignatureError):
            target.import_versions(folder)
        assert target.names() == []


def test_signatures_travel_and_renumbered_versions_are_signed_again(tmp_path, seeded_mlp):
    private, public = new_signing_key(tmp_path / "k.key", tmp_path / "k.pub")
    with Registry(tmp_path / "source", signing_key=private) as signed:
        signed.register("m", seeded_mlp(0))
        folder = signed.export_versions(tmp_path / "bundle")
    with Registry(tmp_path / "target", signing_key=private, verify_key=public) as target:
        target.import_versions(folder)                       # new name: the original signature holds
        target.import_versions(folder)                       # again: v2, signed by this registry
        assert [mv.version for mv in target.versions("m")] == [1, 2]
        assert target.load("m", 2) and target.check().ok


def test_export_refuses_an_existing_folder(source, tmp_path):
    (tmp_path / "bundle").mkdir()
    with pytest.raises(InvalidArgumentError, match="exists already"):
        source.export_versions(tmp_path / "bundle")


def test_programs_travel_with_their_versions(registry, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.rand(2, 3)
    registry.register("seq", model, program_example=(x,))
    folder = registry.export_versions(tmp_path / "bundle")
    with Registry(tmp_path / "target") as target:
        target.import_versions(folder)
        torch.testing.assert_close(target.load_model("seq")(x), model(x))


def test_the_command_line_exports_and_imports(source, tmp_path, capsys):
    assert main(["--root", str(source.root), "export", "m", "--bundle", str(tmp_path / "bundle")]) == 0
    assert main(["--root", str(tmp_path / "target"), "import", str(tmp_path / "bundle")]) == 0
    out = capsys.readouterr().out
    assert "m v3 -> m v3" in out and "m@production -> v2" in out
    assert main(["--root", str(source.root), "export", "m"]) == 2  # a name without --bundle
    assert sys.modules["mvtk.registry.cli"]


@pytest.mark.parametrize("intruder", ["fifo", "folder"])
def test_a_bundle_file_that_is_not_a_file_is_refused_not_waited_on(three_versions, tmp_path, intruder):
    folder = three_versions.export_versions(tmp_path / "bundle")
    manifest = folder / "bundle.json"
    manifest.unlink()
    os.mkfifo(manifest) if intruder == "fifo" else manifest.mkdir()
    outcome = []

    def attempt():
        try:
            Registry(tmp_path / "target").import_versions(folder)
        except Exception as exc:  # noqa: BLE001 - the test asserts what it was
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)  # reading a fifo with no writer would wait forever
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "import_versions is waiting on a fifo"
    assert isinstance(outcome[0], RegistryError) and "bundle.json is not a file" in str(outcome[0])
