"""Writes are atomic: a failed write leaves the previous file as it was and no temporary file behind."""
import pytest

from mvtk.errors import InvalidArgumentError
from mvtk.files import atomic_write, sha256_bytes, sha256_file, write_bytes_atomic


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
    import os
    umask = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "shared.bin", b"x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
