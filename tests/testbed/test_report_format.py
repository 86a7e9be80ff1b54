"""The shared report formatting: how a share, a metric and a table row look in every report."""

import math

from testbed.report_format import percent, percent_of, short_number, table_row, table_rule


def test_percent_plain_signed_and_missing():
    assert percent(0.1234) == "12.3 %"
    assert percent(0.5, digits=0) == "50 %"
    assert percent(0.012, signed=True) == "+1.2 %" and percent(-0.012, signed=True) == "-1.2 %"
    assert percent(0.0, signed=True) == "+0.0 %"
    assert percent(math.nan) == percent(math.inf, signed=True) == percent(None) == "n/a"


def test_percent_of_a_whole_and_of_nothing():
    assert percent_of(3, 4) == "75 %" and percent_of(1, 3, digits=1) == "33.3 %"
    assert percent_of(0, 0) == "-" and percent_of(0, 0, empty="n/a") == "n/a"


def test_short_number_keeps_the_decimals_a_metric_needs():
    assert short_number(0.98765) == "0.988" and short_number(-3.14159) == "-3.142"
    assert short_number(12.345) == "12.3" and short_number(1500) == "1500.0"
    assert short_number(None) == short_number(math.nan) == "n/a"


def test_markdown_rows():
    assert table_row(["method", 1, 0.5]) == "| method | 1 | 0.5 |"
    assert table_rule(3) == "| --- | --- | --- |"
