"""Hostile input: property-based tests (hypothesis) over layer widths, batch sizes, kernel sizes,
strides, paddings, dtypes and hyperparameters.

Every drawn case either works and matches the independent float64 reference of ``reference.py``
(per-example gradients from ``jax.vmap(jax.grad(...))``, ``h``/``delta`` from a hand-written
forward pass, dense ``np.kron`` matrices and solves), or raises a clear ``ValueError`` /
``TypeError`` at trace time that names the layer or the hyperparameter. Nothing may crash inside
XLA or return NaN, Inf or garbage.

Compilation dominates the run time (each drawn shape is a new program, ~1 s on a CPU), so every
example compiles ONE jitted function that runs the library for several configurations and the
reference together, and the numbers of examples are small. ``derandomize=True`` makes the drawn
examples the same on every run (CI is deterministic).

The regression tests at the end of the file pin the failures these properties found (all fixed).
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import linen as nn
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import ekfac_optax as ek

pytestmark = pytest.mark.slow  # hypothesis examples, each compiled (1 min)

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
MAX_COND = 1e8  # the reference is "well-conditioned" below this condition number
MODES = ("tikhonov", "factored")


def hypothesis_settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def tanh_squared_loss(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of ``Σ ½ (tanh(out) - 0.3 y_n)²`` over every output of an example.

    Unlike a softmax cross-entropy (whose ``delta`` sums to zero, so ``B`` is singular), this
    gives output gradients ``delta`` in general position for every ``d_out``, including 1.
    """
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
    target = 0.3 * y.astype(outputs.dtype).reshape(-1, *(1,) * (outputs.ndim - 1))
    per_example = 0.5 * jnp.sum((jnp.tanh(outputs) - target) ** 2, axis=range(1, outputs.ndim))
    return per_example.mean()


class OneLayer(nn.Module):
    """One captured layer named ``"layer"``: ``nn.Dense`` (``kernel_size=None``) or ``nn.Conv``."""

    features: int
    use_bias: bool = True
    kernel_size: tuple[int, ...] | None = None
    conv_args: tuple = ()  # (name, value) pairs: strides, padding, kernel_dilation
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        common = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.dtype, name="layer"
        )
        if self.kernel_size is None:
            return nn.Dense(self.features, **common)(x)
        return nn.Conv(self.features, self.kernel_size, **dict(self.conv_args), **common)(x)


def reference_forward(model: OneLayer):
    """The hand-written per-example forward pass of ``model`` for ``reference.h_and_delta``."""
    if model.kernel_size is None:
        return lambda tape, x: tape.dense("layer", x)
    conv_args = dict(model.conv_args)
    return lambda tape, x: tape.conv(
        "layer",
        x,
        strides=conv_args["strides"],
        padding=conv_args["padding"],
        dilation=conv_args["kernel_dilation"],
    )


def make_problem(model: OneLayer, example_shape: tuple, batch_size: int) -> ref.Problem:
    return ref.Problem(
        model, reference_forward(model), example_shape, batch_size, tanh_squared_loss
    )


def run_once(problem: ref.Problem, txs: dict, params, x, y):
    """``ek.find_blocks`` of the problem's loss on ``(x, y)``, then one ``jax.jit``: the
    library's first update for each ``txs[key](blocks)`` (then, for the reference, the
    per-example gradients and ``h``/``delta`` of ``reference.py``, which import nothing from the
    library). The library runs first, so its trace-time errors are the ones raised."""
    blocks = ek.find_blocks(problem.loss_fn, params, x, y)
    assert list(blocks) == ["layer"] and blocks["layer"].block == "kronecker"
    txs = {key: make(blocks) for key, make in txs.items()}
    forward = reference_forward(problem.model)
    float64_params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    def float64_loss(params, x, y):
        model = problem.model.clone(dtype=jnp.float64)
        return tanh_squared_loss(model.apply({"params": params}, x), y)

    @jax.jit
    def run(params, float64_params, x, y):
        _, grads, stats = ek.value_grad_and_stats(problem.loss_fn)(params, x, y)
        library = {
            key: tx.update(grads, tx.init(params), params, stats=stats) for key, tx in txs.items()
        }
        x64 = x.astype(jnp.float64)
        per_example = ref.per_example_grads(float64_loss, float64_params, x64, y)
        h_delta = ref.h_and_delta(forward, tanh_squared_loss, float64_params, x64, y)
        return stats, library, per_example, h_delta

    stats, library, per_example, h_delta = run(params, float64_params, x, y)
    h, delta = h_delta["layer"]
    layer = ref.layer_reference(per_example["layer"], h, delta, problem.model.use_bias)
    return stats["layer"], library, layer


# --- Reference matrices ---------------------------------------------------------------------------


def ekfac_matrix_in_basis(layer, scaling, damping, mode, scaling_decay, basis_a, basis_b):
    """The damped EKFAC matrix at the first update, in the eigenbasis ``U_A ⊗ U_B``:
    ``(U_A ⊗ U_B) diag(vec(s)) (U_A ⊗ U_B)ᵀ + ε I`` (``"factored"``: ``+ √ε (T A ⊗ I + I ⊗ B)``),
    with ``s = mean_n (U_Aᵀ G_n U_B)²`` (``"batch"``) or, for EKFAC-ra, the restart from KFAC's
    eigenvalues then one step of the average: ``s = d · T S_A ⊗ S_B + (1 - d) · N · (U_Aᵀ g U_B)²``
    (eigenvalues ``S = diag(Uᵀ F U)`` clipped at 0)."""
    if scaling == "batch":
        scalings = np.mean(ref.to_kfe(layer.per_example, basis_a, basis_b) ** 2, axis=0)
    else:
        eigvals_a = np.maximum(np.diag(basis_a.T @ layer.factor_a @ basis_a), 0)
        eigvals_b = np.maximum(np.diag(basis_b.T @ layer.factor_b @ basis_b), 0)
        kfac = layer.positions * np.outer(eigvals_a, eigvals_b)
        grad_kfe = ref.to_kfe(layer.grad, basis_a, basis_b)
        scalings = scaling_decay * kfac + (1 - scaling_decay) * len(layer.per_example) * grad_kfe**2
    kron = np.kron(basis_a, basis_b)
    matrix = kron @ np.diag(scalings.ravel()) @ kron.T + damping * np.eye(len(kron))
    if mode == "factored":
        eye_a, eye_b = np.eye(len(basis_a)), np.eye(len(basis_b))
        matrix += np.sqrt(damping) * (
            layer.positions * np.kron(layer.factor_a, eye_b) + np.kron(eye_a, layer.factor_b)
        )
    return matrix


def eigen_gap(factor: np.ndarray) -> float:
    """The smallest gap between non-negligible eigenvalues, relative to the largest.

    The eigenvectors of a factor are determined to about ``u / gap`` (Davis-Kahan). Eigenvalues
    below ``1e-10`` of the largest are round-off of exact zeros, whose eigenspace carries no
    gradient (every ``h_aug`` and ``delta`` is orthogonal to it), so their basis does not matter.
    """
    eigvals = np.linalg.eigvalsh(factor)
    top = max(eigvals.max(), np.finfo(float).tiny)
    kept = np.sort(eigvals[eigvals > 1e-10 * top])
    return 1.0 if len(kept) < 2 else float(np.diff(kept).min() / top)


def assert_eigenbasis(basis: np.ndarray, factor: np.ndarray, unit: float):
    """``basis`` is orthonormal and diagonalises ``factor``, to ``100 · u`` relative."""
    basis = np.asarray(basis, np.float64)
    assert np.abs(basis.T @ basis - np.eye(len(basis))).max() <= 100 * unit
    rotated = basis.T @ factor @ basis
    off_diagonal = rotated - np.diag(np.diag(rotated))
    assert np.abs(off_diagonal).max() <= 100 * unit * max(np.abs(factor).max(), 1e-300)


def assert_update_matches(updates, block, layer, scaling, damping, mode, scaling_decay, unit):
    """The library's update ``updates`` (one layer's params-like dict) is ``M⁻¹ g`` for the
    reference's damped matrix ``M``, with ``unit`` the machine epsilon ``u`` of the library's
    dtype.

    KFAC's ``M = T A ⊗ B + ε I`` (or factored) does not depend on an eigenbasis. EKFAC's does,
    through ``s``: it uses numpy's eigenbasis of the reference factors, which is unique up to signs
    when the eigenvalues are distinct, determined to ``u / gap``; when the gap is below ``1e-3``
    (e.g. a padded input of one pixel makes ``A`` exactly ``diag(x², x²)/2``), any eigenbasis is a
    valid EKFAC basis, so the library's own ``basis_a``/``basis_b`` are used, after checking
    that they are orthonormal eigenbases of the reference factors.

    A backward-stable solve of a system with condition number ``κ`` has a relative forward error
    below ``c · κ · u``, ``c`` a modest function of the dimension of ``M`` (at most 84 here);
    ``100 · κ · u / gap`` leaves a margin over the measured errors (below ``κ · u``), while a
    modelling error (a wrong ``T``, basis, damping or scaling) moves the update by ``1e-3`` or
    more. Above ``MAX_COND`` a forward error means nothing, and the update must instead solve the
    system with a small backward error: ``‖M u - g‖ ≤ 1e-8 ‖M‖ ‖u‖``.
    """
    actual = ref.block_matrix(jax.tree.map(lambda u: np.asarray(u, np.float64), updates))
    assert np.all(np.isfinite(actual))
    sensitivity = 1.0
    if scaling == "kfac":
        matrix = ref.kfac_matrix(layer.factor_a, layer.factor_b, layer.positions, damping, mode)
    else:
        gap = min(eigen_gap(layer.factor_a), eigen_gap(layer.factor_b))
        if gap >= 1e-3:
            basis_a, basis_b = np.linalg.eigh(layer.factor_a)[1], np.linalg.eigh(layer.factor_b)[1]
            sensitivity = 1 / gap
        else:
            event("degenerate eigenvalues: the library's (checked) eigenbasis is used")
            basis_a, basis_b = (np.asarray(b, np.float64) for b in (block.basis_a, block.basis_b))
            assert_eigenbasis(basis_a, layer.factor_a, unit)
            assert_eigenbasis(basis_b, layer.factor_b, unit)
        matrix = ekfac_matrix_in_basis(
            layer, scaling, damping, mode, scaling_decay, basis_a, basis_b
        )
    cond = np.linalg.cond(matrix)
    if cond < MAX_COND:
        expected = ref.solve(matrix, layer.grad)
        if not np.any(expected):
            assert not np.any(actual)
            return
        rtol = max(100 * cond * unit * sensitivity, 1e-12)
        error = ref.relative_error(actual, expected)
        assert error < rtol, (error, rtol, cond)
    else:
        event(f"condition number >= {MAX_COND:g}: backward error checked")
        residual = np.linalg.norm(matrix @ actual.ravel() - layer.grad.ravel())
        bound = 1e-8 * np.linalg.norm(matrix, 2) * np.linalg.norm(actual)
        assert residual <= bound, (residual, bound, cond)


def assert_stats_give_per_example_grads(stats: ek.LayerStats, layer: ref.LayerReference):
    """``Σ_t h_aug δᵀ`` of the library's stats is ``jax.vmap(jax.grad(...))``'s ``G_n``: the
    same products summed in another order (relative error ~1e-16 per term, T ≤ 36 terms)."""
    h_aug = ref.augment(np.asarray(stats.h), layer.has_bias)
    from_stats = np.einsum("nti,nto->nio", h_aug, np.asarray(stats.delta))
    scale = max(np.abs(layer.per_example).max(), np.finfo(float).tiny)
    assert np.abs(from_stats - layer.per_example).max() <= 1e-10 * scale


def assert_applied(state: ek.ScaleByEkfacState):
    """The step was applied (not skipped as non-finite) and the state holds finite numbers."""
    assert int(state.count) == 1 and int(state.skipped) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.blocks))


# --- Dense layers ---------------------------------------------------------------------------------

SCALINGS = ("batch", "running", "kfac")


@st.composite
def dense_cases(draw):
    d_in = draw(st.integers(1, 6))
    d_out = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 6))
    sequence = draw(st.one_of(st.none(), st.integers(1, 3)))
    use_bias = draw(st.booleans())
    damping = draw(st.one_of(st.just(0.0), st.floats(-4, 0).map(lambda e: 10.0**e)))
    return dict(
        d_in=d_in,
        d_out=d_out,
        batch=batch,
        sequence=sequence,
        use_bias=use_bias,
        damping=damping,
        damping_mode=draw(st.sampled_from(MODES)),
        basis_update_every=draw(st.integers(1, 4)),
        factor_decay=draw(st.one_of(st.just(0.0), st.floats(0, 0.9))),
        scaling_decay=draw(st.floats(0, 0.9)),
    )


def make_tx(scaling: str, case: dict):
    """The transformation of ``scaling`` with the hyperparameters of ``case``, as a function of
    the blocks (what :func:`run_once` takes)."""

    def make(blocks):
        common = dict(
            blocks=blocks,
            damping=case["damping"],
            basis_update_every=case["basis_update_every"],
            factor_decay=case["factor_decay"],
            damping_mode=case["damping_mode"],
        )
        if scaling == "kfac":
            return ek.scale_by_kfac(**common)
        return ek.scale_by_ekfac(scaling=scaling, scaling_decay=case["scaling_decay"], **common)

    return make


def dense_problem(case: dict, dtype=jnp.float64) -> ref.Problem:
    shape = (case["d_in"],) if case["sequence"] is None else (case["sequence"], case["d_in"])
    return make_problem(
        OneLayer(case["d_out"], case["use_bias"], dtype=dtype), shape, case["batch"]
    )


DENSE_EXAMPLE = dict(d_in=3, d_out=2, batch=4, sequence=None, use_bias=True, damping=0.0)
DENSE_EXAMPLE.update(damping_mode="factored", basis_update_every=3, factor_decay=0.5)


@hypothesis_settings(max_examples=18)
@given(case=dense_cases())
@example(case=dict(DENSE_EXAMPLE, scaling_decay=0.5))  # damping = 0, non-singular: exact inverse
def test_dense_first_update_matches_reference(case):
    """``nn.Dense`` of any width, batch size, sequence length and bias, any hyperparameters: the
    first update of EKFAC (batch and running scalings) and KFAC is ``M⁻¹ g`` for the reference's
    dense damped matrix ``M`` (``factor_decay`` is irrelevant at step 0; EKFAC-ra restarts from
    ``T S_A ⊗ S_B`` and takes one step of its average). With ``damping = 0`` and a non-singular
    ``M``, this is the exact inverse."""
    problem = dense_problem(case)
    txs = {scaling: make_tx(scaling, case) for scaling in SCALINGS}
    stats, library, layer = run_once(problem, txs, problem.params, *problem.data)

    assert_stats_give_per_example_grads(stats, layer)
    for scaling, (updates, state) in library.items():
        assert_applied(state)
        assert jax.tree.structure(updates) == jax.tree.structure(problem.params)
        hyperparameters = case["damping"], case["damping_mode"], case["scaling_decay"]
        assert_update_matches(
            updates["layer"], state.blocks["layer"], layer, scaling, *hyperparameters, EPS64
        )


# --- Conv layers ----------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    rank = draw(st.integers(1, 2))
    per_dim = st.lists(st.integers(1, 3), min_size=rank, max_size=rank).map(tuple)
    pads = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=rank, max_size=rank)
    return dict(
        spatial=draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank).map(tuple)),
        channels=draw(st.integers(1, 3)),
        features=draw(st.integers(1, 3)),
        kernel_size=draw(per_dim),
        strides=draw(per_dim),
        kernel_dilation=draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank).map(tuple)),
        padding=draw(
            st.one_of(
                st.sampled_from(["SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL"]),
                st.integers(0, 2),
                pads.map(tuple),
            )
        ),
        batch=draw(st.integers(1, 4)),
        use_bias=draw(st.booleans()),
    )


def conv_output_size(case: dict) -> tuple[int, ...]:
    """The output spatial shape, from the reference's padding rule and the usual formula."""
    geometry = [case[k] for k in ("spatial", "kernel_size", "strides", "kernel_dilation")]
    pads, _ = ref.conv_pads(case["padding"], *geometry)
    sizes = []
    for (size, k, s, d), (lo, hi) in zip(zip(*geometry, strict=True), pads, strict=True):
        extent = (k - 1) * d + 1
        sizes.append(max(0, (size + lo + hi - extent) // s + 1))
    return tuple(sizes)


def conv_example(spatial, kernel_size, padding, **kwargs):
    rank = len(spatial)
    case = dict(spatial=spatial, channels=1, features=2, kernel_size=kernel_size, padding=padding)
    case.update(strides=(1,) * rank, kernel_dilation=(1,) * rank, batch=2, use_bias=True)
    return dict(case, **kwargs)


@hypothesis_settings(max_examples=20)
@given(case=conv_cases())
@example(case=conv_example((2,), (3,), "VALID"))  # kernel larger than the input: empty output
@example(case=conv_example((3, 1), (2, 2), ((0, 0), (0, 0))))  # explicit pairs: empty output
@example(case=conv_example((1,), (2,), 1, batch=1))  # A = diag(x², x²) / 2: degenerate
@example(case=conv_example((2, 1), (3, 3), "CIRCULAR", kernel_dilation=(2, 2)))  # wraps twice
def test_conv_stats_and_update_or_clear_error(case):
    """``nn.Conv`` 1-D/2-D with any input size, channels, kernel size, strides, dilation and
    padding (SAME, VALID, CIRCULAR, REFLECT, CAUSAL, int, explicit pairs): when the output is not
    empty, ``Σ_t h_aug δᵀ`` of the captured stats is the per-example gradient and the first EKFAC
    and KFAC updates match the reference (damping 1e-2); when it is empty (VALID, or explicit
    padding too small for the kernel extent), a ``ValueError`` at trace time names the layer.
    The one configuration Flax itself rejects is CAUSAL padding in 2-D (its own ``ValueError``)."""
    conv_args = tuple((name, case[name]) for name in ("strides", "padding", "kernel_dilation"))
    model = OneLayer(case["features"], case["use_bias"], case["kernel_size"], conv_args)
    problem = make_problem(model, (*case["spatial"], case["channels"]), case["batch"])
    txs = {
        "batch": lambda blocks: ek.scale_by_ekfac(blocks=blocks, damping=1e-2, factor_decay=0.0),
        "kfac": lambda blocks: ek.scale_by_kfac(blocks=blocks, damping=1e-2, factor_decay=0.0),
    }
    if case["padding"] == "CAUSAL" and len(case["spatial"]) > 1:
        event("CAUSAL 2-D: Flax's own ValueError")
        with pytest.raises(ValueError, match=r"Causal padding is only implemented for 1D"):
            run_once(problem, txs, problem.params, *problem.data)
        return
    if 0 in conv_output_size(case):
        event("empty output: ValueError")
        with pytest.raises(ValueError, match=r"layer 'layer' produced an empty output of shape"):
            run_once(problem, txs, problem.params, *problem.data)
        return
    stats, library, layer = run_once(problem, txs, problem.params, *problem.data)
    positions = math.prod(conv_output_size(case))
    assert stats.h.shape[:2] == stats.delta.shape[:2] == (case["batch"], positions)
    assert_stats_give_per_example_grads(stats, layer)
    for scaling, (updates, state) in library.items():
        assert_applied(state)
        assert_update_matches(
            updates["layer"], state.blocks["layer"], layer, scaling, 1e-2, "tikhonov", 0.0, EPS64
        )


# --- dtypes ---------------------------------------------------------------------------------------

DTYPES = {"float32": EPS32, "bfloat16": None, "float64": EPS64}


def dtype_case(data, kind: str, dtype: Any):
    """A small Dense or 2-D Conv (SAME padding) in ``dtype``, its example shape and batch size."""
    features = data.draw(st.integers(1, 4))
    use_bias = data.draw(st.booleans())
    batch = data.draw(st.integers(1, 6))
    if kind == "dense":
        return OneLayer(features, use_bias, dtype=dtype), (data.draw(st.integers(1, 6)),), batch
    kernel_size = data.draw(st.lists(st.integers(1, 3), min_size=2, max_size=2).map(tuple))
    conv_args = (("strides", 1), ("padding", "SAME"), ("kernel_dilation", 1))
    spatial = data.draw(st.lists(st.integers(2, 4), min_size=2, max_size=2))
    shape = (*spatial, data.draw(st.integers(1, 2)))
    return OneLayer(features, use_bias, kernel_size, conv_args, dtype=dtype), shape, batch


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@hypothesis_settings(max_examples=3)
@given(data=st.data())
def test_dtypes_of_updates_and_curvature(dtype_name, kind, data):
    """float32, bfloat16 and float64 params and activations (a Dense or a 2-D Conv, EKFAC batch
    and running scalings and KFAC, damping 1e-2): the step is applied, the updates are finite and
    in the params' dtype, the curvature is float32 for bfloat16 and the params' dtype otherwise.

    float32 and float64 updates match the float64 reference computed from the same (exactly
    representable) params and inputs within ``100 · κ · u / gap`` (``assert_update_matches``,
    with ``u`` the machine epsilon of the dtype: the forward pass, the factors, ``eigh`` and the
    solve are backward stable; measured float32 errors are below ``κ · u``). bfloat16 has an 8-bit
    significand (``u = 7.8e-3``), so for the damped matrices here (``κ`` up to ~1e3) no useful
    forward error bound exists; only dtypes and finiteness are asserted for it."""
    model, shape, batch = dtype_case(data, kind, jnp.dtype(dtype_name))
    dtype = jnp.dtype(dtype_name)
    problem = make_problem(model, shape, batch)
    params = jax.tree.map(lambda p: p.astype(dtype), problem.params)
    x, y = problem.data
    common = dict(damping=1e-2, damping_mode="tikhonov", basis_update_every=1, factor_decay=0.0)
    txs = {scaling: make_tx(scaling, dict(common, scaling_decay=0.5)) for scaling in SCALINGS}
    _, library, layer = run_once(problem, txs, params, x.astype(dtype), y)

    curvature = jnp.float32 if dtype == jnp.bfloat16 else dtype
    for scaling, (updates, state) in library.items():
        assert_applied(state)
        assert {u.dtype for u in jax.tree.leaves(updates)} == {dtype}
        assert {b.dtype for b in jax.tree.leaves(state.blocks)} == {jnp.dtype(curvature)}
        values = [np.asarray(u, np.float64) for u in jax.tree.leaves(updates)]
        assert all(np.isfinite(v).all() for v in values) and any(v.any() for v in values)
        if DTYPES[dtype_name] is not None:
            assert_update_matches(
                updates["layer"],
                state.blocks["layer"],
                layer,
                scaling,
                *(1e-2, "tikhonov", 0.5),
                DTYPES[dtype_name],
            )


# --- Invalid hyperparameters ----------------------------------------------------------------------

FACTORIES = ("scale_by_ekfac", "ekfac", "scale_by_kfac", "kfac")
NAN = float("nan")


def numbers(values):
    """The same numbers as Python floats, numpy float64 scalars or 0-d float64 jax arrays."""
    return st.tuples(values, st.sampled_from([float, np.float64, jnp.asarray])).map(
        lambda pair: pair[1](pair[0])
    )


def integers(values):
    return st.tuples(values, st.sampled_from([int, np.int32, np.int64, jnp.asarray])).map(
        lambda pair: pair[1](pair[0])
    )


# Explicit bounds, no subnormals: XLA sets the CPU's flush-to-zero mode, under which hypothesis'
# own filters see a negative subnormal as zero.
NEGATIVE = st.floats(max_value=-1e-300, allow_subnormal=False)
OUTSIDE_0_1 = st.one_of(NEGATIVE, st.floats(min_value=1.0), st.just(NAN))
NON_INTEGER = st.one_of(
    st.floats(-1e6, 1e6, allow_subnormal=False).filter(lambda v: v != int(v)),
    st.sampled_from([NAN, math.inf, -math.inf, 2.0**31, 1e300]),
)
UNKNOWN_NAME = st.text(max_size=12)

BAD = {
    "damping": (numbers(st.one_of(NEGATIVE, st.just(NAN))), r"damping must be >= 0"),
    "basis_update_every": (
        st.one_of(integers(st.integers(-(2**31), 0)), numbers(NON_INTEGER)),
        r"basis_update_every must be an integer in \[1, 2\*\*31\)",
    ),
    "factor_decay": (numbers(OUTSIDE_0_1), r"factor_decay must be in \[0, 1\)"),
    "scaling_decay": (numbers(OUTSIDE_0_1), r"scaling_decay must be in \[0, 1\)"),
    "scaling": (
        st.one_of(st.just("kfac"), UNKNOWN_NAME.filter(lambda s: s not in ("batch", "running"))),
        r"scaling must be 'batch' or 'running'",
    ),
    "damping_mode": (
        UNKNOWN_NAME.filter(lambda s: s not in MODES),
        r"damping_mode must be .*'tikhonov'.*'factored'",
    ),
    "weight_sharing": (
        UNKNOWN_NAME.filter(lambda s: s not in ("expand", "reduce")),
        r"weight_sharing must be .*'expand'.*'reduce'",
    ),
    "fallback": (
        UNKNOWN_NAME.filter(lambda s: s not in ("diagonal", "identity")),
        r"fallback must be .*'diagonal'.*'identity'",
    ),
    # Anything but a dict of ek.BlockSpec (the empty dict is a valid, empty set of blocks).
    "blocks": (
        st.one_of(
            UNKNOWN_NAME,
            st.none(),
            st.lists(UNKNOWN_NAME, max_size=3),
            st.dictionaries(UNKNOWN_NAME, UNKNOWN_NAME, min_size=1, max_size=2),
        ),
        r"blocks must be the dict of BlockSpec returned by ek\.find_blocks",
    ),
    # `layers` is an argument of value_grad_and_stats only (the optimizers take `blocks`).
    "layers": (UNKNOWN_NAME, r"layers must be a sequence of module paths"),
}


@functools.cache
def valid_blocks() -> dict:
    """The blocks of a small Dense problem, for the constructors' required ``blocks``."""
    problem = make_problem(OneLayer(2), (3,), 4)
    return ek.find_blocks(problem.loss_fn, problem.params, *problem.data)


@st.composite
def invalid_hyperparameters(draw):
    factory = draw(st.sampled_from(FACTORIES))
    names = [n for n in BAD if "ekfac" in factory or not n.startswith("scaling")]
    name = draw(st.sampled_from(names))
    values, match = BAD[name]
    return factory, name, draw(values), match


@hypothesis_settings(max_examples=300)
@given(case=invalid_hyperparameters())
def test_invalid_hyperparameters_raise_at_construction(case):
    """Negative or NaN damping, ``basis_update_every`` below 1 or not an integer, decays outside
    ``[0, 1)`` (NaN and ±inf included), unknown ``scaling``/``damping_mode``/``weight_sharing``/
    ``fallback`` strings (and the internal ``"kfac"`` scaling), as Python, numpy or 0-d jax
    numbers, and ``blocks`` that are not a dict of ``ek.BlockSpec``, raise a
    ``ValueError``/``TypeError`` naming the hyperparameter when the transformation is constructed
    (no ``init``, no trace). ``layers`` given as a string is a ``TypeError`` of
    ``value_grad_and_stats``; the optimizers no longer take ``layers`` at all."""
    factory, name, value, match = case
    args = (0.1,) if factory in ("ekfac", "kfac") else ()
    kwargs = {"blocks": valid_blocks(), name: value}
    if name == "layers":
        with pytest.raises(TypeError, match=match):
            ek.value_grad_and_stats(tanh_squared_loss, layers=value)
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'layers'"):
            getattr(ek, factory)(*args, **kwargs)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(ek, factory)(*args, **kwargs)


# --- Regression tests for the failures found ------------------------------------------------------


@pytest.mark.parametrize("scaling", SCALINGS)
def test_regression_damping_zero_singular_curvature(scaling):
    """Dense 3 -> 5 with a bias on 2 examples: ``A`` (4 x 4) and ``B`` (5 x 5) have rank 2, so
    the damped matrix ``M`` is singular at ``damping = 0``. The documented behaviour ("a direction
    whose denominator is 0 gets no step") is the pseudo-inverse ``M⁺ g``: every per-example
    gradient, hence ``g``, has no component in the null space of ``M`` (``s = 0`` there means
    ``Ũ G_n Ũ = 0`` for every ``n``), so ``M⁺ g`` is the minimum-norm solution of ``M u = g``."""
    case = dict(d_in=3, d_out=5, batch=2, sequence=None, use_bias=True, damping=0.0)
    case.update(damping_mode="tikhonov", basis_update_every=1, factor_decay=0.0, scaling_decay=0.5)
    problem = dense_problem(case)
    _, library, layer = run_once(
        problem, {scaling: make_tx(scaling, case)}, problem.params, *problem.data
    )
    if scaling == "kfac":
        matrix = ref.kfac_matrix(layer.factor_a, layer.factor_b, layer.positions, 0.0, "tikhonov")
    else:
        bases = np.linalg.eigh(layer.factor_a)[1], np.linalg.eigh(layer.factor_b)[1]
        matrix = ekfac_matrix_in_basis(layer, scaling, 0.0, "tikhonov", 0.5, *bases)
    assert np.linalg.matrix_rank(matrix, tol=1e-10 * np.linalg.norm(matrix, 2)) < len(matrix)
    expected = np.linalg.lstsq(matrix, layer.grad.ravel(), rcond=1e-10)[0]
    actual = ref.block_matrix(library[scaling][0]["layer"])
    assert ref.relative_error(actual, expected.reshape(actual.shape)) < 1e-6


@pytest.mark.parametrize("factory", FACTORIES)
def test_regression_basis_update_every_inf_raises_value_error(factory):
    args = (0.1,) if factory in ("ekfac", "kfac") else ()
    with pytest.raises(
        ValueError, match=r"basis_update_every must be an integer in \[1, 2\*\*31\)"
    ):
        getattr(ek, factory)(*args, blocks=valid_blocks(), basis_update_every=float("inf"))


def test_regression_basis_update_every_beyond_int32_is_rejected_at_construction():
    """The update count is int32: a period it can never reach is rejected up front, naming the
    hyperparameter, rather than failing inside the traced update (JAX's default 32-bit mode)."""
    for factory in FACTORIES:
        args = (0.1,) if factory in ("ekfac", "kfac") else ()
        with pytest.raises(ValueError, match=r"basis_update_every must be an integer in"):
            getattr(ek, factory)(*args, blocks=valid_blocks(), basis_update_every=2**31)


@pytest.mark.parametrize(
    "name, value",
    [
        pytest.param(name, value, id=f"{name}={value!r}")
        for name in ("damping", "embedding_damping", "basis_update_every", "factor_decay")
        for value in (None, "0.5", True, np.ones(2))
        if not (name == "embedding_damping" and value is None)  # None: the damping's
    ],
)
def test_regression_wrongly_typed_number_raises_type_error_naming_it(name, value):
    with pytest.raises(TypeError, match=name):
        ek.scale_by_ekfac(blocks=valid_blocks(), **{name: value})
