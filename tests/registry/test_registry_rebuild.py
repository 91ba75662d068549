"""Lesson 04, §2 and §6: a version records how to rebuild any model class, and its layers, and loads it back."""
import sqlite3

import pytest
import torch
from torch import nn

from mvtk.checkpoint import new_signing_key
from mvtk.errors import RegistryError, SignatureError
from mvtk.models import MLP, remember_init_args
from mvtk.registry import Registry, version_statement


@remember_init_args
class Net(nn.Module):
    """A user's model: its arguments are kept by the decorator."""

    def __init__(self, width: int = 8, dropout: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.drop = nn.Dropout(dropout) if dropout is not None else nn.Identity()
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class Plain(nn.Module):
    """A user's model that keeps nothing about its arguments."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)


class WithHparams(Plain):
    """Lightning-style: the arguments live in `hparams`."""

    def __init__(self, width):
        super().__init__(width)
        self.hparams = {"width": width}


def test_a_decorated_class_is_rebuilt_with_its_arguments(registry):
    torch.manual_seed(0)
    model = Net(width=6, dropout=0.1)
    mv = registry.register("net", model)
    assert mv.class_path == f"{Net.__module__}:Net" and mv.init_args == {"width": 6, "dropout": 0.1}
    loaded = registry.load_model("net")
    x = torch.rand(3, 4)
    assert type(loaded) is Net and not loaded.training and torch.equal(loaded(x), model.eval()(x))


def test_init_args_given_explicitly_are_checked_by_rebuilding(registry):
    torch.manual_seed(0)
    assert registry.register("p", Plain(3), init_args={"width": 3}).init_args == {"width": 3}
    with pytest.raises(RegistryError, match="do not rebuild Plain"):
        registry.register("p", Plain(3), init_args={"width": 5})


def test_hparams_are_read_like_lightning_saves_them(registry):
    assert registry.register("h", WithHparams(2)).init_args == {"width": 2}


def test_a_model_without_a_recipe_is_refused_naming_what_to_pass(registry):
    with pytest.raises(RegistryError, match=r"cannot tell how to rebuild Plain.*pass init_args=.*program_example="):
        registry.register("p", Plain(3))
    with pytest.raises(RegistryError, match="Sequential"):
        registry.register("s", nn.Sequential(nn.Linear(2, 2)))
    assert registry.names() == []


def test_a_program_rebuilds_a_model_without_its_class(registry):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.rand(5, 4)
    mv = registry.register("seq", model, program_example=(x,))
    assert mv.program_sha256 and mv.init_args is None
    loaded = registry.load_model("seq")
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(registry.load_program("seq")(x[:1]), model(x[:1]))  # any batch size
    assert registry.check().ok


def test_a_damaged_program_is_refused_before_torch_reads_it(registry):
    mv = registry.register("seq", nn.Sequential(nn.Linear(4, 2)), program_example=(torch.rand(2, 4),))
    path = registry.blobs.path(mv.program_sha256, ".pt2")
    path.write_bytes(path.read_bytes()[:-4] + b"edit")
    with pytest.raises(Exception, match="do not match the SHA-256"):
        registry.load_model("seq")
    assert registry.check().corrupt == ("seq v1 (program)",)


def test_load_program_without_a_program_says_how_to_store_one(registry):
    registry.register("x", MLP(hidden=4))
    with pytest.raises(RegistryError, match="program_example="):
        registry.load_program("x")


def test_a_diff_shows_a_layer_without_weights_that_was_added(registry):
    torch.manual_seed(0)
    registry.register("net", Net(width=6))
    registry.register("net", Net(width=6, dropout=0.5))
    diff = registry.diff("net", 1, 2)
    assert diff.architecture_changed and [(c.name, c.status) for c in diff.layers] == [("drop", "changed")]
    assert "Dropout(p=0.5" in str(diff) and "unknown (same)" not in str(diff)
    assert diff.heading().splitlines()[1] == "architecture: Net(dropout=None, width=6) -> Net(dropout=0.5, width=6)"


def test_a_diff_of_programs_shows_added_layers(registry):
    x = torch.rand(2, 4)
    torch.manual_seed(0)
    v1 = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    v2 = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    registry.register("seq", v1, program_example=(x,))
    registry.register("seq", v2, program_example=(x,))
    diff = registry.diff("seq", 1, 2)
    assert diff.architecture_changed and ("1", "changed") in [(c.name, c.status) for c in diff.layers]
    assert ("2", "added") in [(c.name, c.status) for c in diff.layers]


def test_an_index_from_before_class_paths_still_loads_course_models(tmp_path, seeded_mlp):
    root = tmp_path / "old"
    with Registry(root) as reg:
        reg.register("m", seeded_mlp(0))
    with sqlite3.connect(root / "index.sqlite") as conn:  # what an older mvtk wrote: no rebuild columns
        for column in ("class_path", "init_args", "modules", "program_sha256"):
            conn.execute(f"ALTER TABLE versions DROP COLUMN {column}")
    with Registry(root) as reg:
        mv = reg.get("m")
        assert mv.class_path is None and mv.modules == ()
        assert type(reg.load_model("m")) is MLP


def test_a_version_without_rebuild_fields_signs_the_statement_older_mvtk_signed(registry, seeded_mlp):
    mv = registry.register("m", seeded_mlp(0).state_dict())
    assert b"class_path" not in version_statement(mv) and b"modules" not in version_statement(mv)


def test_editing_the_recorded_module_tree_breaks_the_signature(tmp_path, seeded_mlp):
    private, public = new_signing_key(tmp_path / "k.key", tmp_path / "k.pub")
    root = tmp_path / "old"
    with Registry(root, signing_key=private) as reg:
        reg.register("m", seeded_mlp(0).state_dict(), architecture={"name": "mlp", "kwargs": {"hidden": 16}})
    with sqlite3.connect(root / "index.sqlite") as conn:
        conn.execute("UPDATE versions SET modules = NULL")
    with Registry(root, verify_key=public) as reg:
        with pytest.raises(SignatureError):  # the module tree was signed: removing it is an edit
            reg.load("m")
