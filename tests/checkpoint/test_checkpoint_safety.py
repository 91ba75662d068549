"""Issue 14, the checkpoint half: every promise of Lesson 03's safety story holds at its edges.

Concurrent writers, refused loads that change nothing, private files, SIGKILLs during save_weights,
a resume pointer that lags, flipped bytes in weights files, signatures (tamper evidence, unlike the
in-file SHA-256), and clear mvtk.errors for bad arguments and a full disk.
"""
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from torch import nn

import mvtk.checkpoint as ckpt
from mvtk.checkpoint import (ModelCheckpoint, latest_checkpoint, load_checkpoint, load_key, load_weights,
                             read_checkpoint, save_checkpoint,
                             save_weights)
from mvtk.errors import (CheckpointError, IntegrityError, InvalidArgumentError, MvtkError,
                         SignatureError)
from mvtk.files import TEMP_NAME
from mvtk.models import MLP

SAVES_PER_WRITER = 20
KILLS = 16


def global_rng():
    """What the next draw of each global RNG would be, without consuming it."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    draws = torch.rand(2), random.random(), np.random.rand()
    torch.set_rng_state(states[0]), random.setstate(states[1]), np.random.set_state(states[2])
    return draws


def same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and a[1:] == b[1:]


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- item 4: concurrent writers --------------------------------------------------------------

def save_many(path, model, start, errors):
    for epoch in range(start, start + SAVES_PER_WRITER):
        try:
            save_checkpoint(path, model, epoch=epoch)
        except MvtkError as exc:  # a clear error is allowed; a raw one is not
            errors.put(f"clear: {exc}")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            errors.put(f"RAW {type(exc).__name__}: {exc}")
            os._exit(1)
    os._exit(0)


def test_two_processes_saving_the_same_path_each_succeed(tmp_path):
    context = multiprocessing.get_context("fork")
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # ~0.5 MB: saves overlap
    path = tmp_path / "shared.pt"
    errors = context.Queue()
    writers = [context.Process(target=save_many, args=(path, model, start, errors)) for start in (0, 1000)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert [w.exitcode for w in writers] == [0, 0], reported
    assert not reported, reported  # here every save must succeed: last one wins
    epoch = load_checkpoint(path, model)["epoch"]
    assert epoch in (SAVES_PER_WRITER - 1, 1000 + SAVES_PER_WRITER - 1)
    assert not list(tmp_path.glob(".*.tmp"))


# --- item 5: a refused load changes nothing --------------------------------------------------

@pytest.mark.parametrize("bad", [dict(loader_generator="x"), dict(optimizer="adam"), dict(scheduler=3),
                                 dict(restore_rng="yes"), dict(key="secret"), dict(name=7)])
def test_a_refused_load_changes_neither_weights_nor_rng(tmp_path, mlp, bad):
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    other = MLP(hidden=16)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    rng = global_rng()
    with pytest.raises(InvalidArgumentError):
        load_checkpoint(path, other, **bad)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert same_rng(global_rng(), rng)


def test_reading_metadata_does_not_touch_global_rng(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    rng = global_rng()
    assert load_checkpoint(path)["epoch"] == 1
    assert same_rng(global_rng(), rng)


def test_a_generator_without_loader_state_changes_nothing(tmp_path, mlp, loaders):
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)  # no loader_generator saved
    other = MLP(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    torch.manual_seed(11)
    rng = global_rng()
    with pytest.raises(CheckpointError, match="no DataLoader generator state"):
        load_checkpoint(path, other, loader_generator=loaders.train.generator)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert same_rng(global_rng(), rng)


# --- item 6: a private file stays private ----------------------------------------------------

def test_resaving_a_private_checkpoint_or_weights_file_keeps_it_private(tmp_path, mlp, key):
    for path, save in ((tmp_path / "c.pt", lambda p: save_checkpoint(p, mlp, epoch=1)),
                       (tmp_path / "c.pt.enc", lambda p: save_checkpoint(p, mlp, epoch=1, key=key)),
                       (tmp_path / "w.safetensors", lambda p: save_weights(p, mlp))):
        save(path)
        path.chmod(0o600)
        save(path)
        assert path.stat().st_mode & 0o777 == 0o600, path.name


# --- item 7: save_weights leaves no stray temporary file when killed -------------------------

def save_weights_forever(path, model, ready):
    while True:
        save_weights(path, model)
        ready.set()


def test_sigkill_while_saving_weights_leaves_only_abandoned_mvtk_temps(tmp_path):
    context = multiprocessing.get_context("fork")
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))  # ~8 MB
    path = save_weights(tmp_path / "w.safetensors", model)
    start = time.perf_counter()
    save_weights(path, model)
    period = time.perf_counter() - start  # kill anywhere within about one save
    pick, killed_mid_write = random.Random(0), 0
    for _ in range(KILLS):
        ready = context.Event()
        child = context.Process(target=save_weights_forever, args=(path, model, ready))
        child.start()
        assert ready.wait(60), "the child never finished a save"
        time.sleep(pick.uniform(0.0, period))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        stray = [p.name for p in tmp_path.iterdir() if p.name != "w.safetensors"]
        assert all(TEMP_NAME.fullmatch(name) for name in stray), f"files mvtk would never remove: {stray}"
        killed_mid_write += bool(stray)
        load_weights(path, model)  # the previous file is whole, and verified
    assert killed_mid_write > 0, "no kill landed during a write: the test did not test atomicity"
    save_weights(path, model)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# --- item 8: the newest complete checkpoint, even when last.pt lags --------------------------

def test_latest_checkpoint_finds_an_epoch_saved_after_the_last_pointer(tmp_path, mlp):
    checkpointer = ModelCheckpoint(tmp_path, mlp, save_top_k=-1, keep_last=-1)
    for epoch in (1, 2):
        checkpointer(epoch, {"val_loss": [1.0 / epoch]})
    # killed after writing epoch 3's file and before moving last.pt:
    save_checkpoint(tmp_path / checkpointer.filename(3, 0.3), mlp, epoch=3)
    found = latest_checkpoint(tmp_path)
    assert found.name == "epoch=0003-val_loss=0.3000.pt"
    assert load_checkpoint(found)["epoch"] == 3


def test_latest_checkpoint_skips_a_damaged_newer_file_and_signatures(tmp_path, mlp, keys):
    private, public, _, _ = keys
    checkpointer = ModelCheckpoint(tmp_path, mlp, save_top_k=-1, keep_last=-1, signing_key=private)
    for epoch in (1, 2):
        checkpointer(epoch, {"val_loss": [1.0 / epoch]})
    damaged = save_checkpoint(tmp_path / checkpointer.filename(3, 0.3), mlp, epoch=3)
    damaged.write_bytes(damaged.read_bytes()[:-40])
    assert latest_checkpoint(tmp_path).name == "last.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path, verify_key=public), mlp, verify_key=public)["epoch"] == 2
    unsigned = save_checkpoint(tmp_path / checkpointer.filename(4, 0.2), mlp, epoch=4)
    assert latest_checkpoint(tmp_path) == unsigned
    assert latest_checkpoint(tmp_path, verify_key=public).name == "last.pt"  # epoch 4 is not signed


def test_latest_checkpoint_where_every_file_is_damaged_is_an_error(tmp_path, mlp):
    path = save_checkpoint(tmp_path / "epoch=0001.pt", mlp, epoch=1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)


# --- item 3: a flipped byte in a weights file ------------------------------------------------

@pytest.mark.parametrize("where", [-1, -5000, 60])
def test_a_flipped_byte_in_a_weights_file_is_detected(tmp_path, mlp, where):
    path = save_weights(tmp_path / "w.safetensors", mlp)
    flip(path, where)  # in the tensor bytes (end, middle) or in the tensor index (header)
    other = MLP(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_weights(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_flipped_tensor_byte_is_an_integrity_error(tmp_path, mlp):
    path = save_weights(tmp_path / "w.safetensors", mlp)
    flip(path, -1)
    with pytest.raises(IntegrityError, match=r"'.*w.safetensors' failed its SHA-256 check"):
        load_weights(path)


def test_a_plain_safetensors_file_has_no_checksum_to_verify(tmp_path, mlp):
    import safetensors.torch
    safetensors.torch.save_file(mlp.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no SHA-256 record"):
        load_weights(tmp_path / "plain.safetensors", mlp)


def test_the_weights_checksum_key_is_reserved(tmp_path, mlp):
    with pytest.raises(InvalidArgumentError, match="reserved"):
        save_weights(tmp_path / "w.safetensors", mlp, metadata={ckpt.WEIGHTS_SHA256_KEY: "0" * 64})


# --- item 9: the checksum is no tamper check; a signature is ---------------------------------

def edit_and_reseal(path):
    """What anyone can do with the public API: change a weight, store a new checksum."""
    payload = read_checkpoint(path)
    payload["model"]["fc1.bias"] += 1.0
    import io
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(ckpt.seal(buffer.getvalue()))


def test_an_edited_and_resealed_checkpoint_passes_the_checksum_and_fails_the_signature(tmp_path, mlp, keys):
    private, public, _, _ = keys
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1, signing_key=private)
    assert ckpt.signature_path(path).is_file()
    assert load_checkpoint(path, MLP(hidden=16), verify_key=public)["epoch"] == 1
    edit_and_reseal(path)
    assert load_checkpoint(path)["epoch"] == 1  # the checksum is satisfied: it detects corruption only
    other = MLP(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(SignatureError, match="changed after it was signed"):
        load_checkpoint(path, other, verify_key=public)
    with pytest.raises(SignatureError):
        read_checkpoint(path, verify_key=public)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_missing_or_foreign_signature_is_refused(tmp_path, mlp, keys, key):
    private, public, _, other_public = keys
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1, signing_key=private)
    with pytest.raises(SignatureError, match="does not match key"):
        load_checkpoint(path, verify_key=other_public)
    ckpt.signature_path(path).unlink()
    with pytest.raises(SignatureError, match="no signature file"):
        load_checkpoint(path, verify_key=public)
    encrypted = save_checkpoint(tmp_path / "c.pt.enc", mlp, epoch=2, key=key, signing_key=private)
    assert load_checkpoint(encrypted, key=key, verify_key=public)["epoch"] == 2
    flip(encrypted, -3)
    with pytest.raises(SignatureError):
        load_checkpoint(encrypted, key=key, verify_key=public)


def test_a_planted_pickle_is_refused_by_the_signature_before_anything_is_unpickled(tmp_path, planted, keys):
    _, public, _, _ = keys
    evil, marker = planted
    sealed = tmp_path / "sealed_evil.pt"
    sealed.write_bytes(ckpt.seal(evil.read_bytes()))
    with pytest.raises(SignatureError):
        load_checkpoint(sealed, verify_key=public)
    assert not marker.exists()


def test_signed_weights_detect_an_edit_the_checksum_cannot(tmp_path, mlp, keys):
    import safetensors.torch
    private, public, _, _ = keys
    path = save_weights(tmp_path / "w.safetensors", mlp, signing_key=private)
    assert load_weights(path, MLP(hidden=16), verify_key=public)["model_class"] == "MLP"
    tensors = safetensors.torch.load_file(path)  # edit, then re-seal with the public weights_digest
    tensors["fc1.bias"] += 1.0
    meta = load_weights(path)
    del meta[ckpt.WEIGHTS_SHA256_KEY]
    data = safetensors.torch.save(tensors, metadata=meta)
    meta[ckpt.WEIGHTS_SHA256_KEY] = ckpt.weights_digest(data)
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    load_weights(path, MLP(hidden=16))  # the checksum passes
    with pytest.raises(SignatureError):
        load_weights(path, MLP(hidden=16), verify_key=public)


def test_model_checkpoint_signs_and_prunes_signatures(tmp_path, mlp, keys):
    private, public, _, _ = keys
    checkpointer = ModelCheckpoint(tmp_path / "run", mlp, save_top_k=1, keep_last=1, signing_key=private)
    for epoch, loss in ((1, 0.5), (2, 0.6), (3, 0.7)):
        checkpointer(epoch, {"val_loss": [loss]})
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["epoch=0001-val_loss=0.5000.pt", "epoch=0001-val_loss=0.5000.pt.sig",
                     "epoch=0003-val_loss=0.7000.pt", "epoch=0003-val_loss=0.7000.pt.sig", "last.pt"]
    latest = latest_checkpoint(tmp_path / "run", verify_key=public)
    assert load_checkpoint(latest, mlp, verify_key=public)["epoch"] == 3


def test_bad_signing_keys_are_named(tmp_path, mlp, keys):
    _, public, _, _ = keys
    with pytest.raises(InvalidArgumentError, match="signing_key must be an Ed25519 private key"):
        save_checkpoint(tmp_path / "c.pt", mlp, epoch=1, signing_key=public)
    with pytest.raises(InvalidArgumentError, match="verify_key must be an Ed25519 public key"):
        load_checkpoint(save_checkpoint(tmp_path / "c.pt", mlp, epoch=1), verify_key=b"key")
    with pytest.raises(InvalidArgumentError, match="signing_key"):
        save_weights(tmp_path / "w.safetensors", mlp, signing_key="private.pem")
    assert not (tmp_path / "w.safetensors").exists()


# --- item 10: clear errors instead of raw ones ----------------------------------------------

def test_a_binary_key_file_is_a_clear_error(tmp_path):
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe\x00\x81" * 8)
    with pytest.raises(InvalidArgumentError, match="bin.key.* is not base64 text"):
        load_key(tmp_path / "bin.key")


@pytest.mark.parametrize("call, match", [
    (lambda p, m: load_checkpoint(3, m), "path must be a str or os.PathLike"),
    (lambda p, m: load_checkpoint(b"c.pt", m), "path must be a str or os.PathLike"),
    (lambda p, m: load_checkpoint(p, "model"), "model must be a torch.nn.Module"),
    (lambda p, m: load_checkpoint(p, m, key=123), "key must be a 16, 24 or 32-byte AES key"),
    (lambda p, m: read_checkpoint(None), "path must be a str or os.PathLike"),
    (lambda p, m: load_weights(3.5, m), "path must be a str or os.PathLike"),
    (lambda p, m: load_weights(p, {"fc1.weight": 1}), "model must be a torch.nn.Module"),
    (lambda p, m: load_weights(p, m, device=0.5), "device must be a str or torch.device"),
    (lambda p, m: save_weights(None, m), "path must be a str or os.PathLike"),
    (lambda p, m: save_checkpoint(7, m, epoch=1), "path must be a str or os.PathLike"),
    (lambda p, m: ckpt.encrypt_bytes("text", ckpt.new_key(), "MLP"), "data must be bytes"),
    (lambda p, m: ckpt.encrypt_bytes(b"x", ckpt.new_key(), 5), "name must be a non-empty str"),
    (lambda p, m: ckpt.decrypt_bytes("text", ckpt.new_key()), "blob must be bytes"),
    (lambda p, m: ckpt.decrypt_bytes(ckpt.encrypt_bytes(b"x", b"k" * 32, "MLP"), b"k" * 32, 5), "name must be"),
    (lambda p, m: ckpt.encrypted_for(None), "blob must be bytes"),
    (lambda p, m: ckpt.seal("text"), "data must be bytes"),
    (lambda p, m: ckpt.unseal(None), "data must be bytes"),
    (lambda p, m: ckpt.seal(b"PK", "md5"), "algorithm must be one of"),
    (lambda p, m: ckpt.remove_stale_temps(5), "path must be a str or os.PathLike"),
    (lambda p, m: latest_checkpoint(None), "dirpath must be a str or os.PathLike"),
    (lambda p, m: ModelCheckpoint(None, m), "dirpath must be a str or os.PathLike"),
    (lambda p, m: ckpt.new_key(42), "key_file must be a str or os.PathLike"),
    (lambda p, m: load_key(42), "key_file must be a str or os.PathLike"),
    (lambda p, m: ckpt.check_state_dict_fits(m, [1, 2]), "state must be a dict"),
    (lambda p, m: ckpt.signature_path(None), "path must be a str or os.PathLike"),
    (lambda p, m: ckpt.new_signing_key(1, 2), "private_path must be a str or os.PathLike"),
])
def test_wrong_types_get_a_clear_error_naming_the_argument(tmp_path, mlp, call, match):
    path = save_checkpoint(tmp_path / "c.pt", mlp, epoch=1)
    save_weights(tmp_path / "c.pt.safetensors", mlp)
    target = path if "load_weights" not in repr(call) else tmp_path / "c.pt.safetensors"
    with pytest.raises(InvalidArgumentError, match=match):
        call(target, mlp)


def test_a_full_disk_during_save_checkpoint_keeps_the_old_file(full_disk, mlp):
    path = save_checkpoint(full_disk / "c.pt", mlp, epoch=1)
    big = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # ~0.5 MB: more than the disk holds
    with pytest.raises(CheckpointError, match=r"c\.pt'.*the disk is full \(ENOSPC\)"):
        save_checkpoint(path, big, epoch=2)
    assert load_checkpoint(path, mlp)["epoch"] == 1
    assert [p.name for p in full_disk.iterdir()] == ["c.pt"]


def test_a_full_disk_during_save_weights_keeps_the_old_file(full_disk, mlp):
    path = save_weights(full_disk / "w.safetensors", mlp, metadata={"run": "1"})
    big = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with pytest.raises(CheckpointError, match=r"w\.safetensors'.*the disk is full \(ENOSPC\)"):
        save_weights(path, big)
    assert load_weights(path, mlp)["run"] == "1"
    assert [p.name for p in full_disk.iterdir()] == ["w.safetensors"]

