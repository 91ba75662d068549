"""Lesson 00's claims: seeding repeats results, the device is chosen in one place, versions are reported."""
import random

import numpy as np
import pytest
import torch

from mvtk.env import (DEFAULT_THREADS, MIN_TORCH, available_devices, check_torch_version, pick_device, run_dir, seed_everything,
                      versions)
from mvtk.errors import DeviceUnavailableError, InvalidArgumentError


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_same_seed_gives_the_same_random_numbers_everywhere():
    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first


def test_different_seeds_give_different_numbers():
    seed_everything(1)
    first = draw()
    seed_everything(2)
    assert draw() != first


def test_seeding_fixes_threads_and_deterministic_algorithms():
    seed_everything(0, threads=2)
    assert torch.get_num_threads() == 2
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(0)  # back to the course default
    assert torch.get_num_threads() == DEFAULT_THREADS == 1


def test_threads_none_leaves_torchs_thread_count_alone():
    try:
        torch.set_num_threads(3)
        seed_everything(0, threads=None)
        assert torch.get_num_threads() == 3
    finally:
        seed_everything(0)  # the course default, for the tests that follow


def test_deterministic_algorithms_only_warn():
    seed_everything(0)
    assert torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", True, None])
def test_bad_seed_is_refused(seed):
    with pytest.raises(InvalidArgumentError, match="seed"):
        seed_everything(seed)


def test_bad_thread_count_is_refused():
    with pytest.raises(InvalidArgumentError, match="threads"):
        seed_everything(0, threads=0)


def test_cpu_is_always_available_and_last():
    assert available_devices()[-1] == "cpu"


def test_pick_device_honours_the_environment_variable(monkeypatch):
    monkeypatch.setenv("MVTK_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_pick_device_auto_prefers_an_accelerator(monkeypatch):
    monkeypatch.delenv("MVTK_DEVICE", raising=False)
    assert pick_device().type == available_devices()[0]


def test_pick_device_agrees_with_torch_accelerator(monkeypatch):
    monkeypatch.delenv("MVTK_DEVICE", raising=False)
    expected = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    assert pick_device().type == expected.type


def test_any_accelerator_torch_reports_is_available(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("xpu"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    monkeypatch.delenv("MVTK_DEVICE", raising=False)
    assert available_devices() == ["xpu", "cpu"]
    assert pick_device() == torch.device("xpu")
    assert pick_device("xpu:1") == torch.device("xpu:1")
    with pytest.raises(DeviceUnavailableError, match="2 xpu device"):
        pick_device("xpu:2")
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        pick_device("cuda")


def test_the_environment_variable_wins_over_the_accelerator(monkeypatch):
    monkeypatch.setenv("MVTK_DEVICE", "cpu")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("mps"))
    assert pick_device() == torch.device("cpu")


def test_unknown_device_name_is_refused():
    with pytest.raises(InvalidArgumentError, match="unknown device 'tpu'"):
        pick_device("tpu")


def test_a_missing_device_gives_a_clear_error():
    missing = next(kind for kind in ("cuda", "mps") if kind not in available_devices())
    with pytest.raises(DeviceUnavailableError, match=missing):
        pick_device(missing)


def test_versions_report_names_torch_and_python():
    report = versions()
    assert report["torch"] == torch.__version__.split("+")[0] or report["torch"].startswith(torch.__version__[:4])
    assert report["python"].count(".") == 2


def test_versions_tell_the_cuda_build_from_the_gpus_present():
    report = versions()
    built = report["torch built for CUDA"]
    assert built == torch.version.cuda if torch.version.cuda else built.startswith("no")
    assert report["CUDA GPUs here"] == str(torch.cuda.device_count())
    kind = available_devices()[0]
    assert report["accelerator"].startswith("none" if kind == "cpu" else f"{kind} x ")


@pytest.mark.parametrize("version", ["2.9.1", "1.13.0+cpu"])
def test_old_torch_is_refused(version):
    with pytest.raises(InvalidArgumentError, match="too old"):
        check_torch_version(version)


def test_current_torch_is_accepted():
    check_torch_version()
    check_torch_version("2.14.1+cu130")


def test_run_dir_is_fresh_and_relative(tmp_path):
    folder = run_dir("03_save_load", root=tmp_path)
    (folder / "old.pt").write_text("x")
    assert list(run_dir("03_save_load", root=tmp_path).iterdir()) == []
    kept = run_dir("03_save_load", root=tmp_path)
    (kept / "keep.pt").write_text("x")
    assert (run_dir("03_save_load", root=tmp_path, fresh=False) / "keep.pt").exists()


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".."])
def test_run_dir_refuses_paths_that_leave_runs(name, tmp_path):
    with pytest.raises(InvalidArgumentError, match="lesson"):
        run_dir(name, root=tmp_path)


def test_check_torch_version_returns_the_parsed_version():
    assert check_torch_version("2.14.1+cu130") == (2, 14)
    assert check_torch_version() >= MIN_TORCH
