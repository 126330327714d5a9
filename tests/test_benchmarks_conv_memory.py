"""Smoke test of ``benchmarks/conv_memory.py``: the quick configuration writes its report."""

import re

import pytest

from benchmarks import conv_memory  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_conv_memory_quick_reports_every_method_against_adam(tmp_path):
    conv_memory.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "conv_memory_quick.md").read_text()
    for method in conv_memory.METHODS:
        row = re.search(rf"\| {re.escape(method)} \| ([0-9.]+) \| ([0-9.]+) \|", text)
        assert row is not None, method
        assert float(row.group(2)) > 0, method
    assert "- EKFAC: " in text and "Adam's (" in text
