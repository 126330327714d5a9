"""Smoke test of ``benchmarks/guard_cost.py``: the quick configuration writes its outputs, and its
variants patch the library's stages only while a step is traced."""

import csv
import math

import pytest

from benchmarks import guard_cost  # importable: `pythonpath` in pyproject.toml
from ekfac_optax.update import _step

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_guard_cost_quick_writes_each_variant_and_the_goal(tmp_path):
    stages = _step.guard, _step.select, _step.all_finite
    guard_cost.main(["--quick", "--out", str(tmp_path)])
    assert (_step.guard, _step.select, _step.all_finite) == stages  # restored
    with open(tmp_path / "guard_cost_quick.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["problem"], r["method"]) for r in rows] == [("mlp w64 b32", "EKFAC-ra")]
    for name in guard_cost.VARIANTS:
        assert math.isfinite(float(rows[0][f"{name}_ms"])) and float(rows[0][f"{name}_ms"]) > 0
    text = (tmp_path / "guard_cost_quick.md").read_text()
    assert "- mlp w64 b32, EKFAC-ra: the guard " in text and "(goal <= 1%)" in text
