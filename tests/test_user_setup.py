"""The user's set-up: the README's Usage example, exactly as written, in a fresh process with JAX's
defaults (float32, one CPU device, x64 off), not the suite's (float64, 8 host devices).

Run as a script (``python tests/test_user_setup.py METHOD``) this module builds what the example
leaves to the user (``model``, ``params``, a batch ``x, y`` of the digits data), executes the
README's code block, trains with its ``train_step`` and prints one JSON line. The test runs that
script in a subprocess for EKFAC (the block as written), EKFAC-ra and KFAC (the block with its
preconditioner line swapped, nothing else).
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import user_environment

README = Path(__file__).resolve().parents[1] / "README.md"
AS_WRITTEN = "ek.scale_by_ekfac(blocks=blocks, damping=1e-3, basis_update_every=100)"
PRECONDITIONERS = {
    "ekfac": AS_WRITTEN,
    "ekfac_ra": AS_WRITTEN.replace("100)", '100, scaling="running")'),
    "kfac": AS_WRITTEN.replace("scale_by_ekfac", "scale_by_kfac"),
}
STEPS = 150  # crosses the example's basis refresh (every 100 steps)
BATCH = 128
TIMEOUT = 300  # seconds; one run takes about 10 s here (mostly compilation)


def usage_example() -> str:
    """The first Python block of the README's Usage section."""
    usage = README.read_text().split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def train(method: str) -> dict:
    """Trains the Usage example's ``train_step`` for ``STEPS`` minibatches of the digits data."""
    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from sklearn.datasets import load_digits

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.tanh(nn.Dense(64)(x)))

    digits = load_digits()
    images = np.asarray(digits.data / 16.0, np.float32)
    labels = np.asarray(digits.target, np.int32)
    model = Model()
    x, y = images[:BATCH], labels[:BATCH]
    params = model.init(jax.random.key(0), x)["params"]

    code = usage_example()
    assert AS_WRITTEN in code, "the README's Usage example changed: update this test"
    namespace = {"model": model, "params": params, "x": x, "y": y}
    exec(code.replace(AS_WRITTEN, PRECONDITIONERS[method]), namespace)
    train_step, params, opt_state = (namespace[k] for k in ("train_step", "params", "opt_state"))

    order = np.random.default_rng(0).permutation(len(images))
    losses = []
    for step in range(STEPS):
        batch = np.take(order, range(step * BATCH, (step + 1) * BATCH), mode="wrap")
        params, opt_state, loss = train_step(params, opt_state, images[batch], labels[batch])
        losses.append(float(loss))
    return {
        "losses": losses,
        "skipped": int(optax.tree_utils.tree_get(opt_state, "skipped")),
        "count": int(optax.tree_utils.tree_get(opt_state, "count")),
        "x64": bool(jax.config.jax_enable_x64),
        "devices": jax.device_count(),
        "dtypes": sorted({str(p.dtype) for p in jax.tree.leaves(params)}),
    }


@pytest.mark.parametrize(
    "method",
    # EKFAC-ra and KFAC differ from EKFAC in code the fast set runs elsewhere: 10 s each
    [
        "ekfac",
        pytest.param("ekfac_ra", marks=pytest.mark.slow),
        pytest.param("kfac", marks=pytest.mark.slow),
    ],
)
def test_readme_usage_trains_with_jax_defaults(method):
    """JAX's defaults hold in the run; every step is applied; the mean loss of the last 10 steps
    is at least 0.05 below that of the first 10.

    Measured: 2.36 -> 2.06 (EKFAC), 2.23 (EKFAC-ra), 2.07 (KFAC), falling in every 10-step window
    but one. The example learns slowly: its clipping at global norm 1 times learning rate 1e-2
    caps each step at 0.01 in parameter space (the defaults are issue 30's subject).
    """
    run = subprocess.run(
        [sys.executable, __file__, method],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=user_environment(),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["x64"], result["devices"], result["dtypes"]) == (False, 1, ["float32"])
    assert (result["skipped"], result["count"]) == (0, STEPS), result
    losses = result["losses"]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, losses


if __name__ == "__main__":
    print(json.dumps(train(sys.argv[1])))
