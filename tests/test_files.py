"""Writes are atomic: a failed write leaves the previous file as it was and no temporary file behind."""
import os

import pytest

from mvtk.errors import InvalidArgumentError
from mvtk.files import (abandoned_temps, atomic_write, remove_abandoned_temps, sha256_bytes, sha256_file,
                        write_bytes_atomic)


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "model.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_failed_write_keeps_the_previous_file_and_cleans_up(tmp_path):
    target = tmp_path / "model.bin"
    write_bytes_atomic(target, b"good")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_writing_to_a_folder_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        write_bytes_atomic(tmp_path, b"x")


def test_checksums_of_file_and_bytes_agree(tmp_path):
    path = write_bytes_atomic(tmp_path / "a", b"abc")
    assert sha256_file(path) == sha256_bytes(b"abc")


def test_checksum_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no such file"):
        sha256_file(tmp_path / "nothing.pt")


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "shared.bin", b"x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_an_existing_private_file_stays_private(tmp_path):
    path = write_bytes_atomic(tmp_path / "secret.key", b"old")
    path.chmod(0o600)
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


def test_a_temporary_file_is_abandoned_only_when_its_writer_has_exited(tmp_path, dead_pid):
    mine = tmp_path / f".model.pt.{os.getpid()}-abc123.tmp"
    parents = tmp_path / f".model.pt.{os.getppid()}-def456.tmp"  # another live process: maybe a save in progress
    dead = tmp_path / f".model.pt.{dead_pid}-abc123.tmp"
    for path in (mine, parents, dead, tmp_path / "model.pt"):
        path.write_bytes(b"x")
    assert abandoned_temps(tmp_path) == [dead]
    assert abandoned_temps(tmp_path, is_target=lambda name: name == "other.pt") == []
    assert remove_abandoned_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, parents.name, "model.pt"])


def test_the_temporary_file_names_its_target_and_writer_and_goes_on_an_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "model.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".model.pt.{os.getpid()}-")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
