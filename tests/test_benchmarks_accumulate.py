"""Smoke test of ``benchmarks/accumulate.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import accumulate  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_accumulate_quick_writes_every_call_and_the_goal(tmp_path):
    accumulate.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "accumulate_quick.csv") as f:
        rows = {r["call"]: r for r in csv.DictReader(f)}
    expected = {"fwd/bwd", "capture"} | {
        f"{method} {call}"
        for method in accumulate.QUICK["methods"]
        for call in ("micro, ek.multi_steps", "micro, optax.MultiSteps", "real step")
    }
    expected.add(f"{accumulate.AMORTIZED} micro, ek.multi_steps")
    assert set(rows) == expected
    for name, row in rows.items():
        assert math.isfinite(float(row["ms"])) and float(row["ms"]) > 0, name
    text = (tmp_path / "accumulate_quick.md").read_text()
    assert "EKFAC-ra: a micro-step of ek.multi_steps takes" in text
    assert "| EKFAC-ra |" in text
