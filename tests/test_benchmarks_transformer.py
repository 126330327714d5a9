"""Smoke test of the transformer / depthwise-CNN benchmark (``benchmarks/transformer.py``)."""

import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import transformer

pytestmark = pytest.mark.slow  # a benchmark's quick run


def test_quick_run_writes_results_and_goals(tmp_path):
    result = transformer.main(["--quick", "--out", str(tmp_path)])
    for name in ("transformer.csv", "transformer.png", "transformer.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "transformer.md").read_text()
    for goal in ("Goal (a)", "Goal (b)", "Goal (c)"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"- {goal}"))
        assert "**holds**" in line or "**does not hold**" in line or "**not measured**" in line
    for task in transformer.TASKS:
        assert f"## {task}: " in text
    with open(tmp_path / "transformer.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {(row["task"], row["method"]) for row in rows}
    expected = {(t, m) for t, methods in transformer.QUICK_METHODS.items() for m in methods}
    assert pairs == expected
    for row in rows:
        assert row["status"] in ("ok", "diverged", "crashed"), row
        assert math.isfinite(float(row["seconds"])), row
    # Goal (a) is computed on the real models even in --quick: no parameter left as identity.
    for task in ("lm", "cnn"):
        structure = result["structures"][task]
        assert structure["error"] is None, structure["error"]
        assert structure["identity"] == [], structure["identity"]
    assert not [r for r in result["runs"] if r["error"]], "a run crashed"


def test_hybrid_labels_and_unmasked_branch():
    """The hybrid's EKFAC branch sees only its own parameters, the rest goes to Adam."""
    params = {
        "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
        "ln": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        "pos_embed": jnp.ones((4, 2)),
    }
    labels = transformer.hybrid_labels(params, {"dense": None})
    assert labels == {
        "dense": {"kernel": "ekfac", "bias": "ekfac"},
        "ln": {"scale": "adam", "bias": "adam"},
        "pos_embed": "adam",
    }
    seen = {}

    def init(p):
        seen["init"] = jax.tree_util.tree_structure(p)
        return optax.EmptyState()

    def update(u, state, p=None, *, marker):
        seen["update"] = jax.tree_util.tree_structure(u)
        seen["marker"] = marker
        return jax.tree.map(lambda x: 2.0 * x, u), state

    branch = transformer.without_masked_nodes(optax.GradientTransformationExtraArgs(init, update))
    tx = optax.multi_transform({"ekfac": branch, "adam": optax.sgd(1.0)}, labels)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params, marker=7)
    own = jax.tree_util.tree_structure({"dense": {"bias": 0, "kernel": 0}})
    assert seen["init"] == own and seen["update"] == own and seen["marker"] == 7
    np.testing.assert_allclose(updates["dense"]["kernel"], 2.0)
    np.testing.assert_allclose(updates["ln"]["scale"], -1.0)  # sgd(1.0): -g
    np.testing.assert_allclose(updates["pos_embed"], -1.0)


def test_hybrid_with_the_library_preconditions_only_kronecker_blocks():
    """The hybrid on a Dense -> LayerNorm -> Dense model (plus a free parameter): one step;
    the LayerNorm and the free parameter get Adam's first step, the Dense layers EKFAC's."""
    import flax.linen as nn

    import ekfac_optax as ek

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + self.param("shift", nn.initializers.normal(1.0), (x.shape[-1],))
            x = nn.LayerNorm(name="ln")(nn.tanh(nn.Dense(8, name="hidden")(x)))
            return nn.Dense(3, name="out")(x)

    model = Model()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    blocks = ek.find_blocks(loss_fn, params, x, y)
    kron = transformer.kronecker_only(blocks)
    assert sorted(kron) == ["hidden", "out"] and "ln" in blocks
    labels = transformer.hybrid_labels(params, kron)
    lr = 0.1
    tx = transformer.method_tx("Hybrid", blocks, labels, lr, 1e-3, clip=True)
    state = tx.init(params)
    loss, grads, stats = ek.value_grad_and_stats(loss_fn, layers=kron)(params, x, y)
    assert sorted(stats) == ["hidden", "out"]
    updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, state, params, stats
    )
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    adam_lr = transformer.HYBRID_ADAM_RATIO * lr
    for g, u in (
        (grads["ln"]["scale"], updates["ln"]["scale"]),
        (grads["shift"], updates["shift"]),
    ):
        np.testing.assert_allclose(u, -adam_lr * g / (jnp.abs(g) + 1e-8), rtol=1e-4, atol=1e-7)
    kernel_update = updates["hidden"]["kernel"]
    adam_like = -adam_lr * jnp.sign(grads["hidden"]["kernel"])
    assert not np.allclose(kernel_update, adam_like)
    kron_norm = optax.tree.norm({"hidden": updates["hidden"], "out": updates["out"]})
    assert float(kron_norm) <= lr * (1 + 1e-5)  # clipped to norm 1, then times lr
