"""Smoke test of ``benchmarks/step_goals.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import step_goals  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_step_goals_quick_writes_every_method_and_the_goals(tmp_path):
    step_goals.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "step_goals_quick.csv") as f:
        rows = list(csv.DictReader(f))
    lm = {r["method"] for r in rows if r["problem"] == "lm"}
    ae = {r["method"] for r in rows if r["problem"] == "autoencoder"}
    assert lm == set(step_goals.QUICK_METHODS)
    assert ae == {"EKFAC", "EKFAC-ra", "KFAC", "Adam", "fwd/bwd"}
    for row in rows:
        assert math.isfinite(float(row["ratio"])) and float(row["ratio"]) > 0, row["method"]
        assert int(row["operations"]) > 0, row["method"]
    text = (tmp_path / "step_goals_quick.md").read_text()
    assert "- LM, EKFAC-ra, factors every 10: " in text and "(goal <= 1.3x)" in text
    assert "- auto-encoder, EKFAC: " in text
