"""Lesson 03's claims about encryption at rest: AES-GCM hides the weights, refuses a wrong key or a changed file."""
import pytest
import torch

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import load_checkpoint, load_key, new_key, read_checkpoint, save_checkpoint
from mvtk.errors import DecryptionError, InvalidArgumentError
from mvtk.models import MLP


def test_encrypted_round_trip(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.pt.enc", mlp, epoch=2, key=key, name="digits-mlp")
    other = MLP(hidden=16)
    meta = load_checkpoint(path, other, key=key, name="digits-mlp")
    torch.testing.assert_close(other.state_dict(), mlp.state_dict(), rtol=0, atol=0)
    assert meta["epoch"] == 2 and meta["encrypted_for"] == "digits-mlp"


def test_the_header_names_the_model_it_was_encrypted_for(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.pt.enc", mlp, epoch=2, key=key, name="digits-mlp")
    assert ckpt.encrypted_for(path.read_bytes()) == "digits-mlp"


def test_an_encrypted_file_does_not_show_the_weights(tmp_path, mlp, key):
    weight_bytes = mlp.fc1.weight.detach().numpy().tobytes()[:64]
    plain = save_checkpoint(tmp_path / "c.pt", mlp, epoch=2)
    encrypted = save_checkpoint(tmp_path / "c.pt.enc", mlp, epoch=2, key=key)
    assert weight_bytes in plain.read_bytes() and weight_bytes not in encrypted.read_bytes()
    with pytest.raises(Exception):
        torch.load(encrypted, weights_only=True)


def test_every_save_uses_a_fresh_nonce(tmp_path, mlp, key):
    first = save_checkpoint(tmp_path / "a.enc", mlp, epoch=1, key=key, name="m").read_bytes()
    second = save_checkpoint(tmp_path / "b.enc", mlp, epoch=1, key=key, name="m").read_bytes()
    start = len(ckpt.ENCRYPTED_MAGIC) + 2 + 1
    assert first[start:start + ckpt.NONCE_BYTES] != second[start:start + ckpt.NONCE_BYTES]


def test_a_wrong_key_is_refused(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.enc", mlp, epoch=1, key=key)
    with pytest.raises(DecryptionError, match="wrong key, or the file was changed"):
        load_checkpoint(path, mlp, key=new_key())


def test_a_tampered_encrypted_file_is_refused(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.enc", mlp, epoch=1, key=key)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match="AES-GCM authentication failed"):
        load_checkpoint(path, mlp, key=key)


def test_a_relabelled_encrypted_file_is_refused(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.enc", mlp, epoch=1, key=key, name="aaa")
    path.write_bytes(path.read_bytes().replace(b"aaa", b"bbb", 1))
    with pytest.raises(DecryptionError, match="authentication failed"):
        load_checkpoint(path, mlp, key=key, name="bbb")


def test_another_models_file_is_refused(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.enc", mlp, epoch=1, key=key, name="digits-mlp")
    with pytest.raises(DecryptionError, match="encrypted for model 'digits-mlp', not 'digits-cnn'"):
        load_checkpoint(path, mlp, key=key, name="digits-cnn")


def test_an_encrypted_file_without_a_key_says_so(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.enc", mlp, epoch=1, key=key)
    with pytest.raises(DecryptionError, match="is encrypted: pass key="):
        load_checkpoint(path, mlp)


def test_a_plain_file_put_in_place_of_an_encrypted_one_is_refused(tmp_path, mlp, key):
    path = save_checkpoint(tmp_path / "c.pt.enc", MLP(hidden=16), epoch=1)  # an attacker's unencrypted file
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(DecryptionError, match=r"c.pt.enc' is not encrypted, but a key was given"):
        load_checkpoint(path, mlp, key=key, name="digits-mlp")
    with pytest.raises(DecryptionError, match="is not encrypted, but a key was given"):
        read_checkpoint(path, key=key)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_keys_come_from_a_key_file_or_the_environment(tmp_path, monkeypatch):
    key = new_key(tmp_path / "secret.key")
    assert load_key(tmp_path / "secret.key") == key
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(ckpt.KEY_ENV_VAR, (tmp_path / "secret.key").read_text())
    assert load_key() == key


def test_key_problems_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv(ckpt.KEY_ENV_VAR, raising=False)
    with pytest.raises(InvalidArgumentError, match="no encryption key: set \\$MVTK_CHECKPOINT_KEY"):
        load_key()
    monkeypatch.setenv(ckpt.KEY_ENV_VAR, "c2hvcnQ=")
    with pytest.raises(InvalidArgumentError, match="must be a 16, 24 or 32-byte AES key, got 5"):
        load_key()
    new_key(tmp_path / "k")
    with pytest.raises(InvalidArgumentError, match="already exists; refusing to overwrite"):
        new_key(tmp_path / "k")
    with pytest.raises(InvalidArgumentError, match="key file .* does not exist"):
        load_key(tmp_path / "missing.key")


