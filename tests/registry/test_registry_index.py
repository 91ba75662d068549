"""Lesson 04, §2: the SQLite index's transactions leave its connection usable whatever goes wrong inside them."""
import sqlite3

import pytest

from mvtk.errors import RegistryError
from mvtk.registry import RegistryIndex


@pytest.fixture
def index(registry):
    """A second handle on the registry's own index file, as another part of a program would open it."""
    handle = RegistryIndex(registry.index, str(registry.root))
    yield handle
    handle.close()


@pytest.mark.parametrize("kind", ["write", "read"])
def test_an_error_after_sqlite_rolled_back_itself_is_not_hidden(registry, index, mlp, kind):
    with pytest.raises(ValueError, match="the original error"), getattr(index, kind)() as conn:
        conn.execute("ROLLBACK")  # as SQLite does by itself on some errors (a full disk, say)
        raise ValueError("the original error")
    assert not index.connect().in_transaction
    assert registry.register("m", mlp).version == 1


def test_a_failed_commit_is_rolled_back_and_the_next_write_works(registry, index, seeded_mlp):
    registry.register("m", seeded_mlp(0))
    with pytest.raises(RegistryError, match="FOREIGN KEY") as failed, index.write() as conn:
        conn.execute("PRAGMA defer_foreign_keys = ON")  # the broken reference fails at COMMIT, not here
        conn.execute("INSERT INTO aliases (name, alias, version) VALUES ('m', 'production', 99)")
    assert isinstance(failed.value.__cause__, sqlite3.IntegrityError) and "index.sqlite" in str(failed.value)
    assert not index.connect().in_transaction
    assert registry.aliases("m") == {}
    with index.write() as conn:
        index.move_alias(conn, "m", "production", 1, "set")
    assert registry.aliases("m") == {"production": 1}
    assert registry.register("m", seeded_mlp(1)).version == 2
