"""Lesson 05's claims: the `module.` prefix trap and its fix, DDP set-up errors, and 2-process DDP under torchrun
trains the same model as one process with the same recipe."""
import os
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from mvtk import parallel
from mvtk.checkpoint import load_checkpoint, read_checkpoint
from mvtk.data import load_dataset, make_loaders
from mvtk.env import seed_everything
from mvtk.errors import ArchitectureMismatchError, InvalidArgumentError, ParallelError
from mvtk.models import MLP, MODELS, build_model
from mvtk.train import evaluate, fit


pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 5  # the recipe both the DDP run and the single-process run use
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="nn.DataParallel behaves as on a CPU-only machine")


@pytest.fixture
def alone(monkeypatch):
    """A process group of one in this process, torn down afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@no_gpu
def test_data_parallel_without_gpus_calls_the_plain_model(mlp):
    wrapped = parallel.wrap_data_parallel(mlp, "cpu")
    x = torch.randn(4, 1, 8, 8)
    assert wrapped.device_ids == []
    assert torch.equal(wrapped(x), mlp(x))


def test_wrapped_state_dict_keys_gain_the_module_prefix(mlp):
    keys = list(nn.DataParallel(mlp).state_dict())
    assert keys and all(key.startswith("module.") for key in keys)


def test_a_prefixed_state_dict_does_not_load_into_a_plain_model(mlp):
    with pytest.raises(RuntimeError, match="Missing key"):
        MLP(hidden=16).load_state_dict(nn.DataParallel(mlp).state_dict())


def test_unwrap_returns_the_model_inside_the_wrapper(mlp):
    assert parallel.unwrap(nn.DataParallel(mlp)) is mlp
    assert parallel.unwrap(mlp) is mlp


def test_strip_module_prefix_leaves_its_input_unchanged(mlp):
    prefixed = nn.DataParallel(mlp).state_dict()
    stripped = parallel.strip_module_prefix(prefixed)
    assert list(stripped) == list(mlp.state_dict())
    assert all(key.startswith("module.") for key in prefixed)


def test_load_state_dict_any_loads_a_wrapped_save_into_a_plain_model(mlp):
    plain = parallel.load_state_dict_any(MLP(hidden=16), nn.DataParallel(mlp).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), mlp.state_dict().values()))


def test_load_state_dict_any_loads_a_plain_save_into_a_wrapped_model(mlp):
    wrapped = parallel.load_state_dict_any(nn.DataParallel(MLP(hidden=16)), mlp.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(wrapped.module.state_dict().values(), mlp.state_dict().values()))


def test_load_state_dict_any_names_keys_that_do_not_fit(mlp):
    with pytest.raises(ArchitectureMismatchError, match="fc1.weight"):
        parallel.load_state_dict_any(MLP(hidden=64), nn.DataParallel(mlp).state_dict())


def test_strip_module_prefix_rejects_a_non_mapping():
    with pytest.raises(InvalidArgumentError, match="mapping"):
        parallel.strip_module_prefix([("module.w", torch.zeros(1))])


def test_an_unknown_backend_is_a_parallel_error():
    with pytest.raises(ParallelError, match="unknown backend 'mpi'"):
        parallel.check_launch("mpi", 2, "cpu")


def test_more_processes_than_gpus_is_a_parallel_error():
    with pytest.raises(ParallelError, match="2 processes were asked for but this machine has 1 GPU"):
        parallel.check_launch("nccl", 2, "cuda", gpus=1)


def test_nccl_on_the_cpu_is_a_parallel_error():
    with pytest.raises(ParallelError, match="nccl"):
        parallel.check_launch("nccl", 1, "cpu")


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_a_process_count_that_is_not_a_positive_int_is_a_parallel_error(bad):
    with pytest.raises(ParallelError, match="nproc.*must be a positive int"):
        parallel.check_launch("gloo", bad, "cpu")
    with pytest.raises(ParallelError, match="nproc must be a positive int"):
        parallel.torchrun_command(nproc=bad)
    with pytest.raises(ParallelError, match="nnodes must be a positive int"):
        parallel.torchrun_command(nnodes=bad)
    with pytest.raises(InvalidArgumentError, match="batch_size must be a positive int"):
        parallel.shard_loader(range(4), bad, shuffle=False, num_replicas=1, rank=0)


def test_gloo_on_the_cpu_may_run_many_processes():
    parallel.check_launch("gloo", 8, "cpu", gpus=0)


def test_the_script_offers_every_course_model():
    assert all(parallel.build_parser().parse_args(["--model", name]).model == name for name in MODELS)


def test_choose_backend_picks_nccl_for_gpus_and_gloo_otherwise():
    assert (parallel.choose_backend("cuda"), parallel.choose_backend("cpu")) == ("nccl", "gloo")


def test_the_script_rejects_a_bad_backend_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as stopped:
        parallel.main(["--backend", "mpi", "--device", "cpu"])
    assert stopped.value.code == 2
    assert "unknown backend 'mpi'" in capsys.readouterr().err


def test_the_script_has_help(capsys):
    with pytest.raises(SystemExit) as stopped:
        parallel.main(["--help"])
    assert stopped.value.code == 0
    assert "--nproc_per_node" in capsys.readouterr().out


def test_torchrun_command_for_one_machine_is_standalone():
    command = parallel.torchrun_command(["--epochs", 3], nproc=2, program=["torchrun"])
    assert command == ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "mvtk.parallel", "--epochs", "3"]


def test_torchrun_command_for_many_machines_meets_at_the_endpoint():
    command = parallel.torchrun_command(nproc=4, nnodes=2, rdzv_endpoint="node0:29400", program=["torchrun"])
    assert "--nnodes=2" in command and "--rdzv-backend=c10d" in command and "--rdzv-endpoint=node0:29400" in command
    assert "--standalone" not in command


def test_many_machines_without_an_endpoint_is_a_parallel_error():
    with pytest.raises(ParallelError, match="HOST:PORT"):
        parallel.torchrun_command(nproc=2, nnodes=2)


def test_distributed_samplers_with_one_seed_split_the_data_without_overlap():
    data = load_dataset("digits", "train")
    shards = [list(parallel.shard_loader(data, 16, shuffle=True, seed=0, num_replicas=2, rank=r).sampler)
              for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(len(data)))


def test_set_epoch_reshuffles_and_forgetting_it_repeats_the_order():
    sampler = DistributedSampler(range(100), num_replicas=2, rank=0, seed=0)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    assert first == again and list(sampler) != first


def test_all_reduce_mean_weights_each_rank_by_its_samples(monkeypatch):
    def all_reduce(totals, op):  # this rank's [value * weight, weight] plus another rank's: 1.0 over 30 samples
        assert op == dist.ReduceOp.SUM
        totals += torch.tensor([1.0 * 30, 30.0], dtype=totals.dtype)

    monkeypatch.setattr(parallel.dist, "all_reduce", all_reduce)
    # (0.25 * 10 + 1.0 * 30) / 40, not the unweighted (0.25 + 1.0) / 2
    assert parallel.all_reduce_mean(0.25, 10) == pytest.approx(0.8125)


class FakeTorchrun:
    """Stands in for subprocess.Popen: torchrun that failed with `output` on stderr."""

    def __init__(self, command, output, seen, **kwargs):
        seen.update(command=command, threads=kwargs["env"]["OMP_NUM_THREADS"], session=kwargs["start_new_session"])
        self.pid, self.returncode, self.output = 0, 1, output

    def communicate(self, timeout=None):
        return "", self.output


def test_launch_names_the_workers_error_when_torchrun_fails(monkeypatch):
    seen = {}
    output = ("[rank1]: Traceback (most recent call last):\n[rank1]:   ...\n"
              "ValueError: the data set is empty\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    monkeypatch.setattr(parallel.subprocess, "Popen", lambda command, **kwargs: FakeTorchrun(command, output, seen,
                                                                                            **kwargs))
    with pytest.raises(ParallelError, match=r"exited with code 1: ValueError: the data set is empty \| "
                                            r"torch\.distributed\.elastic.*ChildFailedError"):
        parallel.launch(["--epochs", 1], nproc=2, threads=3)
    assert seen["command"][-3:] == ["mvtk.parallel", "--epochs", "1"] and seen["threads"] == "3" and seen["session"]


def test_launch_kills_torchrun_and_its_workers_when_time_is_up(monkeypatch, tmp_path):
    """A hung run: launch kills the whole process group it started, the workers included, not only torchrun."""
    pid_file = tmp_path / "worker.pid"
    hung = ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]  # a 'worker' in the background, then wait
    monkeypatch.setattr(parallel, "torchrun_command", lambda *args, **kwargs: hung)
    with pytest.raises(ParallelError, match="still running after 3 s"):
        parallel.launch(["--epochs", 1], timeout=3)
    worker = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # killed at once; the reaper may take a moment
            os.kill(worker, 0)
            time.sleep(0.1)


def test_torchrun_command_adds_max_restarts_and_a_rendezvous_endpoint():
    command = parallel.torchrun_command(["--epochs", 3], max_restarts=1, rdzv_endpoint="127.0.0.1:29555",
                                        program=["torchrun"])
    assert "--max-restarts=1" in command and "--rdzv-endpoint=127.0.0.1:29555" in command
    assert "--standalone" not in command and "--max-restarts" not in " ".join(parallel.torchrun_command(["--epochs", 3]))
    with pytest.raises(ParallelError, match="max_restarts must be a whole number"):
        parallel.torchrun_command(max_restarts=-1)


def test_free_port_is_a_port_nothing_listens_on():
    port = parallel.free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rank_zero_saves_a_checkpoint_that_load_checkpoint_opens(alone, tmp_path, name):
    """Every course model trains: the script feeds each one images of the size it takes."""
    metrics = parallel.train_ddp(model_name=name, epochs=1, out=tmp_path, device="cpu")
    meta = load_checkpoint(tmp_path / parallel.CHECKPOINT_NAME, build_model(name), restore_rng=False)
    assert meta["epoch"] == 1 and meta["extra"]["world_size"] == 1 and meta["extra"]["model"] == name
    assert meta["metrics"]["test_acc"] == pytest.approx(metrics["test_acc"])
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def single_process_accuracy():
    """One process, the DDP run's recipe: same initial weights, epochs, global batch 32, Adam lr and sample order."""
    seed_everything(0, threads=1)
    reference = build_model("mlp")
    train = load_dataset("digits", "train")
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
    loaders = make_loaders()
    fit(reference, DataLoader(train, batch_size=32, sampler=sampler), loaders.val, epochs=EPOCHS, progress=False,
        on_epoch_end=lambda epoch, _history: sampler.set_epoch(epoch))
    return evaluate(reference, loaders.test).accuracy


@pytest.mark.slow
def test_two_process_ddp_under_torchrun_matches_one_process(tmp_path, single_process_accuracy):
    result = parallel.launch(["--epochs", EPOCHS, "--batch-size", 32, "--device", "cpu", "--out", tmp_path / "ddp"],
                             nproc=2, cwd=tmp_path, timeout=300)
    assert "rank 1/2" in result.stdout
    ddp_model = MLP()
    meta = load_checkpoint(tmp_path / "ddp" / parallel.CHECKPOINT_NAME, ddp_model, restore_rng=False)
    assert meta["extra"]["world_size"] == 2 and meta["epoch"] == EPOCHS
    ddp_accuracy = evaluate(ddp_model, make_loaders().test).accuracy
    assert abs(ddp_accuracy - single_process_accuracy) <= 0.01


def test_train_ddp_checks_its_recipe_before_joining_a_group(alone, tmp_path):
    with pytest.raises(InvalidArgumentError, match="epochs"):
        parallel.train_ddp(epochs=0, out=tmp_path, device="cpu")
    with pytest.raises(ParallelError, match="unknown backend"):
        parallel.train_ddp(epochs=1, out=tmp_path, device="cpu", backend="mpi")
    assert not dist.is_initialized()


# --- a restarted run resumes from rank 0's checkpoint (issue 16) --------------------------------------

def same(one, other) -> bool:
    """Equal nested states: tensors bit for bit (torch.equal), everything else with ==."""
    if isinstance(one, torch.Tensor):
        return isinstance(other, torch.Tensor) and torch.equal(one, other)
    if isinstance(one, dict):
        return isinstance(other, dict) and one.keys() == other.keys() and all(same(one[k], other[k]) for k in one)
    if isinstance(one, (list, tuple)):
        return len(one) == len(other) and all(same(a, b) for a, b in zip(one, other))
    return one == other


def run_state(folder, name="mlp_v2"):
    """Everything a checkpoint of the DDP script holds, but its time stamps and speeds."""
    payload = read_checkpoint(folder / parallel.CHECKPOINT_NAME)
    payload["metrics"].pop("samples_per_s")
    return {key: payload[key] for key in ("model", "optimizer", "scheduler", "rng", "epoch", "history", "metrics")} | {
        "rank_rng": payload["extra"]["rank_rng"]}


def test_a_stopped_run_resumes_and_ends_equal_to_an_uninterrupted_one(alone, tmp_path, capsys):
    """mlp_v2 has dropout: the resumed run is equal only if the weights, Adam's moments and the RNG come back."""
    parallel.train_ddp(model_name="mlp_v2", epochs=2, out=tmp_path / "straight", device="cpu")
    parallel.train_ddp(model_name="mlp_v2", epochs=1, out=tmp_path / "stopped", device="cpu")
    assert "resumes after" not in capsys.readouterr().out
    parallel.train_ddp(model_name="mlp_v2", epochs=2, out=tmp_path / "stopped", device="cpu")
    assert "rank 0/1: resumes after epoch 1 from last.pt" in capsys.readouterr().out
    assert same(run_state(tmp_path / "stopped"), run_state(tmp_path / "straight"))


def test_a_finished_run_trains_nothing_more(alone, tmp_path, capsys):
    first = parallel.train_ddp(epochs=1, out=tmp_path, device="cpu")
    again = parallel.train_ddp(epochs=1, out=tmp_path, device="cpu")
    assert "already holds epoch 1 of 1: nothing to train" in capsys.readouterr().out
    assert again["test_acc"] == first["test_acc"] and not dist.is_initialized()


def test_the_checkpoint_of_another_recipe_is_refused(alone, tmp_path):
    parallel.train_ddp(epochs=1, out=tmp_path, device="cpu", schedule="cosine")
    with pytest.raises(ParallelError, match=r"another run \(seed 0, now 1; epochs 1, now 2\)"):
        parallel.train_ddp(epochs=2, seed=1, out=tmp_path, device="cpu", schedule="cosine")
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_killed_rank_under_max_restarts_resumes_and_ends_equal_to_an_uninterrupted_run(tmp_path):
    """Real torchrun, gloo, 2 processes: rank 1 dies halfway through epoch 2; torchrun restarts the group."""
    args = ["--model", "mlp_v2", "--epochs", 2, "--schedule", "cosine", "--device", "cpu"]
    parallel.launch([*args, "--out", tmp_path / "straight"], nproc=2, threads=1, cwd=tmp_path, timeout=300)
    result = parallel.launch([*args, "--out", tmp_path / "killed", "--fail-at-epoch", 2], nproc=2, threads=1,
                             cwd=tmp_path, timeout=300, max_restarts=1,
                             rdzv_endpoint=f"127.0.0.1:{parallel.free_port()}")
    lines = result.stdout.splitlines()
    assert "rank 1: --fail-at-epoch 2: exiting halfway through epoch 2 (test hook)" in lines
    assert {f"rank {r}/2: resumes after epoch 1 from last.pt" for r in (0, 1)} <= {
        line.partition(" (")[0] for line in lines}
    assert sum("restart count 1" in line for line in lines) == 2
    assert same(run_state(tmp_path / "killed"), run_state(tmp_path / "straight"))


@pytest.mark.slow
def test_batch_norm_breaks_the_equality_of_two_shards_and_one_batch_and_synced_statistics_restore_it(tmp_path):
    result = parallel.launch("mvtk.parallel:compare_batch_norm", nproc=2, threads=1, cwd=tmp_path, timeout=300)
    gaps = parallel.returned_values(result)
    assert sorted(gaps) == [0, 1]
    for rank_gaps in gaps.values():
        assert rank_gaps["batchnorm"] > 1e-3  # each rank normalised its own 16 samples
        assert rank_gaps["allreduce_batchnorm"] < 1e-5  # statistics over all 32: float rounding only
        sync = rank_gaps["sync_batchnorm"]
        assert sync < 1e-5 if isinstance(sync, float) else "GPU" in sync  # torch refuses SyncBatchNorm on CPU


# --- any training function or script under torchrun, not only the course's models (issue 15) ---------

USER_MODULE = '''
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from mvtk.parallel import shard_loader
from mvtk.train import evaluate, train_one_epoch


def train(rank, world_size, epochs=3, seed=0):
    """A regression MLP (1 output, float targets) on random data, trained with DDP."""
    torch.manual_seed(seed)  # the same data and initial weights on every rank
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    ddp = DistributedDataParallel(model)
    data = TensorDataset(x, y)
    loader = shard_loader(data, 32, shuffle=True, seed=seed)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    before = evaluate(model, DataLoader(data, batch_size=64)).mse
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        train_one_epoch(ddp, loader, optimizer)
    after = evaluate(model, DataLoader(data, batch_size=64)).mse
    return {"world_size": world_size, "mse_before": before, "mse": after,
            "weights": [round(v, 6) for p in model.parameters() for v in p.detach().flatten()[:4].tolist()]}
'''

USER_SCRIPT = '''
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"script rank {rank}/{world} args {sys.argv[1:]} sum {total.item():.0f}", flush=True)
dist.destroy_process_group()
'''


def test_torchrun_command_runs_a_script_a_module_or_a_function():
    flags = ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert parallel.torchrun_command("train.py", "--epochs", 3, program=["torchrun"]) == flags + ["train.py", "--epochs", "3"]
    assert parallel.torchrun_command("pkg.train", "--lr", 0.1, program=["torchrun"]) == flags + ["-m", "pkg.train", "--lr", "0.1"]
    assert parallel.torchrun_command("pkg.train:main", kwargs={"epochs": 3}, program=["torchrun"]) == flags + [
        "-m", "mvtk.parallel", "run", "pkg.train:main", "--kwargs-json", '{"epochs": 3}']


@pytest.mark.parametrize("call, match", [
    (lambda: parallel.torchrun_command("pkg.train:main", "--epochs", 3), "takes keyword arguments"),
    (lambda: parallel.torchrun_command("train.py", kwargs={"epochs": 3}), "kwargs go to a function target"),
    (lambda: parallel.torchrun_command("not a target!"), "target must be a script"),
    (lambda: parallel.torchrun_command("pkg.m:f", kwargs={"model": object()}), "JSON-serialisable"),
    (lambda: parallel.launch("missing.py"), "no training script at"),
])
def test_targets_and_arguments_that_cannot_run_are_refused(call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        call()


def test_run_function_calls_the_users_function_in_a_group_of_one(alone, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_fn_alone.py").write_text("def fn(rank, world_size, x=0):\n    return [rank, world_size, x]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parallel.run_function("user_fn_alone:fn", {"x": 5}) == [0, 1, 5]
    assert parallel.returned_values(capsys.readouterr().out) == {0: [0, 1, 5]}
    assert not dist.is_initialized()


def test_the_runner_names_a_function_it_cannot_find(alone, tmp_path, monkeypatch, capsys):
    (tmp_path / "user_fn_missing.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        parallel.main(["run", "user_fn_missing:train"])
    assert stopped.value.code == 2 and "has no function 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parallel.main(["run", "user_fn_missing:train", "--kwargs-json", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_of_a_users_function_through_the_launcher(tmp_path):
    """A regression MLP in the user's own module, 2 processes, gloo on the CPU: every rank ends with the same model."""
    (tmp_path / "user_ddp_train.py").write_text(USER_MODULE)
    result = parallel.launch("user_ddp_train:train", nproc=2, cwd=tmp_path, threads=1, timeout=180,
                             kwargs={"epochs": 10})
    values = parallel.returned_values(result)
    assert sorted(values) == [0, 1] and values[0] == values[1]  # replicas identical after DDP
    assert values[0]["world_size"] == 2 and values[0]["mse"] < values[0]["mse_before"] / 2  # it learned


@pytest.mark.slow
def test_two_process_run_of_a_users_script_through_the_launcher(tmp_path):
    (tmp_path / "user_script.py").write_text(USER_SCRIPT)
    result = parallel.launch("user_script.py", "--epochs", 1, nproc=2, cwd=tmp_path, threads=1, timeout=180)
    # Both workers share torchrun's stdout, so one rank's line can land in the middle of the other's.
    lines = sorted(re.findall(r"script rank \d/\d args \[[^\]]*\] sum \d+", result.stdout))
    assert lines == ["script rank 0/2 args ['--epochs', '1'] sum 3", "script rank 1/2 args ['--epochs', '1'] sum 3"]
