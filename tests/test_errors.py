"""`expect_error` shows a failure on purpose and fails itself when the failure does not happen."""
import pytest

from mvtk.errors import InvalidArgumentError, MvtkError, expect_error


def test_expected_error_is_printed_with_type_and_message(capsys):
    with expect_error(KeyError):
        {}["missing"]
    assert capsys.readouterr().out == "KeyError: 'missing'\n"


def test_a_multi_line_message_is_printed_whole(capsys):
    with expect_error(ValueError, match="bad"):
        raise ValueError("bad value\nsecond line")
    assert capsys.readouterr().out == "ValueError: bad value\nsecond line\n"


def test_no_error_is_itself_an_error():
    with pytest.raises(AssertionError, match="ran without error"):
        with expect_error(ValueError):
            pass


def test_a_different_error_propagates():
    with pytest.raises(TypeError):
        with expect_error(ValueError):
            raise TypeError("not the one")


def test_match_checks_the_message():
    with pytest.raises(AssertionError, match="contains 'shape'"):
        with expect_error(ValueError, match="shape"):
            raise ValueError("something else")


def test_mvtk_errors_are_also_builtin_errors():
    assert issubclass(InvalidArgumentError, ValueError) and issubclass(InvalidArgumentError, MvtkError)


def test_the_expected_exception_must_be_named():
    with pytest.raises(TypeError):
        with expect_error():  # a check that passes on any error proves nothing
            raise ValueError("anything")


@pytest.mark.parametrize("expected", [(), "ValueError", ValueError("x"), (ValueError, int)])
def test_expected_must_be_exception_classes(expected):
    with pytest.raises(InvalidArgumentError, match="expected must be an exception class"):
        with expect_error(expected):
            raise ValueError("x")
