"""A convolution's statistics without its patch tensor (issue 32).

The capture holds a convolution's ``h`` as :class:`~ekfac_optax.kinds._patches.Patches` of its
padded input; the factors and EKFAC's batch ``s*`` materialise the patches a chunk of examples
at a time. Checked here against references the tests compute themselves, in float64:

- ``Patches`` stands for the patches of ``jax.lax.conv_general_dilated_patches`` (JAX's own
  patch extraction, channel-major, reordered here) for strides, dilations, paddings, extra batch
  axes, and keeps that meaning through ``vmap``, ``scan`` and ``jax.tree.map``;
- ``E[h hᵀ]``, ``E[h]``, ``E[h²]`` and ``mean_t h``, chunk by chunk, equal numpy's on the dense
  patches, with chunks forced small (one example; ``N`` prime);
- ``s*`` from per-example gradients ``G_n = Σ_t h δᵀ`` of ``Patches`` equals ``mean_n (U_Aᵀ G_n
  U_B)²`` from ``jax.vmap(jax.grad(...))``, on the CPU loop and the batched path;
- no array of the patch tensor's size is formed in a jitted EKFAC train step (its jaxpr).

Tolerance: float64 sums of at most a few hundred products of unit normals: round-off ~1e-14
relative; 1e-12 leaves a margin while a wrong chunk, offset or missing example is O(1).
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import ekfac_optax as ek
from ekfac_optax.curvature import _scalings
from ekfac_optax.kinds import _patches

RTOL = 1e-12
F64 = jnp.float64

# (input shape, kernel, strides, padding, kernel dilation): SAME, VALID, explicit, strided,
# dilated, 1-D, and an extra batch axis (positions too).
GEOMETRIES = [
    ((5, 6, 7, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((4, 8, 5, 2), (3, 2), (2, 1), "VALID", (1, 1)),
    ((3, 9, 9, 2), (2, 3), (2, 3), ((1, 2), (0, 1)), (1, 1)),
    ((3, 9, 8, 2), (3, 3), (1, 1), "SAME", (2, 2)),
    ((6, 11, 3), (4,), (1,), "CIRCULAR", (1,)),
    ((2, 3, 6, 5, 2), (3, 3), (1, 1), "SAME", (1, 1)),
]


def geometry_of(kernel, strides, padding, dilation):
    conv = nn.Conv(1, kernel, strides, padding, kernel_dilation=dilation)
    return _patches.conv_geometry(conv)


def reference_patches(x, kernel, strides, padding, dilation):
    """``(N, T, prod(kernel) c)`` patches, offset-major, from ``conv_general_dilated_patches``
    (channel-major; CIRCULAR padded by hand as Flax does)."""
    rank = len(kernel)
    lead = x.shape[: x.ndim - rank - 1]
    x = x.reshape(-1, *x.shape[-rank - 1 :])
    if padding == "CIRCULAR":
        pads = [
            ((k - 1) * d // 2, ((k - 1) * d + 1) // 2)
            for k, d in zip(kernel, dilation, strict=True)
        ]
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode="wrap")
        padding = "VALID"
    spatial = "".join("HWD"[:rank])
    numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    out = jax.lax.conv_general_dilated_patches(
        x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers
    )
    c = x.shape[-1]
    out = out.reshape(*out.shape[:-1], c, -1)  # channel-major -> offset-major
    out = jnp.swapaxes(out, -1, -2).reshape(*out.shape[:-2], -1)
    return out.reshape(lead[0], -1, out.shape[-1])


def patches_of(shape, kernel, strides, padding, dilation, key=0):
    x = jax.random.normal(jax.random.key(key), shape, F64)
    geometry = geometry_of(kernel, strides, padding, dilation)
    extra = len(shape) - len(kernel) - 2
    return x, _patches.Patches(_patches.pad(geometry, x), geometry, extra)


@pytest.mark.parametrize("case", GEOMETRIES)
def test_patches_stand_for_jax_patches(case):
    shape, *conv = case
    x, h = patches_of(shape, *conv)
    expected = reference_patches(x, *conv)
    assert h.shape == expected.shape and h.ndim == 3 and h.dtype == F64
    np.testing.assert_array_equal(np.asarray(h), expected)
    np.testing.assert_array_equal(h.dense(), expected)
    np.testing.assert_array_equal(h[0], expected[0])  # indexing: of the dense patches
    np.testing.assert_array_equal(h[1:, :2], expected[1:, :2])
    # A 3x3 kernel with unit strides: the padded input is 9x smaller than its patches, less the
    # padding's share (these tiny inputs: over 4x).
    if conv[0] == (3, 3) and conv[1] == (1, 1):
        assert 4 * h.padded.size < expected.size
    # Leading axes map: per example (vmap), a stack of two (tree.map), a scan over examples.
    per_example = jax.vmap(lambda p: p.dense())(h)
    np.testing.assert_array_equal(per_example, expected)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), h, h)
    assert stacked.shape == (2, *expected.shape)
    _, scanned = jax.lax.scan(lambda c, p: (c, p.dense()), 0, h)
    np.testing.assert_array_equal(scanned, expected)


def test_conv_transpose_patches():
    """An ``nn.ConvTranspose``'s patches: those of the VALID convolution of the input dilated
    by the strides and padded by ``lax.conv_transpose``'s rule, checked through the layer:
    ``patches @ kernel`` is its output."""
    layer = nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding="SAME", param_dtype=F64)
    x = jax.random.normal(jax.random.key(2), (2, 4, 5, 2), F64)
    params = layer.init(jax.random.key(3), x)
    geometry = _patches.conv_transpose_geometry(layer)
    h = _patches.Patches(_patches.pad(geometry, x), geometry)
    kernel = params["params"]["kernel"]
    out = layer.apply(params, x) - params["params"]["bias"]
    np.testing.assert_allclose(
        h.dense() @ kernel.reshape(-1, 3), out.reshape(2, -1, 3), rtol=RTOL, atol=1e-13
    )


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("diagonal", [False, True])
def test_moments_chunk_by_chunk(monkeypatch, n, diagonal):
    """``E[h hᵀ]`` (or ``E[h²]``) and ``E[h]`` over ``(n, t)``, chunks of at most one example's
    bytes (6 examples: 6 chunks of 1 (2 examples' bytes would give 3 of 2); 7: prime)."""
    x, h = patches_of((n, 6, 5, 3), (3, 3), (1, 1), "SAME", (1, 1))
    dense = np.asarray(reference_patches(x, (3, 3), (1, 1), "SAME", (1, 1))).reshape(-1, 27)
    monkeypatch.setattr(_patches, "CHUNK_BYTES", 2 * 30 * 27 * 8)
    assert _patches.chunk_size(h) == (2 if n == 6 else 1)
    second, mean = _patches.moments(h, diagonal)
    expected = np.mean(dense**2, 0) if diagonal else dense.T @ dense / len(dense)
    np.testing.assert_allclose(second, expected, rtol=RTOL)
    np.testing.assert_allclose(mean, dense.mean(0), rtol=RTOL, atol=1e-15)
    # position means (K-FAC-reduce), per example
    np.testing.assert_allclose(
        h.position_mean()[:, 0], dense.reshape(n, 30, 27).mean(1), rtol=RTOL, atol=1e-15
    )


@pytest.mark.parametrize("batched", [True, False])
def test_batch_scalings_of_patches(monkeypatch, batched):
    """``rotated_batch_scalings`` of ``Patches`` equals ``mean_n (U_Aᵀ G_n U_B)²`` with ``G_n``
    the per-example gradients of ``Σ_t h_aug_tᵀ W δ_t`` (``jax.vmap(jax.grad(...))`` on the
    dense patches); the batched path in chunks of two examples."""
    monkeypatch.setattr(_patches, "CHUNK_BYTES", 2 * 20 * 18 * 8)
    x, h = patches_of((6, 4, 5, 2), (3, 3), (1, 1), "SAME", (1, 1))
    dense = reference_patches(x, (3, 3), (1, 1), "SAME", (1, 1))
    keys = jax.random.split(jax.random.key(4), 3)
    delta = jax.random.normal(keys[0], (6, 20, 4), F64)
    basis_a = jnp.linalg.qr(jax.random.normal(keys[1], (19, 19), F64))[0]
    basis_b = jnp.linalg.qr(jax.random.normal(keys[2], (4, 4), F64))[0]
    h_aug = jnp.concatenate([dense, jnp.ones((6, 20, 1), F64)], axis=-1)
    grads = ref.per_example_grads(
        lambda w, h, d: jnp.mean(jnp.sum((h @ w) * d, axis=(1, 2))),
        jnp.zeros((19, 4), F64),
        h_aug,
        delta,
    )
    expected = np.mean(ref.to_kfe(np.asarray(grads), basis_a, basis_b) ** 2, axis=0)
    actual = _scalings.rotated_batch_scalings(h, delta, basis_a, basis_b, True, batched=batched)
    np.testing.assert_allclose(actual, expected, rtol=RTOL)


class VGGish(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), param_dtype=F64, name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, param_dtype=F64, name="conv2")(x))
        return nn.Dense(3, param_dtype=F64, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("scaling", ["batch", "running", "kfac"])
def test_no_patch_tensor_in_a_train_step(monkeypatch, scaling):
    """The jitted train step (capture, factors, ``s*``, update) of a CNN never forms an array
    as large as a convolution's patch tensor ``N T k² c``: the statistics hold the padded input
    and the reductions materialise one example's patches at a time (chunks forced to one
    example, one per device). Not vacuous: the patches do appear when the stats are made dense."""
    monkeypatch.setattr(_patches, "CHUNK_BYTES", 1)
    model = VGGish()
    x = jax.random.normal(jax.random.key(5), (64, 8, 8, 4), F64)
    y = jnp.arange(64) % 3
    params = model.init(jax.random.key(6), x)["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    blocks = ek.find_blocks(loss_fn, params, x, y)
    if scaling == "kfac":
        opt = ek.kfac(0.1, blocks=blocks, basis_update_every=1)
    else:
        opt = ek.ekfac(0.1, blocks=blocks, basis_update_every=1, scaling=scaling)

    def step(params, state, dense=False):
        _, grads, stats = ek.value_grad_and_stats(loss_fn, layers=blocks)(params, x, y)
        if dense:
            stats = {p: s._replace(h=_patches.dense(s.h)) for p, s in stats.items()}
        updates, state = opt.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    # conv1's patch tensor (conv2's groups: the same size). The s* loop takes one example of each
    # of its chunks at a time: 8 with the tests' 8 host devices, 1/8 of the batch.
    patch_size = 64 * 64 * 9 * 4

    def largest(jaxpr):
        sizes = [0]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else [value]:
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's
                    if hasattr(sub, "eqns"):
                        sizes.append(largest(sub))
        return max(sizes)

    # the largest: the grouped conv's padded input, (2, 64, 10, 10, 4) (tiny images: 2.9x smaller)
    assert largest(jax.make_jaxpr(step)(params, state).jaxpr) < patch_size / 2
    assert largest(jax.make_jaxpr(lambda p, s: step(p, s, True))(params, state).jaxpr) >= patch_size
    # and the step runs, finite
    new_params, _ = jax.jit(step)(params, state)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(new_params))


def test_offsets_are_offset_major():
    """Feature ``f`` of a patch is row ``f`` of ``kernel.reshape(-1, c_out)``: offset-major."""
    x, h = patches_of((1, 3, 3, 2), (2, 2), (1, 1), "VALID", (1, 1))
    dense = np.asarray(h)[0]
    for t, (i, j) in enumerate(itertools.product(range(2), range(2))):
        for f, (di, dj, c) in enumerate(itertools.product(range(2), range(2), range(2))):
            assert dense[t, f] == x[0, i + di, j + dj, c]
