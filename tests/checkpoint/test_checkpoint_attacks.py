"""An outside tester's attacks on mvtk.checkpoint's public API (issue 14): each defect found, pinned.

Key pairs that destroyed themselves, re-saves of signed files that a SIGKILL left unverifiable,
tied weights, and messages that blamed the file for a bad argument or hid what was wrong.
"""
import multiprocessing
import os
import random
import signal
import time

import blake3
import pytest
import torch
from torch import nn

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import (LAST_NAME, ModelCheckpoint, latest_checkpoint, load_checkpoint, load_private_key,
                             load_public_key, load_weights, new_signing_key, read_checkpoint, read_signature,
                             save_checkpoint, save_weights, signature_path, verify_file)
from mvtk.errors import (CheckpointError, DeviceUnavailableError, IntegrityError, InvalidArgumentError,
                         SignatureError)
from mvtk.files import TEMP_NAME, sha256_file
from mvtk.models import MLP

KILLS = 12


# --- 1: new_signing_key never destroys a key ------------------------------------------------

@pytest.mark.parametrize("public", ["kk", "./kk", "sub/../kk"])
def test_new_signing_key_refuses_one_file_for_both_halves(tmp_path, monkeypatch, public):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"private_path 'kk' and public_path .* are the same file"):
        new_signing_key("kk", public)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # nothing written


def test_new_signing_key_refuses_an_existing_public_key(tmp_path):
    new_signing_key(tmp_path / "k1", tmp_path / "k1.pub")
    before = (tmp_path / "k1.pub").read_bytes()
    with pytest.raises(InvalidArgumentError, match=r"public key file '.*k1\.pub' already exists"):
        new_signing_key(tmp_path / "k3", tmp_path / "k1.pub")
    assert (tmp_path / "k1.pub").read_bytes() == before
    assert not (tmp_path / "k3").exists()
    assert ckpt.key_id(load_private_key(tmp_path / "k1")) == ckpt.key_id(load_public_key(tmp_path / "k1.pub"))


def test_new_signing_key_leaves_no_private_key_when_the_public_one_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(InvalidArgumentError, match="a_file"):
        new_signing_key(tmp_path / "k", tmp_path / "a_file" / "k.pub")
    assert not (tmp_path / "k").exists()


# --- 2: a re-save of a signed file is verifiable at every instant ---------------------------

def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 256))  # ~5 MB


def resave_forever(save, path, model, private, ready):
    epoch = 0
    while True:
        epoch += 1
        with torch.no_grad():
            model[1].bias.fill_(float(epoch))  # new content every save
        save(path, model, epoch, private)
        ready.set()


def save_signed_checkpoint(path, model, epoch, private):
    save_checkpoint(path, model, epoch=epoch, signing_key=private)


def save_signed_weights(path, model, epoch, private):
    save_weights(path, model, metadata={"epoch": str(epoch)}, signing_key=private)


def kill_loop(tmp_path, target, args, check):
    """Run `target(*args(i), ready)` in a forked child, SIGKILL it at random points of a save KILLS times, `check()` after each.

    Returns how many kills landed while a temporary file was being written.
    """
    context = multiprocessing.get_context("fork")
    pick, mid_write, period = random.Random(0), 0, None
    for kill in range(KILLS):
        ready = context.Event()
        child = context.Process(target=target, args=(*args(kill), ready))
        started = time.perf_counter()
        child.start()
        assert ready.wait(120), "the child never finished a save"
        period = period or (time.perf_counter() - started)  # about one save (plus the fork)
        time.sleep(pick.uniform(0.0, period))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        mid_write += any(TEMP_NAME.fullmatch(p.name) for p in tmp_path.rglob(".*.tmp"))
        check()
    return mid_write


@pytest.mark.parametrize("kind", ["checkpoint", "weights"])
def test_sigkill_while_resaving_a_signed_file_leaves_it_verifiable(tmp_path, keys, kind):
    private, public, _, _ = keys
    model = big_model()
    save = save_signed_checkpoint if kind == "checkpoint" else save_signed_weights
    path = tmp_path / ("m.pt" if kind == "checkpoint" else "m.safetensors")
    save(path, model, 0, private)

    def check():
        verify_file(path, public)
        if kind == "checkpoint":
            read_checkpoint(path, verify_key=public)
        else:
            load_weights(path, verify_key=public)

    assert kill_loop(tmp_path, resave_forever, lambda kill: (save, path, model, private), check) > 0, \
        "no kill landed during a write: the test did not test the re-save"
    save(path, model, 99, private)
    assert len(read_signature(path)) == 1  # a completed save leaves only its own record


def checkpoint_forever(dirpath, model, private, start, ready):
    checkpointer = ModelCheckpoint(dirpath, model, monitor=None, save_top_k=1, keep_last=1, signing_key=private)
    for epoch in range(start, start + 10_000):
        checkpointer(epoch, {"loss": [1.0 / epoch]})
        ready.set()


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_sigkill_during_model_checkpoint_keeps_last_and_latest_verifiable(tmp_path, keys, monkeypatch, link):
    private, public, _, _ = keys
    if link == "hard link":  # as on Windows without developer mode: last.pt.sig is a copy of its target's
        monkeypatch.setattr(os, "symlink", lambda *a, **k: (_ for _ in ()).throw(OSError("no symlinks")))
    run, model = tmp_path / "run", big_model()
    ModelCheckpoint(run, model, monitor=None, signing_key=private)(1, {"loss": [1.0]})

    def check():
        last = run / LAST_NAME
        assert read_checkpoint(last, verify_key=public)["epoch"] >= 1
        latest = latest_checkpoint(run, verify_key=public)
        assert read_checkpoint(latest, verify_key=public)["epoch"] >= read_checkpoint(last)["epoch"]

    args = lambda kill: (run, model, private, 100 * (kill + 1))  # noqa: E731 - each child resumes later epochs
    assert kill_loop(run, checkpoint_forever, args, check) > 0


def test_resaving_an_older_epoch_keeps_last_pointing_at_a_file(tmp_path, mlp):
    checkpointer = ModelCheckpoint(tmp_path, mlp, monitor=None)
    for epoch in (1, 2, 3):
        checkpointer(epoch, {"loss": [1.0]})
    ModelCheckpoint(tmp_path, mlp, monitor=None)(2, {"loss": [1.0]})  # a run resumed from epoch 1 (3 was bad)
    assert load_checkpoint(tmp_path / LAST_NAME)["epoch"] == 2


# --- 2 and 5: how a signature file reads ----------------------------------------------------

def test_a_failed_signed_save_leaves_no_signature_behind(tmp_path, mlp, keys):
    private, _, _, _ = keys
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(InvalidArgumentError, match="it is a folder"):
        save_checkpoint(tmp_path / "dir.pt", mlp, epoch=1, signing_key=private)
    assert not (tmp_path / "dir.pt.sig").exists()


def test_a_failed_signed_resave_puts_the_signature_back(tmp_path, mlp, keys, monkeypatch):
    private, public, _, _ = keys
    path = save_weights(tmp_path / "w.safetensors", mlp, signing_key=private)
    before = signature_path(path).read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="the disk is full"):
        save_weights(path, MLP(hidden=16), signing_key=private)
    monkeypatch.undo()
    assert signature_path(path).read_bytes() == before
    load_weights(path, verify_key=public)


def test_a_signature_with_several_records_needs_one_that_verifies_and_matches(tmp_path, mlp, keys):
    private, public, other, _ = keys
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    digest = "blake3:" + blake3.blake3(path.read_bytes()).hexdigest()
    ckpt.write_signature(path, [ckpt.file_record("blake3:" + "0" * 64, private), ckpt.file_record(digest, other)])
    with pytest.raises(SignatureError, match="changed after it was signed"):  # the only match is another key's
        verify_file(path, public)
    ckpt.write_signature(path, [ckpt.file_record("blake3:" + "0" * 64, private), ckpt.file_record(digest, private)])
    assert verify_file(path, public) == digest
    ckpt.write_signature(path, [ckpt.file_record(digest, other)])
    with pytest.raises(SignatureError, match="does not match key"):
        verify_file(path, public)


def test_a_signature_in_the_earlier_one_record_format_still_verifies(tmp_path, mlp, keys):
    import json
    private, public, _, _ = keys
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    record = ckpt.file_record(sha256_file(path), private)  # 64 bare hex digits: a SHA-256, as versions before 2
    assert set(record) == {"sha256", "key_id", "signature"}
    signature_path(path).write_text(json.dumps({"algorithm": "ed25519", **record}))
    assert load_checkpoint(path, verify_key=public)["epoch"] == 1
    assert verify_file(path, public) == "sha256:" + sha256_file(path)


def test_signed_weights_verify_with_a_sha256_record_of_an_earlier_version(tmp_path, mlp, keys):
    private, public, _, _ = keys
    path = save_weights(tmp_path / "w.safetensors", mlp, signing_key=private)
    assert set(read_signature(path)[0]) == {"blake3", "key_id", "signature"}
    ckpt.write_signature(path, [ckpt.file_record("sha256:" + sha256_file(path), private)])
    assert load_weights(path, MLP(hidden=16), verify_key=public)["format"] == "mvtk-weights"


@pytest.mark.parametrize("digest", ["0" * 63, "md5:" + "0" * 64, "blake3:" + "0" * 63 + "G", None, b"0" * 64])
def test_a_malformed_digest_is_named(keys, digest):
    with pytest.raises(InvalidArgumentError, match="digest must be a labelled digest"):
        ckpt.file_record(digest, keys[0])


# --- 3: tied weights stay tied --------------------------------------------------------------

class Tied(nn.Module):
    """A language-model head whose output layer shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.out = nn.Linear(6, 12, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_stay_tied_through_save_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = save_weights(tmp_path / "tied.safetensors", model)
    fresh = Tied()
    load_weights(path, fresh)
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight) and torch.equal(fresh.out.weight, model.out.weight)


def test_tied_weights_stay_tied_through_save_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = save_checkpoint(tmp_path / "tied.pt", model, epoch=1)
    fresh = Tied()
    load_checkpoint(path, fresh)
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight) and torch.equal(fresh.out.weight, model.out.weight)


# --- 4: messages that say what is wrong ------------------------------------------------------

@pytest.mark.parametrize("device, error, match", [
    ("bogus", InvalidArgumentError, "device 'bogus' is not a device"),
    ("cuda:99", DeviceUnavailableError, "device 'cuda:99' was asked for"),
    pytest.param("cuda", DeviceUnavailableError, "device 'cuda' was asked for",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_bad_device_is_named_not_blamed_on_the_file(tmp_path, mlp, device, error, match):
    weights = save_weights(tmp_path / "c.st", mlp)
    checkpoint = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    with pytest.raises(error, match=match) as caught:
        load_weights(weights, MLP(hidden=16), device=device)
    assert "c.st" not in str(caught.value)
    with pytest.raises(error, match="map_location" + match[len("device"):]):
        load_checkpoint(checkpoint, MLP(hidden=16), map_location=device)


@pytest.mark.parametrize("kind, match", [
    ("symlink", "is a symbolic link; refusing it"),
    ("folder", "is a folder, not a signature file"),
    ("fifo", "is not a regular file"),
])
def test_a_signature_that_is_no_regular_file_is_named(tmp_path, mlp, keys, kind, match):
    private, public, _, _ = keys
    path = save_checkpoint(tmp_path / "M.pt", mlp, epoch=1, signing_key=private)
    real = signature_path(path).rename(tmp_path / "elsewhere.sig")
    if kind == "symlink":
        signature_path(path).symlink_to(real)
    elif kind == "folder":
        signature_path(path).mkdir()
    else:
        os.mkfifo(signature_path(path))
    with pytest.raises(SignatureError, match=r"M\.pt\.sig' " + match) as caught:
        load_checkpoint(path, verify_key=public)
    assert "has no signature file" not in str(caught.value)


def test_a_flipped_byte_in_a_weights_header_reads_as_damage(tmp_path, mlp):
    path = save_weights(tmp_path / "w.safetensors", mlp)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[20] ^= 0x01  # inside the key "__metadata__"
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"w\.safetensors' is damaged") as caught:
        load_weights(path, MLP(hidden=16))
    for offset in range(8 + int.from_bytes(data[:8], "little")):  # every byte of the header
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError) as caught:
            load_weights(path, MLP(hidden=16))
        assert isinstance(caught.value, IntegrityError) or "damaged" in str(caught.value), (offset, caught.value)
        assert "w.safetensors" in str(caught.value)


# --- 5: the same classes elsewhere: arguments named, not blamed on the files -----------------

@pytest.mark.parametrize("kwargs, match", [
    ({"key": "not a key"}, "key must be a 16, 24 or 32-byte AES key"),
    ({"verify_key": b"public.pem"}, "verify_key must be an Ed25519 public key"),
])
def test_latest_checkpoint_names_a_bad_key_instead_of_failing_every_file(tmp_path, mlp, kwargs, match):
    save_checkpoint(tmp_path / "epoch=0001.pt", mlp, epoch=1)
    with pytest.raises(InvalidArgumentError, match=match):
        latest_checkpoint(tmp_path, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"key": b"short"}, "key must be a 16, 24 or 32-byte AES key"),
    ({"signing_key": "private.pem"}, "signing_key must be an Ed25519 private key"),
    ({"name": 5}, "name must be a non-empty str"),
])
def test_model_checkpoint_refuses_bad_arguments_before_the_first_epoch(tmp_path, mlp, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ModelCheckpoint(tmp_path, mlp, **kwargs)
