"""Lesson 04, §6: loading verifies the SHA-256, check() finds damage and leftovers, gc() removes what is abandoned."""
import os
import stat
import subprocess

import pytest

from mvtk.errors import IntegrityError, RegistryError

ORPHAN_SHA = "ab" * 32


def temp_file(reg, pid):
    """A file as mvtk.files.atomic_write names its temporary: .<target>.<writer pid>-<random>.tmp."""
    path = reg.blob_path(ORPHAN_SHA).parent / f".{ORPHAN_SHA}.safetensors.{pid}-k3x9.tmp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half")
    return path


def test_a_tampered_blob_raises_integrity_error_on_load(registry, mlp):
    mv = registry.register("m", mlp)
    path = registry.blob_path(mv.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="do not match the SHA-256"):
        registry.load("m")
    assert registry.check().corrupt == ("m v1",)


def test_a_missing_blob_raises_registry_error_and_check_reports_it(registry, mlp):
    mv = registry.register("m", mlp)
    registry.blob_path(mv.sha256).unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.load("m")
    report = registry.check()
    assert report.missing == ("m v1",) and not report.ok


def test_registering_identical_weights_again_repairs_a_damaged_blob(registry, mlp):
    mv = registry.register("m", mlp)
    registry.blob_path(mv.sha256).write_bytes(b"damaged")
    registry.register("m", mlp)
    assert registry.check().ok


def test_gc_removes_orphan_blobs_and_temp_files_of_dead_writers(registry, mlp, dead_pid):
    registry.register("m", mlp)
    orphan = registry.blob_path(ORPHAN_SHA)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    temp = temp_file(registry, dead_pid)
    report = registry.check()
    assert report.ok and report.orphans == (f"blobs/ab/{ORPHAN_SHA}.safetensors",)
    assert report.temp_files == (f"blobs/ab/{temp.name}",)
    assert sorted(registry.gc()) == sorted(report.orphans + report.temp_files)
    report = registry.check()
    assert report.ok and not report.orphans and not report.temp_files and not temp.exists()


def test_a_live_writers_temp_file_is_neither_reported_nor_removed(registry, mlp):
    registry.register("m", mlp)
    writer = subprocess.Popen(["sleep", "60"])  # another process, still running: its write may be in progress
    try:
        temp = temp_file(registry, writer.pid)
        assert registry.check().temp_files == ()
        assert registry.gc() == [] and temp.exists()
        registry.delete_version("m", 1)  # runs gc() too
        assert temp.exists()
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("intruder", ["folder", "symlink", "fifo"])
def test_something_else_where_a_blob_should_be_is_reported_and_replaced_by_registering_again(
        registry, seeded_mlp, tmp_path, intruder, put_in_the_way):
    mv = registry.register("m", seeded_mlp(0))
    blob = registry.blob_path(mv.sha256)
    put_in_the_way(blob, intruder)
    assert registry.check().corrupt == ("m v1",)
    with pytest.raises(RegistryError, match=f"{blob.name} in registry .* is a .*not a regular file"):
        registry.load("m", 1)
    registry.register("m", seeded_mlp(0))  # the same weights again: repairs it
    assert stat.S_ISREG(os.lstat(blob).st_mode) and registry.check().ok
    assert registry.load("m", 1).keys() == seeded_mlp(0).state_dict().keys()
    if intruder == "symlink":
        assert (tmp_path / "elsewhere" / blob.name).read_bytes() == blob.read_bytes()  # the link's target untouched


def test_a_folder_holding_files_where_a_blob_should_be_is_refused_naming_it(registry, seeded_mlp):
    mv = registry.register("m", seeded_mlp(0))
    blob = registry.blob_path(mv.sha256)
    blob.unlink()
    blob.mkdir()
    (blob / "keep.txt").write_text("someone's file")
    with pytest.raises(RegistryError, match=f"{blob.name} .*a folder holding files stands there.*nothing was registered"):
        registry.register("m", seeded_mlp(0))
    assert (blob / "keep.txt").read_text() == "someone's file" and len(registry.versions("m")) == 1
