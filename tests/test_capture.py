"""``value_grad_and_stats`` against ``jax.value_and_grad`` and the independent reference.

The reference ``h`` (conv: patches cut out by explicit loops over the kernel offsets) and
``delta`` (the gradient of each example's own loss with respect to a probe on the layer output)
come from the hand-written forward passes of ``reference.py``; per-example gradients from
``jax.vmap(jax.grad(...))``. Everything is float64: ``h`` is copied or gathered (exact), ``delta``
and gradients are computed by the same chain rule in a different order, so they agree to round-off
(relative ``1e-12`` allows for sums of ~100 terms of ``1e-16`` error each, with margin).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import ekfac_optax as ek

F64 = dict(param_dtype=jnp.float64)


def log_cosh_loss(outputs, y):
    """Mean over the batch of ``Σ log cosh(output - y_n)`` over every output of every branch."""
    target = y.astype(jnp.float64)
    per_example = 0.0
    for out in jax.tree.leaves(outputs):
        diff = out - target.reshape(-1, *(1,) * (out.ndim - 1))
        per_example = per_example + jnp.sum(jnp.log(jnp.cosh(diff)), axis=tuple(range(1, out.ndim)))
    return per_example.mean()


class Conv2dBranches(nn.Module):
    """Parallel layers on one ``(N, 7, 6, 2)`` input: the variants of ``nn.Conv`` and a Dense on
    the 4-D input (positions = the 7 x 6 pixels)."""

    @nn.compact
    def __call__(self, x):
        return (
            nn.Conv(2, (3, 3), padding="SAME", name="same", **F64)(x),
            # SAME with stride 2 pads (1, 1) on 7 rows and (0, 1) on 6 columns.
            nn.Conv(2, (3, 3), strides=2, padding="SAME", name="same_stride2", **F64)(x),
            nn.Conv(2, (3, 2), strides=(2, 1), padding="VALID", name="valid_stride2", **F64)(x),
            nn.Conv(2, (3, 3), strides=2, padding="CIRCULAR", name="circular_stride2", **F64)(x),
            nn.Conv(2, (2, 3), padding="REFLECT", name="reflect", **F64)(x),
            nn.Conv(2, (3, 3), padding=2, kernel_dilation=2, name="int_dilated", **F64)(x),
            nn.Conv(
                2,
                (2, 2),
                strides=(1, 2),
                padding=((1, 0), (2, 1)),
                use_bias=False,
                name="pairs_no_bias",
                **F64,
            )(x),
            nn.Dense(2, name="dense", **F64)(x),
        )


def conv2d_branches_forward(tape, x):
    return (
        tape.conv("same", x, padding="SAME"),
        tape.conv("same_stride2", x, strides=2, padding="SAME"),
        tape.conv("valid_stride2", x, strides=(2, 1), padding="VALID"),
        tape.conv("circular_stride2", x, strides=2, padding="CIRCULAR"),
        tape.conv("reflect", x, padding="REFLECT"),
        tape.conv("int_dilated", x, padding=2, dilation=2),
        tape.conv("pairs_no_bias", x, strides=(1, 2), padding=((1, 0), (2, 1))),
        tape.dense("dense", x),
    )


class Conv1dBranches(nn.Module):
    """Parallel layers on one ``(N, 9, 3)`` sequence input."""

    @nn.compact
    def __call__(self, x):
        return (
            nn.Conv(2, (3,), padding="CAUSAL", kernel_dilation=2, name="causal_dilated", **F64)(x),
            nn.Conv(2, 4, strides=3, padding="SAME", name="int_kernel_stride3", **F64)(x),
            nn.Conv(2, (3,), padding="CIRCULAR", kernel_dilation=2, name="circular", **F64)(x),
            nn.Dense(2, name="dense", **F64)(x),
        )


def conv1d_branches_forward(tape, x):
    return (
        tape.conv("causal_dilated", x, padding="CAUSAL", dilation=2),
        tape.conv("int_kernel_stride3", x, strides=3, padding="SAME"),
        tape.conv("circular", x, padding="CIRCULAR", dilation=2),
        tape.dense("dense", x),
    )


PROBLEMS = {
    **ref.PROBLEMS,
    "conv2d": ref.Problem(Conv2dBranches(), conv2d_branches_forward, (7, 6, 2), 4, log_cosh_loss),
    "conv1d": ref.Problem(Conv1dBranches(), conv1d_branches_forward, (9, 3), 4, log_cosh_loss),
}


@functools.cache
def capture(name: str):
    """``jax.jit(value_grad_and_stats(loss_fn))`` on the problem's batch, once per session."""
    problem = PROBLEMS[name]
    return jax.jit(ek.value_grad_and_stats(problem.loss_fn))(problem.params, *problem.data)


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def captured(request):
    """A problem and ``(loss, grads, stats)`` of ``value_grad_and_stats`` on its batch."""
    return request.param, PROBLEMS[request.param], *capture(request.param)


def test_value_and_grads_are_jax_value_and_grad(captured):
    """The value and gradients are those of ``jax.value_and_grad(loss_fn)`` (the zero probes
    change nothing)."""
    _, problem, loss, grads, _ = captured
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(problem.loss_fn))(
        problem.params, *problem.data
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-14)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    for actual, expected in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)


def test_stats_are_reference_h_and_delta(captured):
    """``h`` is each layer's input (conv: the patches, in ``kernel.reshape(-1, c_out)`` row
    order), ``delta`` the per-example output gradient; positions of conv outputs, extra input
    axes and calls of a shared layer are concatenated in call order."""
    _, problem, _, _, stats = captured
    assert set(stats) == set(problem.layers) == set(problem.params)
    for path, layer in problem.layers.items():
        assert stats[path].h.shape == layer.h.shape, path
        assert stats[path].delta.shape == layer.delta.shape, path
        # h is gathered with an identity kernel: exact up to the round-off of x·1 + 0.
        np.testing.assert_allclose(stats[path].h, layer.h, rtol=1e-14, atol=1e-15, err_msg=path)
        assert ref.relative_error(stats[path].delta, layer.delta) < 1e-12, path


def test_stats_give_per_example_grads(captured):
    """``Σ_t h_aug δᵀ`` from the stats is the per-example gradient ``G_n`` of
    ``jax.vmap(jax.grad(...))``: the patches' feature order matches ``kernel.reshape(-1, c_out)``
    and ``delta`` is scaled as the gradient of each example's own loss."""
    _, problem, _, _, stats = captured
    for path, layer in problem.layers.items():
        h_aug = ref.augment(stats[path].h, layer.has_bias)
        per_example = np.einsum("nti,nto->nio", h_aug, stats[path].delta)
        assert ref.relative_error(per_example, layer.per_example) < 1e-12, path


@pytest.mark.parametrize("name", ["conv2d", "conv1d"])
def test_reference_patches_are_flax_conv(name):
    """The reference's loop-cut patches times the kernel give Flax's ``nn.Conv`` output for
    every padding, stride and dilation above (validates the reference against lax)."""
    problem = PROBLEMS[name]
    x, _ = problem.data
    expected = jax.jit(problem.model.apply)({"params": problem.params}, x)
    actual = jax.jit(ref.hand_forward, static_argnums=0)(problem.forward, problem.params, x)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-13)


def test_shared_layer_positions_in_call_order():
    """The ``Shared`` model's ``pair`` layer is called on ``x[:, :8]`` then ``x[:, 8:]``: its
    positions are these two inputs, in that order."""
    problem = PROBLEMS["shared"]
    x, _ = problem.data
    _, _, stats = capture("shared")
    assert stats["pair"].h.shape == (x.shape[0], 2, 8)
    np.testing.assert_array_equal(stats["pair"].h[:, 0], x[:, :8])
    np.testing.assert_array_equal(stats["pair"].h[:, 1], x[:, 8:])
    assert stats["loop"].h.shape == (x.shape[0], 2, 8)


def test_output_layer_delta_is_softmax_minus_one_hot():
    """For a mean softmax cross-entropy, the per-example gradient of the logits is
    ``softmax(logits_n) - onehot(y_n)``: ``N`` times the gradient of the mean loss."""
    problem = PROBLEMS["mlp"]
    x, y = problem.data
    _, _, stats = capture("mlp")
    logits = jax.jit(problem.model.apply)({"params": problem.params}, x)
    expected = jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1])
    np.testing.assert_allclose(stats["Dense_2"].delta[:, 0], expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(stats["Dense_0"].h[:, 0], x)


def test_has_aux():
    """``has_aux=True`` returns ``((loss, aux), grads, stats)`` as ``jax.value_and_grad`` does,
    with the same stats as without aux."""
    problem = PROBLEMS["mlp"]
    x, y = problem.data

    def loss_with_aux(params, x, y):
        logits = problem.model.apply({"params": params}, x)
        return problem.output_loss(logits, y), {"logits": logits}

    (loss, aux), grads, stats = jax.jit(ek.value_grad_and_stats(loss_with_aux, has_aux=True))(
        problem.params, x, y
    )
    expected_value_and_grad = jax.jit(jax.value_and_grad(loss_with_aux, has_aux=True))
    (expected_loss, expected_aux), expected_grads = expected_value_and_grad(problem.params, x, y)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-14)
    np.testing.assert_allclose(aux["logits"], expected_aux["logits"], rtol=1e-14)
    for actual, expected in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)
    assert set(stats) == set(problem.layers)
    for path, layer in problem.layers.items():
        np.testing.assert_array_equal(stats[path].h, layer.h)
        assert ref.relative_error(stats[path].delta, layer.delta) < 1e-12, path


@pytest.mark.parametrize(
    "name, layers", [("mlp", ["Dense_0", "Dense_2"]), ("cnn", ["Conv_1"]), ("shared", ["loop"])]
)
def test_layers_restricts_capture(name, layers):
    """``layers=[...]`` captures exactly those layers (same stats as a full capture); the
    gradients still cover every parameter."""
    problem = PROBLEMS[name]
    _, grads, stats = jax.jit(ek.value_grad_and_stats(problem.loss_fn, layers=layers))(
        problem.params, *problem.data
    )
    assert sorted(stats) == sorted(layers)
    assert jax.tree.structure(grads) == jax.tree.structure(problem.params)
    for path in layers:
        np.testing.assert_allclose(stats[path].h, problem.layers[path].h, rtol=1e-14, atol=1e-15)
        assert ref.relative_error(stats[path].delta, problem.layers[path].delta) < 1e-12, path
