"""Smoke test of the deep auto-encoder benchmark (``benchmarks/autoencoder.py``)."""

import csv
import math

import pytest

from benchmarks import autoencoder

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_quick_run_writes_finite_results(tmp_path):
    result = autoencoder.main(["--quick", "--out", str(tmp_path)])
    for name in (
        "autoencoder_small.csv",
        "autoencoder_small_fig4.png",
        "autoencoder_small_fig5.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "autoencoder_small.md").read_text()
    assert "## Goals" in text and "EKFAC-ra" in text
    with open(tmp_path / "autoencoder_small.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {row["method"] for row in rows}
    assert {"EKFAC", "EKFAC-ra", "KFAC", "SGD", "Adam", "Adam+BN"} <= methods
    assert {row["basis_update_every"] for row in rows if row["experiment"] == "fig5"} == {"1", "10"}
    for row in rows:
        assert math.isfinite(float(row["train_loss"])), row
        assert math.isfinite(float(row["val_loss"])), row
    assert len(result["runs"]) == len(methods) + 4  # one config per method, then Figure 5
