"""Tests of the shared training loop of the benchmarks (``benchmarks/_training.py``)."""

import math

import numpy as np

from benchmarks._training import Runner, train_alternated


def _runner(factor: float) -> Runner:
    """``state`` is a float multiplied by ``factor`` each step; the loss is the state."""
    return Runner(
        init=lambda: 1.0,
        step=lambda state, batch: (state * factor, state * factor),
        evaluate=lambda state: (state,),
    )


def test_diverged_run_stops_and_the_others_go_on():
    data = (np.arange(20.0),)  # 4 minibatches of 5 per epoch
    runners = [("explodes", _runner(1e100)), ("halves", _runner(0.5))]
    exploding, halving = train_alternated(runners, data, epochs=3, batch=5, seed=0)
    # 1e100 ** 4 overflows to inf in the first epoch: the run stops after that epoch's row.
    assert [row[0] for row in exploding] == [0, 1]
    assert math.isinf(exploding[-1][2])
    # The other run trains all 3 epochs: 12 halvings.
    assert [row[0] for row in halving] == [0, 1, 2, 3]
    assert [row[2] for row in halving] == [1.0, 0.5**4, 0.5**8, 0.5**12]
    seconds = [row[1] for row in halving]
    assert seconds[0] == 0.0 and seconds == sorted(seconds)


def test_progress_line_has_an_eta(capsys):
    """Long runs show ``[k/total] what, elapsed, ETA`` on stderr, every ``every`` units and at
    the last one."""
    from benchmarks._common import Progress

    progress = Progress(5, every=2)
    for k in range(5):
        progress.advance(f"unit {k + 1}")
    progress.done()
    err = capsys.readouterr().err
    assert "[2/5] unit 2, 0m00s elapsed, ETA 0m00s" in err
    assert "[5/5] unit 5" in err and "[3/5]" not in err and err.endswith("\n")
