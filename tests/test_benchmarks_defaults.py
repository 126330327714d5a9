"""Smoke test of ``benchmarks/defaults.py``: the quick configuration writes its outputs."""

import csv
import math

import pytest

from benchmarks import defaults  # importable: `pythonpath` in pyproject.toml

pytestmark = pytest.mark.slow  # a benchmark's quick run


def quick_rows(tmp_path, problem, *more):
    defaults.main(["--quick", "--problem", problem, "--out", str(tmp_path), *more])
    with open(tmp_path / f"defaults_{problem}_quick.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row["ms_per_step"]) > 0
        if row["diverged"] == "False":
            assert math.isfinite(float(row["final"])), row
    text = (tmp_path / f"defaults_{problem}_quick.md").read_text()
    assert "## Goals" in text and "reaches AdamW's best final loss" in text
    return rows


def test_every_method_runs_on_the_small_auto_encoder(tmp_path):
    rows = quick_rows(tmp_path, "ae8")
    expected = {(m, lr) for m, (grid, _) in defaults.METHODS.items() for lr in grid[2:3]}
    assert {(row["method"], float(row["lr"])) for row in rows} == expected


@pytest.mark.parametrize("problem", ["lm8192", "char_lm", "vgg"])
def test_the_other_problems_run(tmp_path, problem):
    rows = quick_rows(tmp_path, problem, "--methods", "KFE-Adam")
    assert [row["method"] for row in rows] == ["AdamW", "KFE-Adam"]


def test_an_unknown_method_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        defaults.main(["--quick", "--methods", "Adagrad", "--out", str(tmp_path)])


def test_method_names_with_commas_are_split_by_known_names():
    """``--methods`` is a comma list, and some names hold a comma themselves."""
    clipped = "EKFAC-ra (relative 0.1, norm 1e-3)"
    assert clipped in defaults.METHODS
    assert defaults.split_methods(f"muon,{clipped},KFE-Adam") == ["muon", clipped, "KFE-Adam"]
    assert defaults.split_methods(clipped) == [clipped]
    # An unknown name is kept as it is, for parse_args to refuse.
    assert defaults.split_methods("Adagrad,muon") == ["Adagrad", "muon"]


def test_counting_losses_by_hand():
    """Two tokens; the pair (0, 1) twice: first unseen (the unigram counts, one per token:
    p = 1/2), then seen once (w = 1/2 of c(0, 1) / c(0) = 1, 1/2 of the unigram 2/3)."""
    one = ([[0]], [[1]])
    losses = defaults.counting_losses([one, one], vocab=2)
    assert losses == pytest.approx([math.log(2), -math.log(0.5 * 2 / 3 + 0.5)], rel=1e-12)
