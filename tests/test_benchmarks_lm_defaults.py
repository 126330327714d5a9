"""Smoke test of ``benchmarks/lm_defaults.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import lm_defaults  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_lm_defaults_quick_writes_every_run_and_the_goals(tmp_path):
    lm_defaults.main(["--quick", "--out", str(tmp_path)])

    with open(tmp_path / "lm_defaults_quick.csv") as f:
        rows = list(csv.DictReader(f))
    expected = {(m, lr) for m, (grid, _) in lm_defaults.METHODS.items() for lr in grid[2:3]}
    assert {(row["method"], float(row["lr"])) for row in rows} == expected
    for row in rows:
        assert float(row["ms_per_step"]) > 0
        if row["diverged"] == "False":
            assert math.isfinite(float(row["final"])), row
    text = (tmp_path / "lm_defaults_quick.md").read_text()
    assert "## Goals" in text and "KFE-Adam reaches AdamW's best final loss" in text
