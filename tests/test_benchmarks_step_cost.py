"""Smoke test of ``benchmarks/step_cost.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import step_cost  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_step_cost_quick_writes_finite_positive_times(tmp_path):
    out = step_cost.main(["--quick", "--out", str(tmp_path)])

    assert (tmp_path / "step_cost.csv").exists()
    assert (tmp_path / "step_cost.md").exists()
    with open(tmp_path / "step_cost.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {row["method"] for row in rows}
    # kfac-jax is optional: it is skipped, with its reason in the report, when it does not run.
    expected = set(step_cost.QUICK_METHODS)
    if out["kfac_jax"] != "available":
        expected = {m for m in expected if not m.startswith("kfac-jax")}
        assert "kfac-jax unavailable" in (tmp_path / "step_cost.md").read_text()
    assert methods == expected
    for row in rows:
        for key in ("ms_per_step", "ms_min", "ms_max", "ratio_to_adam"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row["method"], key, value)
        assert int(row["state_bytes"]) > 0
        assert row["finite_params"] == "True"
    assert "## Goals" in (tmp_path / "step_cost.md").read_text()


def test_step_cost_stages_times_every_stage_of_the_library(tmp_path):
    out = step_cost.main(["--quick", "--stages", "--out", str(tmp_path)])

    text = (tmp_path / "step_cost_stages.md").read_text()
    assert out["md"] == str(tmp_path / "step_cost_stages.md")
    for stage in step_cost.COMPONENTS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {stage} |"))
        first = row.split("|")[2].split()[0]
        assert math.isfinite(float(first)) and float(first) > 0, row
