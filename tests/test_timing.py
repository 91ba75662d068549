"""mvtk.timing: the fair latency measurement Lessons 06 and 07 use."""
import time

import pytest

from mvtk.errors import InvalidArgumentError
from mvtk.timing import median_latencies, median_latency


def test_latency_helper_times_each_function_and_rejects_non_callables():
    assert len(median_latencies([lambda: None, lambda: None], repeats=3, warmup=1)) == 2
    with pytest.raises(InvalidArgumentError, match="callables"):
        median_latencies([42])


def test_median_latency_is_the_one_function_case():
    assert median_latency(lambda: time.sleep(0.001), repeats=3, warmup=1) >= 0.001


def test_a_slower_function_measures_slower_in_the_same_run():
    fast, slow = median_latencies([lambda: None, lambda: time.sleep(0.002)], repeats=6, warmup=1)
    assert slow >= 0.002 > fast


def test_bad_counts_name_the_argument():
    for kwargs, name in (({"warmup": 0}, "warmup"), ({"repeats": -1}, "repeats"), ({"rounds": True}, "rounds")):
        with pytest.raises(InvalidArgumentError, match=name):
            median_latencies([lambda: None], **kwargs)
