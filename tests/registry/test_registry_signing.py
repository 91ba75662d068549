"""Lesson 04, §6: signed versions. A SHA-256 detects corruption; only a signature detects a deliberate edit.

The attacker here can write the registry folder and use public tools (safetensors, the stdlib's
sqlite3), but lacks the private key: editing a blob and storing its new SHA-256 in the index passes
the checksum and fails the signature.
"""
import hashlib
import json
import pickle
import sqlite3

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mvtk.checkpoint.signing import load_public_key, new_signing_key
from mvtk.errors import InvalidArgumentError, SignatureError
from mvtk.registry import Registry, main
from mvtk.registry.records import version_statement


@pytest.fixture
def keys(tmp_path):
    """(private key path, public key path) of a fresh Ed25519 pair."""
    return new_signing_key(tmp_path / "keys" / "registry.key", tmp_path / "keys" / "registry.pub")


@pytest.fixture
def other_keys(tmp_path):
    return new_signing_key(tmp_path / "other" / "other.key", tmp_path / "other" / "other.pub")


@pytest.fixture
def signed(tmp_path, keys, seeded_mlp):
    """A registry whose 'm' v1 and v2 were registered with the signing key; production -> v1."""
    with Registry(tmp_path / "registry", signing_key=keys[0]) as reg:
        reg.register("m", seeded_mlp(0), metrics={"val_acc": 0.9})
        reg.register("m", seeded_mlp(1), metrics={"val_acc": 0.8}, parent=1)
        reg.set_alias("m", "production", 1)
    return tmp_path / "registry"


def tamper_weights(root, name="m", version=1) -> str:
    """What an attacker without the key can do: edit the weights, store them, record their new SHA-256."""
    db = sqlite3.connect(root / "index.sqlite")
    (sha,) = db.execute("SELECT sha256 FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
    reg = Registry(root)
    tensors = safetensors_load(reg.blob_path(sha).read_bytes())
    tensors["fc2.bias"] = tensors["fc2.bias"] + 10.0  # every prediction moves
    data = safetensors_save(tensors)
    new_sha = hashlib.sha256(data).hexdigest()
    reg.blob_path(new_sha).parent.mkdir(parents=True, exist_ok=True)
    reg.blob_path(new_sha).write_bytes(data)
    reg.close()
    with db:
        db.execute("UPDATE versions SET sha256 = ? WHERE name = ? AND version = ?", (new_sha, name, version))
    db.close()
    return new_sha


def test_a_signed_version_loads_every_way_with_the_verify_key(signed, keys):
    with Registry(signed, verify_key=keys[1]) as reg:
        mv = reg.get("m", 1)
        assert mv.signature and "signature: " + mv.signature in mv.describe()
        assert torch.equal(reg.load("m", 1)["fc2.bias"], reg.load("m@production")["fc2.bias"])
        assert reg.load_model("m", alias="production").fc2.bias.shape == (10,)
        assert reg.diff("m", 1, "production").unchanged
        exported = json.loads(reg.export())
        assert all(v["signature"] for v in exported["models"]["m"]["versions"])
        report = reg.check()
        assert report.ok and report.unsigned == () and report.bad_signature == ()


def test_an_edited_blob_with_a_recomputed_sha256_passes_the_checksum_but_fails_the_signature(signed, keys):
    tamper_weights(signed)
    with Registry(signed) as unverified:  # the checksum alone: the edit goes through unnoticed
        assert unverified.check().ok
        assert float(unverified.load("m", 1)["fc2.bias"].min()) > 5.0
    with Registry(signed, verify_key=keys[1]) as reg:
        for load in (lambda: reg.load("m", 1), lambda: reg.load("m@production"),
                     lambda: reg.load_model("m", alias="production"), lambda: reg.diff("m", 1, 2), reg.export):
            with pytest.raises(SignatureError, match=r"m v1 in registry .*signature does not match"):
                load()
        assert torch.equal(reg.load("m", 2)["fc1.weight"], reg.load("m", 2)["fc1.weight"])  # v2 is untouched
        report = reg.check()
        assert not report.ok and report.bad_signature == ("m v1",) and report.corrupt == ()


def test_an_edited_metric_or_architecture_fails_the_signature(signed, keys):
    db = sqlite3.connect(signed / "index.sqlite")
    with db:
        db.execute("UPDATE versions SET metrics = ? WHERE version = 2", (json.dumps({"val_acc": 0.99}),))
    db.close()
    with Registry(signed, verify_key=keys[1]) as reg, pytest.raises(SignatureError, match="m v2"):
        reg.load("m", 2)


def test_an_unsigned_version_is_refused_when_a_verify_key_is_given(tmp_path, keys, mlp):
    with Registry(tmp_path / "registry") as reg:
        reg.register("m", mlp)
    with Registry(tmp_path / "registry", verify_key=keys[1]) as reg:
        with pytest.raises(SignatureError, match="m v1 .* is not signed"):
            reg.load("m")
        assert reg.check().unsigned == ("m v1",) and not reg.check().ok


def test_a_version_signed_by_another_key_is_refused(tmp_path, keys, other_keys, mlp):
    with Registry(tmp_path / "registry", signing_key=other_keys[0]) as reg:
        reg.register("m", mlp)
    with Registry(tmp_path / "registry", verify_key=load_public_key(keys[1])) as reg:
        with pytest.raises(SignatureError, match="does not match key"):
            reg.load_model("m")
        assert reg.check().bad_signature == ("m v1",)


def test_the_signature_signs_the_whole_record(signed, keys):
    reg = Registry(signed)
    statement = version_statement(reg.get("m", 2))
    reg.close()
    assert statement.startswith(b"mvtk-registry-version/1\n")
    fields = json.loads(statement.split(b"\n", 1)[1])
    assert fields["name"] == "m" and fields["version"] == 2 and fields["parent"] == 1
    assert fields["metrics"] == {"val_acc": 0.8} and len(fields["sha256"]) == 64 and "signature" not in fields


def test_a_registry_written_before_signing_opens_and_gains_the_column(tmp_path, mlp, keys):
    with Registry(tmp_path / "registry") as reg:
        reg.register("m", mlp)
    db = sqlite3.connect(tmp_path / "registry" / "index.sqlite")
    db.execute("ALTER TABLE versions DROP COLUMN signature")  # the schema as an older mvtk wrote it
    db.close()
    with Registry(tmp_path / "registry", signing_key=keys[0], verify_key=keys[1]) as reg:
        assert reg.get("m", 1).signature is None
        reg.register("m", mlp)
        assert reg.load("m", 2) and reg.check().unsigned == ("m v1",)


def test_keys_travel_with_a_pickled_registry(signed, keys):
    reg = pickle.loads(pickle.dumps(Registry(signed, signing_key=keys[0], verify_key=keys[1])))
    assert reg.verify_key is not None and reg.register("m", torch.nn.Linear(2, 2)).signature
    tamper_weights(signed, version=1)
    with pytest.raises(SignatureError):
        reg.load("m", 1)


@pytest.mark.parametrize("given", [42, b"key-bytes"])
def test_a_key_that_is_not_a_key_or_a_path_is_refused(tmp_path, given):
    with pytest.raises(InvalidArgumentError, match="verify_key must be an Ed25519 public key"):
        Registry(tmp_path / "registry", verify_key=given)


def test_a_public_key_given_as_the_signing_key_is_refused(tmp_path, keys):
    with pytest.raises(InvalidArgumentError, match="private key"):
        Registry(tmp_path / "registry", signing_key=keys[1])


def test_the_command_line_checks_signatures_with_verify_key(signed, keys, capsys):
    assert main(["--root", str(signed), "--verify-key", str(keys[1]), "check"]) == 0
    tamper_weights(signed)
    capsys.readouterr()
    assert main(["--root", str(signed), "--verify-key", str(keys[1]), "check"]) == 1
    assert "bad signature: m v1" in capsys.readouterr().out
    assert main(["--root", str(signed), "--verify-key", str(keys[1]), "diff", "m", "1", "2"]) == 2
    assert "SignatureError: m v1" in capsys.readouterr().err
