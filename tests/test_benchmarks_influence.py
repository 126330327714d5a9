"""Smoke test of ``benchmarks/influence.py``: the quick configuration writes every method's row,
with the dense solve as the exact reference (its own agreement 1)."""

import csv
import math

import pytest

from benchmarks import influence  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_influence_quick_writes_every_method_for_both_models(tmp_path):
    influence.main(["--quick", "--out", str(tmp_path)])
    with open(tmp_path / "influence_quick.csv") as f:
        rows = list(csv.DictReader(f))
    methods = ["EKFAC", "KFAC", "dense", "dense per layer (block-diagonal)"]
    methods += ["CG (10 iterations)", "gradient dot product"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (model, method) for model in ("MLP", "CNN") for method in methods
    ]
    for r in rows:
        assert math.isfinite(float(r["total_s"]))
        for k in influence.DAMPINGS:
            rho, top = float(r[f"spearman_{k:g}"]), float(r[f"top10_{k:g}"])
            assert -1 <= rho <= 1 and 0 <= top <= 1
            if r["method"] == "dense":
                assert rho == 1.0 and top == 1.0
    text = (tmp_path / "influence_quick.md").read_text()
    assert "| MLP |" in text and "Spearman" in text
