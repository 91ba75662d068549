"""Lesson 04, §3: aliases move and every move is logged; rollback undoes; an alias protects its version."""
import pytest

from mvtk.errors import InvalidArgumentError, RegistryError


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


def test_history_table_lists_every_move_with_its_alias(three_versions):
    three_versions.set_alias("m", "production", 1)
    three_versions.set_alias("m", "staging", 2)
    table = three_versions.history_table("m")
    assert table.columns == ("seq", "alias", "action", "from", "to", "at")
    assert [row[:5] for row in table.rows] == [("1", "production", "set", "-", "v1"), ("2", "staging", "set", "-", "v2")]
    assert three_versions.history_table("m", "staging").columns == ("seq", "action", "from", "to", "at")


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


def test_deleting_a_version_an_alias_points_to_is_refused(three_versions):
    three_versions.set_alias("m", "production", 2)
    with pytest.raises(RegistryError, match="m@production"):
        three_versions.delete_version("m", 2)
    assert [v.version for v in three_versions.versions("m")] == [1, 2, 3]


@pytest.mark.parametrize("action", ["set_alias", "delete_version"])
def test_a_missing_version_number_is_refused_not_read_as_the_latest(three_versions, action):
    args = ("m", "production", None) if action == "set_alias" else ("m", None)
    with pytest.raises(InvalidArgumentError, match="version must be a version number"):
        getattr(three_versions, action)(*args)
    assert [v.version for v in three_versions.versions("m")] == [1, 2, 3] and three_versions.aliases("m") == {}


@pytest.mark.parametrize("alias", ["", "1", "pro duction", "a@b", None])
def test_a_bad_alias_is_refused(three_versions, alias):
    with pytest.raises(InvalidArgumentError, match="alias"):
        three_versions.set_alias("m", alias, 1)
