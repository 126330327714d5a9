"""Smoke test of ``benchmarks/approx_quality.py`` (``--quick``): outputs exist, values are finite,
and EKFAC is at least as close to the exact empirical Fisher as KFAC at every evaluated step
(Theorem 3 of George et al., 2018)."""

import csv
import math

import pytest

from benchmarks import approx_quality

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_approx_quality_quick(tmp_path):
    approx_quality.main(["--quick", "--out", str(tmp_path)])
    for name in ("approx_quality.csv", "approx_quality.png", "approx_quality.md"):
        assert (tmp_path / name).stat().st_size > 0, name

    with open(tmp_path / "approx_quality.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"step", "layer", "method", "metric", "value"}
    assert all(math.isfinite(float(row["value"])) for row in rows)

    errors = {
        (int(row["step"]), row["layer"], row["method"]): float(row["value"])
        for row in rows
        if row["metric"] == "frob_err"
    }
    steps = sorted({step for step, _, _ in errors})
    assert steps == [0, 10, 20, 30]
    for step in steps:
        for layer in approx_quality.LAYERS:
            kfac, ekfac = errors[(step, layer, "kfac")], errors[(step, layer, "ekfac")]
            assert ekfac <= kfac * (1 + 1e-12), f"step {step} {layer}: {ekfac} > {kfac}"
    spectra = {row["method"] for row in rows if row["metric"] == "spectrum_l2"}
    assert spectra == {"kfac", "ekfac", "ekfac_ra"}
    assert "HOLDS" in (tmp_path / "approx_quality.md").read_text()
