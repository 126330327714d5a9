"""Multi-device training on JAX's SPMD machinery, on 8 CPU devices.

``conftest.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts.
References are single-device runs of the same steps on the whole batch; float64, so the only
differences are the order of the cross-device sums (relative ~1e-15; after three steps through
eigendecompositions of well-separated spectra, ~1e-10 at most: the tolerances below).
Eigenvectors are compared up to sign (``|U₁ᵀ U₂| ≈ I``), the sign being a free choice of ``eigh``.
"""

import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MLP, classifier_loss, train_step
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ekfac_optax as ek

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
RTOL, ATOL = 1e-9, 1e-12


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def problem(kind):
    model = MLP((16, 8, 4)) if kind == "mlp" else CNN()
    shape = (32, 6) if kind == "mlp" else (32, 6, 6, 3)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    xs = jax.random.normal(kx, (3, *shape), jnp.float64)
    ys = jax.random.randint(ky, (3, shape[0]), 0, 4)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(kp, xs[0])["params"])

    return classifier_loss(model), params, xs, ys


def problem_blocks(kind):
    """``ek.find_blocks`` of the problem's loss on its first batch."""
    loss_fn, params, xs, ys = problem(kind)
    return ek.find_blocks(loss_fn, params, xs[0], ys[0])


def train(tx, loss_fn, params, xs, ys, put_params=lambda t: t, put_batch=lambda t: t):
    """Three jitted steps; returns the params, the state and the compiled step's HLO text."""
    step = train_step(loss_fn, tx)
    params = put_params(params)
    state = put_params(tx.init(params))
    hlo = step.lower(params, state, put_batch(xs[0]), put_batch(ys[0])).compile().as_text()
    for x, y in zip(xs, ys, strict=True):
        params, state, _ = step(params, state, put_batch(x), put_batch(y))
    return params, state, hlo


def assert_same_training(got, want):
    (params, state, _), (ref_params, ref_state, _) = got, want
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), params, ref_params
    )
    for path, block in state[0].blocks.items():
        ref = ref_state[0].blocks[path]
        for name in ("factor_a", "factor_b", "eigvals_a", "eigvals_b", "scalings"):
            np.testing.assert_allclose(
                getattr(block, name), getattr(ref, name), rtol=RTOL, atol=ATOL, err_msg=path
            )
        for name in ("basis_a", "basis_b"):
            if getattr(block, name) is None:  # a side above max_factor_dim: no basis
                assert getattr(ref, name) is None, path
                continue
            overlap = np.abs(np.asarray(getattr(block, name)).T @ np.asarray(getattr(ref, name)))
            np.testing.assert_allclose(overlap, np.eye(len(overlap)), atol=1e-8, err_msg=path)
    assert int(state[0].count) == int(ref_state[0].count) == 3


def mesh8():
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def fsdp(mesh):
    """Shards each parameter's last axis over the mesh where it divides, else replicates."""

    def put(tree):
        def one(x):
            spec = P(*([None] * (x.ndim - 1)), "data") if x.ndim and x.shape[-1] % 8 == 0 else P()
            return jax.device_put(x, NamedSharding(mesh, spec))

        return jax.tree.map(one, tree)

    return put


def make_tx(blocks, scaling, mesh=None, max_factor_dim=None):
    kw = dict(blocks=blocks, damping=1e-2, basis_update_every=2, mesh=mesh)
    if scaling == "kfac":
        return ek.kfac(0.1, max_factor_dim=max_factor_dim, **kw)
    return ek.ekfac(0.1, scaling=scaling, max_factor_dim=max_factor_dim, **kw)


@pytest.mark.slow  # 12 compiled data-parallel runs (80 s); the mesh code: the test below
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("scaling", ["batch", "running", "kfac"])
@pytest.mark.parametrize("params_layout", ["replicated", "fsdp"])
def test_data_parallel_equals_one_device(kind, scaling, params_layout):
    """Batch sharded over 8 devices, params replicated or FSDP-sharded = one device, whole batch."""
    loss_fn, params, xs, ys = problem(kind)
    blocks = problem_blocks(kind)
    one_device = jax.devices()[0]
    want = train(make_tx(blocks, scaling), loss_fn, params, xs, ys,
                 put_params=lambda t: jax.device_put(t, one_device),
                 put_batch=lambda t: jax.device_put(t, one_device))  # fmt: skip
    mesh = mesh8()
    replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))  # noqa: E731
    got = train(
        make_tx(blocks, scaling),
        loss_fn,
        params,
        xs,
        ys,
        put_params=replicate if params_layout == "replicated" else fsdp(mesh),
        put_batch=lambda t: jax.device_put(t, NamedSharding(mesh, P("data"))),
    )
    assert_same_training(got, want)
    # XLA reduced the batch statistics across the devices.
    assert "all-reduce" in got[2]


def eigh_batch_sizes(hlo: str) -> list[int]:
    """The batch size of every LAPACK ``syevd`` call in a compiled (per-device) HLO module."""
    sizes = []
    for line in hlo.splitlines():
        if "syevd" in line and "custom-call(" in line:
            shapes = re.findall(r"f64\[([\d,]+)\]", line.split("custom-call(")[1])
            dims = [int(d) for d in shapes[0].split(",")]
            sizes.append(dims[0] if len(dims) == 3 else 1)
    return sizes


@pytest.mark.parametrize(
    "kind, cap",
    [("mlp", None), ("mlp", 8), pytest.param("cnn", None, marks=pytest.mark.slow)],
    ids=["mlp", "mlp_capped", "cnn"],
)
def test_sharded_eigh_equals_replicated_and_is_spread(kind, cap):
    """``mesh=`` decomposes each factor on one device: same training, 1-matrix eigh per device.
    With ``max_factor_dim=8`` (the MLP's 7x16, 17x8 and 9x4 blocks: one side capped in each)
    only the sides below the cap are decomposed and communicated."""
    loss_fn, params, xs, ys = problem(kind)
    blocks = problem_blocks(kind)
    mesh = mesh8()
    replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))  # noqa: E731
    batch = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))  # noqa: E731
    want = train(make_tx(blocks, "batch", None, cap), loss_fn, params, xs, ys, replicate, batch)
    got = train(make_tx(blocks, "batch", mesh, cap), loss_fn, params, xs, ys, replicate, batch)
    assert_same_training(got, want)
    # Without a mesh every device decomposes every factor (batched by shape); with it, each
    # device decomposes at most ceil(k / 8) = 1 of each group of k <= 8 same-shaped factors.
    sizes = [d for s in blocks.values() for d in (s.d_in_aug, s.d_out) if cap is None or d <= cap]
    assert len(sizes) == (2 * len(blocks) if cap is None else len(blocks))
    assert sum(eigh_batch_sizes(want[2])) == len(sizes)
    spread = eigh_batch_sizes(got[2])
    assert spread and all(size == 1 for size in spread)
    # What is communicated for the basis: exactly the eigenvalues and eigenvectors of every
    # factor (float64), each group of same-sized factors padded to a multiple of 8 devices.
    want_bytes = sum(-(-sizes.count(d) // 8) * 8 * (d * d + d) * 8 for d in set(sizes))
    assert all_gather_bytes(got[2]) == want_bytes
    assert all_gather_bytes(want[2]) == 0


def all_gather_bytes(hlo: str) -> int:
    """Bytes of the results of the all-gather ops of a compiled HLO module (float64 arrays)."""
    total = 0
    for dims in re.findall(r"= f64\[([\d,]+)\]\S* all-gather\(", hlo):
        total += 8 * int(np.prod([int(d) for d in dims.split(",")]))
    return total


def test_mesh_must_be_a_mesh():
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        ek.ekfac(0.1, blocks={}, mesh=jax.devices())


@pytest.mark.slow
def test_checkpoint_restores_on_another_device_count(tmp_path):
    """A state saved from 8 devices (FSDP) restores on 1 device, in-process and in a process that
    has a single device; a single-device state restores onto the 8-device mesh."""
    loss_fn, params, xs, ys = problem("mlp")
    mesh = mesh8()
    tx = make_tx(problem_blocks("mlp"), "running", mesh)
    _, state, _ = train(tx, loss_fn, params, xs, ys, fsdp(mesh),
                        lambda t: jax.device_put(t, NamedSharding(mesh, P("data"))))  # fmt: skip
    ek.save_state(tmp_path / "from8", state)
    np.savez(tmp_path / "want.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])

    one = jax.devices()[0]
    restored = ek.restore_state(tmp_path / "from8", jax.device_put(tx.init(params), one))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding.device_set == {one}
        np.testing.assert_array_equal(got, want)
    back = ek.restore_state(
        tmp_path / "from8", jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    )
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        assert len(got.sharding.device_set) == 8
        np.testing.assert_array_equal(got, want)

    script = textwrap.dedent(f"""
        import jax, numpy as np, optax
        jax.config.update("jax_enable_x64", True)
        import ekfac_optax as ek
        from test_distributed import problem, problem_blocks
        assert jax.device_count() == 1, jax.device_count()
        _, params, _, _ = problem("mlp")
        tx = ek.ekfac(0.1, blocks=problem_blocks("mlp"), damping=1e-2, basis_update_every=2,
                      scaling="running")
        restored = ek.restore_state({str(tmp_path / "from8")!r}, tx.init(params))
        want = np.load({str(tmp_path / "want.npz")!r})
        for i, got in enumerate(jax.tree.leaves(restored)):
            np.testing.assert_array_equal(got, want[f"arr_{{i}}"])
        print("restored", len(jax.tree.leaves(restored)), "arrays on", jax.devices())
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, os.path.dirname(tests_dir)])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored" in result.stdout
