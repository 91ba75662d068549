"""Lesson 04's claims about the model registry: versions count up, aliases move and are logged,
rollback undoes, diff explains, loading verifies, and concurrent or killed writers never corrupt it."""
import difflib
import json
import multiprocessing
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import mvtk.registry
from mvtk.data import fingerprint, load_dataset
from mvtk.errors import ArchitectureMismatchError, IntegrityError, InvalidArgumentError, NotFoundError, RegistryError
from mvtk.files import atomic_write, sha256_file
from mvtk.models import MLP, MLPv2, SmallCNN
from mvtk.registry import Registry, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry") as reg:
        yield reg


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(hidden=16)


def linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def blobs(reg):
    return sorted(p.name for p in (reg.root / "blobs").glob("*/*.safetensors"))


# -- versions and metadata ------------------------------------------------------------------------------------


def test_versions_count_up_from_one_per_name(registry):
    numbers = [registry.register("a", small_mlp(i)).version for i in range(3)]
    assert numbers == [1, 2, 3]
    assert registry.register("b", small_mlp()).version == 1
    assert registry.names() == ["a", "b"]


def test_version_numbers_are_never_reused_after_a_delete(registry):
    registry.register("a", small_mlp(0))
    registry.register("a", small_mlp(1))
    registry.delete_version("a", 2)
    assert registry.register("a", small_mlp(2)).version == 3
    assert [v.version for v in registry.versions("a")] == [1, 3]


def test_register_records_checksum_versions_time_data_and_notes(registry):
    train = load_dataset("digits", "train")
    mv = registry.register("digits", small_mlp(), metrics={"acc": 0.9}, params={"lr": 3e-3}, tags={"team": "a"},
                           notes="first", dataset=train)
    assert mv.sha256 == sha256_file(registry.blob_path(mv.sha256))
    assert (mv.torch_version, mv.metrics, mv.params, mv.tags, mv.notes) == (
        torch.__version__, {"acc": 0.9}, {"lr": 3e-3}, {"team": "a"}, "first")
    assert mv.data_fingerprint == fingerprint(train)
    assert mv.mvtk_version and mv.created.endswith("+00:00")
    assert registry.get("digits", 1) == mv


def test_git_commit_of_the_working_tree_is_recorded(registry, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "train.py").write_text("print('hi')\n")
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "code"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    assert registry.register("digits", small_mlp()).git_commit == head


def test_git_commit_is_none_outside_a_working_tree(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    assert registry.register("digits", small_mlp()).git_commit is None


def test_identical_weights_are_stored_once(registry):
    model = small_mlp()
    first = registry.register("a", model)
    second = registry.register("b", model)
    assert first.sha256 == second.sha256
    assert len(blobs(registry)) == 1


@pytest.mark.parametrize("model", [MLP(hidden=16), MLPv2(hidden=32, dropout=0.1), SmallCNN(channels=(4, 8), hidden=16)],
                         ids=["mlp", "mlp_v2", "cnn"])
def test_architecture_is_inferred_and_load_model_rebuilds_it(registry, model):
    registry.register("m", model)
    loaded = registry.load_model("m")
    x = torch.rand(3, 1, 16, 16) if isinstance(model, SmallCNN) else torch.rand(3, 1, 8, 8)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded(x), model.eval()(x))


def test_load_returns_the_registered_tensors_in_their_order(registry):
    state = small_mlp().state_dict()
    registry.register("m", state)
    loaded = registry.load("m")
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_wrapped_model_is_registered_without_the_module_prefix(registry):
    registry.register("m", nn.DataParallel(small_mlp()))
    assert list(registry.load("m")) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_load_model_needs_a_recorded_architecture(registry):
    registry.register("m", linear(0))
    with pytest.raises(RegistryError, match="without an architecture"):
        registry.load_model("m")


def test_register_refuses_weights_that_do_not_fit_the_architecture(registry):
    with pytest.raises(ArchitectureMismatchError, match="fc1.weight"):
        registry.register("m", small_mlp().state_dict(), architecture={"name": "mlp", "kwargs": {"hidden": 32}})


def test_explicit_architecture_lets_a_state_dict_be_rebuilt(registry):
    registry.register("m", small_mlp().state_dict(), architecture={"name": "mlp", "kwargs": {"hidden": 16}})
    assert isinstance(registry.load_model("m"), MLP)


# -- finding versions, and the errors that list what exists --------------------------------------------------------


def test_get_without_version_returns_the_latest(registry):
    for seed in range(3):
        registry.register("m", small_mlp(seed))
    assert registry.get("m").version == 3


def test_get_by_alias_or_name_at_alias(registry):
    registry.register("m", small_mlp(0))
    registry.register("m", small_mlp(1))
    registry.set_alias("m", "production", 1)
    assert registry.get("m", alias="production").version == 1
    assert registry.get("m@production").version == 1
    assert torch.equal(registry.load("m@production")["fc1.weight"], small_mlp(0).fc1.weight)


def test_unknown_name_error_lists_the_names(registry):
    registry.register("digits", small_mlp())
    with pytest.raises(NotFoundError, match="no model named 'digit'.*names: digits"):
        registry.get("digit")


def test_unknown_version_error_lists_the_versions(registry):
    for seed in range(3):
        registry.register("m", small_mlp(seed))
    with pytest.raises(NotFoundError, match="no version 7; its versions: 1-3"):
        registry.get("m", 7)


def test_unknown_alias_error_lists_the_aliases(registry):
    registry.register("m", small_mlp())
    registry.set_alias("m", "staging", 1)
    with pytest.raises(NotFoundError, match=r"no alias 'prod'; its aliases: staging -> v1"):
        registry.get("m", alias="prod")


# -- aliases, history, rollback ---------------------------------------------------------------------------------


@pytest.fixture
def three_versions(registry):
    for seed in range(3):
        registry.register("m", small_mlp(seed))
    return registry


def test_set_alias_moves_the_alias(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "production", 2)
    assert three_versions.aliases("m") == {"production": 2}


def test_promote_points_production_where_staging_points(three_versions):
    three_versions.set_alias("m", "staging", 3)
    assert three_versions.promote("m").version == 3
    assert three_versions.aliases("m") == {"production": 3, "staging": 3}


def test_alias_history_records_every_move_in_order(three_versions):
    reg = three_versions
    reg.set_alias("m", "production", 1)
    reg.set_alias("m", "staging", 2)
    reg.promote("m")
    reg.rollback("m", "production")
    reg.remove_alias("m", "staging")
    moves = [(e.alias, e.action, e.previous, e.version) for e in reg.alias_history("m")]
    assert moves == [("production", "set", None, 1), ("staging", "set", None, 2), ("production", "promote", 1, 2),
                     ("production", "rollback", 2, 1), ("staging", "remove", 2, None)]
    assert [e.seq for e in reg.alias_history("m", "production")] == [1, 3, 4]


def test_setting_an_alias_to_its_current_version_logs_nothing(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "production", 1)
    assert len(three_versions.alias_history("m")) == 1


def test_rollback_returns_to_the_previous_holder_in_one_call(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "production", 2)
    assert three_versions.rollback("m", "production").version == 1
    assert three_versions.get("m@production").version == 1


def test_repeated_rollbacks_walk_back_like_undo(three_versions):
    for version in (1, 2, 3):
        three_versions.set_alias("m", "production", version)
    assert [three_versions.rollback("m", "production").version for _ in range(2)] == [2, 1]


def test_rollback_skips_versions_deleted_since(three_versions):
    for version in (1, 2, 3):
        three_versions.set_alias("m", "production", version)
    three_versions.delete_version("m", 2)
    assert three_versions.rollback("m", "production").version == 1


def test_rollback_without_an_earlier_version_is_refused(three_versions):
    three_versions.set_alias("m", "production", 1)
    with pytest.raises(RegistryError, match="nothing left to undo: m@production points at v1"):
        three_versions.rollback("m", "production")


def test_rollback_after_every_move_was_undone_says_nothing_is_left_to_undo(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "production", 2)
    three_versions.rollback("m", "production")
    with pytest.raises(RegistryError, match="nothing left to undo: m@production points at v1.*already rolled back"):
        three_versions.rollback("m", "production")
    assert three_versions.get("m@production").version == 1


@pytest.mark.parametrize("action", ["set_alias", "delete_version"])
def test_a_missing_version_number_is_refused_not_read_as_the_latest(three_versions, action):
    args = ("m", "production", None) if action == "set_alias" else ("m", None)
    with pytest.raises(InvalidArgumentError, match="version must be a version number"):
        getattr(three_versions, action)(*args)
    assert [v.version for v in three_versions.versions("m")] == [1, 2, 3] and three_versions.aliases("m") == {}


# -- deleting, integrity, housekeeping ------------------------------------------------------------------------------


def test_deleting_a_version_an_alias_points_to_is_refused(three_versions):
    three_versions.set_alias("m", "production", 2)
    with pytest.raises(RegistryError, match="m@production"):
        three_versions.delete_version("m", 2)
    assert [v.version for v in three_versions.versions("m")] == [1, 2, 3]


def test_history_table_lists_every_move_with_its_alias(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "staging", 2)
    table = three_versions.history_table("m")
    assert table.columns == ("seq", "alias", "action", "from", "to", "at")
    assert [row[:5] for row in table.rows] == [("1", "production", "set", "-", "v1"), ("2", "staging", "set", "-", "v2")]
    assert three_versions.history_table("m", "staging").columns == ("seq", "action", "from", "to", "at")


def test_delete_removes_a_blob_only_when_no_version_uses_it(registry):
    registry.register("a", small_mlp(0))
    registry.register("b", small_mlp(0))
    registry.register("b", small_mlp(1))
    registry.delete_version("a", 1)
    assert len(blobs(registry)) == 2  # b v1 still uses the shared blob
    registry.delete_version("b", 2)
    assert len(blobs(registry)) == 1


def test_a_tampered_blob_raises_integrity_error_on_load(registry):
    mv = registry.register("m", small_mlp())
    path = registry.blob_path(mv.sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="do not match the SHA-256"):
        registry.load("m")
    assert registry.check().corrupt == ("m v1",)


def test_a_missing_blob_raises_registry_error_and_check_reports_it(registry):
    mv = registry.register("m", small_mlp())
    registry.blob_path(mv.sha256).unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.load("m")
    report = registry.check()
    assert report.missing == ("m v1",) and not report.ok


def test_registering_identical_weights_again_repairs_a_damaged_blob(registry):
    model = small_mlp()
    mv = registry.register("m", model)
    registry.blob_path(mv.sha256).write_bytes(b"damaged")
    registry.register("m", model)
    assert registry.check().ok


def test_gc_removes_orphan_blobs_and_temp_files(registry):
    registry.register("m", small_mlp())
    orphan = registry.blob_path("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    temp = orphan.parent / ".leftover.tmp"
    temp.write_bytes(b"x")
    assert registry.check().orphans == (f"blobs/ab/{'ab' * 32}.safetensors",)
    assert len(registry.gc()) == 2
    report = registry.check()
    assert report.ok and not report.orphans and not report.temp_files


# -- diff and lineage -------------------------------------------------------------------------------------------


def test_diff_lists_added_removed_and_reshaped_tensors(registry):
    registry.register("m", MLP())
    registry.register("m", MLPv2())
    diff = registry.diff("m", 1, 2)
    assert diff.added == ["fc3.weight", "fc3.bias"]
    assert diff.reshaped == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert diff.removed == [] and diff.architecture_changed
    assert registry.diff("m", 2, 1).removed == ["fc3.weight", "fc3.bias"]


def test_diff_relative_change_is_the_norm_of_the_change_over_the_norm(registry):
    model = small_mlp()
    before = model.fc1.weight.detach().clone()
    registry.register("m", model)
    with torch.no_grad():
        model.fc1.weight.mul_(1.1)
    registry.register("m", model, parent=1)
    diff = registry.diff("m", 1, 2)
    expected = ((model.fc1.weight - before).norm() / before.norm()).item()
    assert diff.relative_change["fc1.weight"] == pytest.approx(expected, rel=1e-6)
    assert diff.changed == ["fc1.weight"] and diff.relative_change["fc2.bias"] == 0.0


def test_diff_shows_metric_and_param_deltas(registry):
    registry.register("m", small_mlp(0), metrics={"acc": 0.90, "loss": 0.4}, params={"lr": 0.01, "opt": "adam"})
    registry.register("m", small_mlp(1), metrics={"acc": 0.95}, params={"lr": 0.01, "opt": "sgd"})
    diff = registry.diff("m", 1, 2)
    assert diff.metric_deltas == {"acc": pytest.approx(0.05), "loss": None}
    assert diff.param_changes == {"opt": ("adam", "sgd")}


def test_diff_accepts_alias_names_and_renders_as_text_and_html(three_versions):
    three_versions.set_alias("m", "production", 1)
    diff = three_versions.diff("m", "production", 3)
    text, page = str(diff), diff._repr_html_()
    assert text.startswith("m: v1 -> v3") and "fc1.weight" in text and "rel. change" in text
    assert "<table>" in page and "fc1.weight" in page


def test_lineage_follows_the_parents_oldest_first(three_versions):
    three_versions.register("m", small_mlp(10), parent=2)
    three_versions.register("m", small_mlp(11), parent=4)
    assert [v.version for v in three_versions.lineage("m", 5)] == [2, 4, 5]


def test_a_parent_must_exist(registry):
    registry.register("m", small_mlp())
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.register("m", small_mlp(1), parent=9)


# -- export ----------------------------------------------------------------------------------------------------


def test_export_is_stable_sorted_json_that_changes_only_where_the_registry_did(three_versions, tmp_path):
    reg = three_versions
    reg.set_alias("m", "production", 1)
    first = reg.export(tmp_path / "index.json")
    assert first == reg.export() == (tmp_path / "index.json").read_text()
    data = json.loads(first)
    assert [v["version"] for v in data["models"]["m"]["versions"]] == [1, 2, 3]
    reg.set_alias("m", "production", 2)
    lines = difflib.unified_diff(first.splitlines(), reg.export().splitlines(), lineterm="", n=0)
    changed = [line for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    removed = [line[1:].strip() for line in changed if line.startswith("-")]
    added = [line[1:].strip() for line in changed if line.startswith("+")]
    assert removed == ['"production": 1'] and '"production": 2' in added  # plus the new history entry
    assert len(added) <= 12


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "a@b", "a/b", " a", 3])
def test_a_bad_model_name_is_refused(registry, name):
    with pytest.raises(InvalidArgumentError, match="model name"):
        registry.register(name, small_mlp())


@pytest.mark.parametrize("alias", ["", "1", "pro duction", "a@b", None])
def test_a_bad_alias_is_refused(three_versions, alias):
    with pytest.raises(InvalidArgumentError, match="alias"):
        three_versions.set_alias("m", alias, 1)


@pytest.mark.parametrize("state,match", [({"epoch": 3}, "expected a tensor"), ({}, "empty"), ("weights", "nn.Module")])
def test_something_other_than_weights_is_refused(registry, state, match):
    with pytest.raises(InvalidArgumentError, match=match):
        registry.register("m", state)


@pytest.mark.parametrize("kwargs,match", [
    ({"metrics": {"acc": "high"}}, "metric 'acc'"), ({"metrics": {"acc": float("nan")}}, "finite"),
    ({"params": {"fn": print}}, "JSON"), ({"tags": ["a"]}, "tags must be a dict"), ({"notes": 3}, "notes"),
    ({"dataset": [1, 2]}, "ImageDataset or its fingerprint"), ({"dataset": "abc"}, "64 lowercase hex digits.*'abc'"),
    ({"parent": 0}, "parent"),
    ({"architecture": {"name": "resnet"}}, "architecture must be"),
    ({"architecture": {"name": "mlp", "kwargs": {"depth": 3}}}, "cannot be built")])
def test_bad_metadata_is_refused(registry, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        registry.register("m", small_mlp(), **kwargs)


def test_a_fingerprint_string_is_accepted_as_the_dataset(registry):
    fp = fingerprint(load_dataset("digits", "train"))
    assert registry.register("m", small_mlp(), dataset=fp).data_fingerprint == fp


def test_a_version_and_an_alias_together_are_refused(three_versions):
    three_versions.set_alias("m", "production", 1)
    with pytest.raises(InvalidArgumentError, match="not both"):
        three_versions.get("m", version=1, alias="production")


def test_a_registry_pickles_as_its_folder_for_worker_processes(three_versions):
    copy = pickle.loads(pickle.dumps(three_versions))
    assert copy.root == three_versions.root and copy.get("m").version == 3


def test_opening_a_folder_without_a_registry_can_be_refused(tmp_path):
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(tmp_path / "nothing", create=False)


# -- transactions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["write", "read"])
def test_an_error_after_sqlite_rolled_back_itself_is_not_hidden(registry, kind):
    with pytest.raises(ValueError, match="the original error"), getattr(registry._db, kind)() as conn:
        conn.execute("ROLLBACK")  # as SQLite does by itself on some errors (a full disk, say)
        raise ValueError("the original error")
    assert not registry._db.connect().in_transaction
    assert registry.register("m", small_mlp()).version == 1


def test_a_failed_commit_is_rolled_back_and_the_next_write_works(registry):
    registry.register("m", small_mlp(0))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), registry._db.write() as conn:
        conn.execute("PRAGMA defer_foreign_keys = ON")  # the broken reference fails at COMMIT, not here
        conn.execute("INSERT INTO aliases (name, alias, version) VALUES ('m', 'production', 99)")
    assert not registry._db.connect().in_transaction
    assert registry.aliases("m") == {}
    assert registry.register("m", small_mlp(1)).version == 2


# -- the command line -----------------------------------------------------------------------------------------


def cli(capsys, reg, *argv):
    code = main(["--root", str(reg.root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_names_and_versions(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "list")
    assert code == 0 and "m" in out and "production -> v2" in out
    code, out, _ = cli(capsys, three_versions, "list", "m")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == ["v1", "v2", "v3"]


def test_cli_shows_a_version_by_alias(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "show", "m@production")
    assert code == 0 and out.startswith("m v2") and "sha256:" in out


def test_cli_sets_lists_and_rolls_back_aliases(three_versions, capsys):
    assert cli(capsys, three_versions, "alias", "m", "production", "1")[1].strip() == "m@production -> v1"
    cli(capsys, three_versions, "alias", "m", "production", "3")
    assert cli(capsys, three_versions, "alias", "m")[1].strip() == "production -> v3"
    assert cli(capsys, three_versions, "rollback", "m", "production")[1].strip() == "m@production -> v1"
    history = cli(capsys, three_versions, "alias", "m", "production")[1]
    assert [line.split()[1] for line in history.splitlines()[2:]] == ["set", "set", "rollback"]


def test_cli_shows_a_version_by_number(three_versions, capsys):
    code, out, _ = cli(capsys, three_versions, "show", "m", "--version", "2")
    assert code == 0 and out.startswith("m v2")


def test_cli_promotes_staging_to_production(three_versions, capsys):
    three_versions.set_alias("m", "staging", 3)
    code, out, _ = cli(capsys, three_versions, "promote", "m")
    assert code == 0 and out.strip() == "m@production -> v3"
    assert three_versions.aliases("m") == {"production": 3, "staging": 3}
    code, out, _ = cli(capsys, three_versions, "promote", "m", "--source", "production", "--target", "canary")
    assert code == 0 and three_versions.aliases("m")["canary"] == 3


def test_cli_removes_an_alias(three_versions, capsys):
    three_versions.set_alias("m", "production", 2)
    code, out, _ = cli(capsys, three_versions, "alias", "m", "production", "--remove")
    assert code == 0 and out.strip() == "removed m@production"
    assert three_versions.aliases("m") == {} and len(three_versions.versions("m")) == 3


def test_cli_uses_the_registry_named_by_the_environment(three_versions, capsys, monkeypatch):
    monkeypatch.setenv("MVTK_REGISTRY", str(three_versions.root))
    assert main(["list", "m"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["v1", "v2", "v3"]


def test_cli_diffs_two_versions(three_versions, capsys):
    code, out, _ = cli(capsys, three_versions, "diff", "m", "1", "2")
    assert code == 0 and out.startswith("m: v1 -> v2") and "changed" in out


def test_cli_exports_the_index(three_versions, capsys, tmp_path):
    code, out, _ = cli(capsys, three_versions, "export")
    assert code == 0 and json.loads(out)["format"] == "mvtk-registry-index/1"
    cli(capsys, three_versions, "export", "--output", str(tmp_path / "index.json"))
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(out)


def test_cli_reports_errors_on_stderr_with_exit_code_1(three_versions, capsys):
    code, out, err = cli(capsys, three_versions, "show", "digits")
    assert code == 1 and not out and "NotFoundError: no model named 'digits'" in err


def test_cli_check_exits_1_when_a_blob_is_corrupt(three_versions, capsys):
    three_versions.blob_path(three_versions.get("m", 1).sha256).write_bytes(b"bad")
    code, out, _ = cli(capsys, three_versions, "check")
    assert code == 1 and "corrupt: m v1" in out


def test_cli_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "mvtk.registry", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("list", "show", "diff", "alias", "rollback", "export"):
        assert command in result.stdout


# -- several processes, and killed ones ---------------------------------------------------------------------------
# Children are forked where the platform allows it, so they start without importing torch again.
CONTEXT = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def register_25(root, worker, go):
    go.wait(timeout=120)  # start all four together
    registry = Registry(root)
    for i in range(25):
        seed = worker * 1000 + i
        registry.register("shared", linear(seed), tags={"seed": seed})


@pytest.mark.slow
def test_four_processes_registering_at_once_make_versions_1_to_100_all_loadable(tmp_path):
    root, go = tmp_path / "registry", CONTEXT.Event()
    workers = [CONTEXT.Process(target=register_25, args=(root, w, go)) for w in range(4)]
    for worker in workers:
        worker.start()
    go.set()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    reg = Registry(root)
    versions = reg.versions("shared")
    assert [v.version for v in versions] == list(range(1, 101))
    assert sorted(v.tags["seed"] for v in versions) == sorted(w * 1000 + i for w in range(4) for i in range(25))
    for mv in versions:
        expected = linear(mv.tags["seed"]).state_dict()
        assert all(torch.equal(reg.load("shared", mv.version)[k], expected[k]) for k in expected)
    assert reg.check().ok


def die_after_the_blob_is_stored(root):
    registry = Registry(root)
    registry.register("m", linear(0))
    store = Registry._store_blob

    def store_then_die(self, sha256, data):
        store(self, sha256, data)  # the blob is on disk; the index row is not committed yet
        os.kill(os.getpid(), signal.SIGKILL)

    Registry._store_blob = store_then_die
    registry.register("m", linear(1))


def die_while_writing_the_blob(root):
    registry = Registry(root)
    registry.register("m", linear(0))

    def half_then_die(path, data):
        with atomic_write(path) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    mvtk.registry.write_bytes_atomic = half_then_die
    registry.register("m", linear(1))


@pytest.mark.slow
@pytest.mark.parametrize("child,leftover", [(die_after_the_blob_is_stored, "orphans"),
                                            (die_while_writing_the_blob, "temp_files")],
                         ids=["inside-the-transaction", "while-writing-the-blob"])
def test_a_process_killed_while_registering_leaves_the_registry_consistent(tmp_path, child, leftover):
    root = tmp_path / "registry"
    process = CONTEXT.Process(target=child, args=(root,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    reg = Registry(root)
    report = reg.check()
    assert [v.version for v in reg.versions("m")] == [1] and report.ok
    assert len(getattr(report, leftover)) == 1  # harmless: no version refers to it
    assert reg.register("m", linear(5)).version == 2  # the write lock died with the process
    reg.gc()
    assert not reg.check().orphans and not reg.check().temp_files


def register_forever(root):
    registry = Registry(root)
    for seed in range(100_000):
        registry.register("m", linear(seed), tags={"seed": seed})


@pytest.mark.slow
def test_a_process_killed_at_a_random_moment_leaves_every_version_loadable(tmp_path):
    root = tmp_path / "registry"
    process = CONTEXT.Process(target=register_forever, args=(root,))
    process.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (root / "blobs").exists():
        time.sleep(0.01)
    time.sleep(0.2 + random.random() * 0.3)  # somewhere in the middle of a registration
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=60)
    reg = Registry(root)
    versions = reg.versions("m")
    assert len(versions) >= 1 and [v.version for v in versions] == list(range(1, len(versions) + 1))
    assert reg.check().ok
    for mv in versions:
        assert torch.equal(reg.load("m", mv.version)["weight"], linear(mv.tags["seed"]).weight)
