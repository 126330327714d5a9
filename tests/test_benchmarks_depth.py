"""Smoke test of ``benchmarks/depth.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import depth  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_depth_quick_writes_both_layouts_and_the_goals(tmp_path):
    methods = "EKFAC-ra,EKFAC-ra stacked"
    depth.main(["--quick", "--out", str(tmp_path), "--methods", methods])

    with open(tmp_path / "depth_quick.csv") as f:
        rows = list(csv.DictReader(f))
    measured = {(r["layout"], int(r["depth"]), r["method"]) for r in rows}
    assert measured == {
        (layout, layers, method)
        for layout in ("loop", "scan")
        for layers in depth.QUICK["depths"]
        for method in ("AdamW", "EKFAC-ra", "EKFAC-ra stacked")
    }
    for row in rows:
        for key in ("compile_s", "ms_per_step", "compile_ratio", "step_ratio"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row["method"], key, value)
    text = (tmp_path / "depth_quick.md").read_text()
    assert "## Goals" in text and "loop, EKFAC-ra: 2-block compile" in text
    assert "scan, EKFAC-ra 2-block step" in text
