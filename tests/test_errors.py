"""`expect_error` shows a failure on purpose and fails itself when the failure does not happen; the shared
argument checks accept what they should, refuse a bool and values out of range, and name the argument."""
import pytest
import torch

from mvtk.errors import (InvalidArgumentError, MvtkError, ParallelError, check_int, check_module, check_number,
                         check_positive_int, expect_error)


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


# --- the shared argument checks: one wording for every module ----------------------------------------

def test_check_int_returns_an_int_in_range():
    assert check_int(3, "epochs", low=0, high=3) == 3
    assert check_positive_int(1, "batch_size") == 1


@pytest.mark.parametrize("check", [lambda v: check_int(v, "epochs"), lambda v: check_positive_int(v, "epochs")])
def test_int_checks_refuse_a_bool(check):
    with pytest.raises(InvalidArgumentError, match="epochs must be .*got True"):
        check(True)


@pytest.mark.parametrize("value, match", [
    (-1, r"seed must be an int in \[0, 9\], got -1"), (10, r"seed must be an int in \[0, 9\], got 10"),
    (1.0, r"seed must be an int in \[0, 9\], got 1.0"), ("3", r"got '3'"),
])
def test_check_int_refuses_values_out_of_range_and_names_the_argument(value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_int(value, "seed", low=0, high=9)


def test_int_checks_raise_the_error_type_asked_for():
    with pytest.raises(ParallelError, match="nproc must be a positive int, got 0"):
        check_positive_int(0, "nproc", ParallelError)
    with pytest.raises(ParallelError, match="warmup must be an int >= 0"):
        check_int(-1, "warmup", low=0, error=ParallelError)


def test_check_number_returns_a_float_in_range():
    assert check_number(1, "alpha", low=0, high=1) == 1.0 and isinstance(check_number(1, "alpha"), float)
    assert check_number(0.5, "dropout", low=0, high=1, high_open=True) == 0.5


@pytest.mark.parametrize("value", [True, "0.5", None, float("nan"), float("inf")])
def test_check_number_refuses_a_bool_and_what_is_not_a_finite_number(value):
    with pytest.raises(InvalidArgumentError, match="alpha must be a number"):
        check_number(value, "alpha")


@pytest.mark.parametrize("kwargs, value, match", [
    ({"low": 0, "high": 1}, 1.5, r"amount must be a number in \[0, 1\], got 1.5"),
    ({"low": 0, "low_open": True}, 0, "amount must be a number > 0, got 0"),
    ({"low": 0, "high": 1, "high_open": True}, 1.0, r"amount must be a number in \[0, 1\), got 1.0"),
    ({"high": 0.01, "high_open": True}, 0.01, "amount must be a number < 0.01"),
    ({"low": 0, "high": 1, "what": "a fraction of weights"}, -0.1,
     r"amount must be a fraction of weights in \[0, 1\], got -0.1"),
])
def test_check_number_refuses_values_out_of_range_and_names_the_argument(kwargs, value, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_number(value, "amount", **kwargs)


def test_check_module_accepts_a_module_and_names_the_type_of_anything_else():
    layer = torch.nn.Linear(2, 2)
    assert check_module(layer) is layer
    with pytest.raises(InvalidArgumentError, match="features must be a torch.nn.Module, got dict"):
        check_module({"weight": torch.zeros(2)}, "features")
