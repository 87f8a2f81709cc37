"""The `--stages` report's figures: the ratio of the medians, and the per-repeat ratios' median, quartiles and range
(the spread the results file gives), checked against values worked out by hand."""

import pytest

from benchmarks.vector_columns import summary


def test_summary_reports_the_ratio_of_medians_and_the_spread_of_per_repeat_ratios():
    one = [1.0, 1.0, 1.0, 1.0, 2.0]
    three = [1.0, 1.1, 1.2, 0.9, 2.0]  # per repeat: 1.0, 1.1, 1.2, 0.9, 1.0
    s = summary(one, three)
    assert s["one"] == pytest.approx(1.0) and s["three"] == pytest.approx(1.1)
    assert s["ratio"] == pytest.approx(1.1)  # medians' ratio: 1.1 / 1.0
    assert s["ratio_median"] == pytest.approx(1.0)  # sorted ratios 0.9, 1.0, 1.0, 1.1, 1.2
    assert (s["q1"], s["q3"]) == (pytest.approx(1.0), pytest.approx(1.1))
    assert (s["min"], s["max"]) == (pytest.approx(0.9), pytest.approx(1.2))
