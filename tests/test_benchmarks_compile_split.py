"""Smoke test of ``benchmarks/compile_split.py``: the quick configuration writes every part."""

import csv
import math

import pytest

from benchmarks import compile_split  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_compile_split_quick_writes_every_part(tmp_path):
    compile_split.main(["--quick", "--out", str(tmp_path), "--layouts", "loop"])
    with open(tmp_path / "compile_split_quick.csv") as f:
        rows = list(csv.DictReader(f))
    parts = {(int(r["depth"]), r["method"], r["part"]) for r in rows}
    expected = {
        (layers, method, part)
        for layers in compile_split.QUICK["depths"]
        for method, part in [("-", "value_and_grad"), ("-", "value_grad_and_stats")]
        + [(m, p) for m in compile_split.METHODS for p in ("update", "step")]
    }
    assert parts == expected
    for row in rows:
        for key in ("compile_s", "x_adamw_step"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (row, key)
    text = (tmp_path / "compile_split_quick.md").read_text()
    assert "## What a preconditioner adds" in text and "loop, 2 blocks: the capture" in text
