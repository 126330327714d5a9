"""Smoke test of ``benchmarks/sharded_eigh.py``: the quick run writes finite, positive times."""

import math

import jax
import pytest

from benchmarks import sharded_eigh

pytestmark = pytest.mark.slow  # a benchmark's quick run


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (set by conftest)")
def test_quick_run_writes_times_for_1_2_4_8_devices(tmp_path):
    result = sharded_eigh.main(["--quick", "--out", str(tmp_path)])
    assert [r["devices"] for r in result["rows"]] == [1, 2, 4, 8]
    for row in result["rows"]:
        for key, value in row.items():
            assert math.isfinite(value) and value > 0, (key, value)
    assert (tmp_path / "sharded_eigh.csv").stat().st_size > 0
    assert "| 8 |" in (tmp_path / "sharded_eigh.md").read_text()
