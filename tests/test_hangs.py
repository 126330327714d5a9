"""No hang (issue 34): each model of ``stress_models.py`` (every layer-kind family, linen, scanned
and NNX, width 64) trains for 4 EKFAC steps across a basis refresh in its own process, with JAX's
default configuration (one CPU device, float32, all cores), under a timeout.

Before the fix the scanned models' first update never finished on a 2-core machine (batched
``eigh`` kernels deadlocking XLA's intra-op pool, see ``_eigenbasis.eigh_each``); run in the
test's own process such a hang would block the suite, in a subprocess it fails this test. Each
run takes 10-20 s here (mostly compilation), so ``TIMEOUT`` leaves a loaded machine a wide margin.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import user_environment
from stress_models import MODELS

pytestmark = pytest.mark.slow  # ten subprocesses, each compiling a model (2 min)

TIMEOUT = 300  # seconds; measured 10-20 s per model on the 2-core CI machine


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_finishes_across_a_basis_refresh(name):
    """The run ends within the timeout, every step is applied and lowers the training loss
    (the same batch each step, learning rate 0.01, damping 0.1)."""
    script = Path(__file__).with_name("stress_models.py")
    try:
        run = subprocess.run(
            [sys.executable, str(script), name],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=user_environment(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: 4 training steps did not finish in {TIMEOUT} s (a hang)")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    losses = result["losses"]
    assert result["skipped"] == 0, result
    assert all(math.isfinite(loss) for loss in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
