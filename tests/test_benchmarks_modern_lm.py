"""Smoke test of ``benchmarks/modern_lm.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import modern_lm  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_modern_lm_quick_writes_every_method_and_the_goals(tmp_path):
    modern_lm.main(["--quick", "--out", str(tmp_path)])

    with open(tmp_path / "modern_lm_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["method"] for row in rows} == set(modern_lm.METHODS)
    for row in rows:
        for key in ("ms_per_step", "compile_s", "step_ratio", "state_ratio", "peak_bytes"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row["method"], key, value)
        assert row["finite_loss"] == "True", row["method"]
        assert int(row["largest_factor_side"]) <= modern_lm.MAX_FACTOR_DIM
    text = (tmp_path / "modern_lm_quick.md").read_text()
    assert "## Goals" in text and "EKFAC, state <= 1.5x AdamW" in text
