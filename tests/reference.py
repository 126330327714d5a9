"""An independent float64 reference for EKFAC and KFAC, by brute force.

Nothing here imports ``ekfac_optax``. Every quantity is computed from first principles:

- per-example gradients ``G_n`` with ``jax.vmap(jax.grad(per_example_loss))`` over the Flax model;
- each layer's inputs ``h`` (conv: patches cut out with explicit loops over the kernel offsets)
  and output gradients ``delta`` from a HAND-WRITTEN per-example forward pass that adds a probe to
  every layer output and is differentiated with respect to the probes;
- the curvature as DENSE matrices (``np.kron``) and the updates by ``np.linalg.solve``.

Conventions (those stated in the library's docstrings):

- a layer's block matrix is ``[kernel.reshape(d_in, d_out); bias]``, shape ``(d_in_aug, d_out)``,
  without the bias row when the layer has no bias; ``h_aug = [h; 1]`` likewise;
- ``vec`` is row-major: ``vec(M)[i * d_out + o] = M[i, o]``, so that ``vec(h deltaᵀ) = h ⊗ delta``
  and ``vec(U_Aᵀ M U_B) = (U_A ⊗ U_B)ᵀ vec(M)`` with ``np.kron``;
- ``A = mean_{n,t} h_aug h_augᵀ``, ``B = mean_{n,t} delta deltaᵀ``, ``T`` positions per example;
  KFAC's Fisher block is ``T · A ⊗ B``.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# --- Per-example gradients and block matrices -----------------------------------------------------


def per_example_grads(loss_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> Any:
    """The gradient of each example's loss: a params-like tree with a leading axis ``N``.

    ``loss_fn(params, x, y)`` is the MEAN loss of a batch; the loss of one example is that of a
    batch of one, ``loss_fn(params, x[n][None], y[n][None])``.
    """

    def per_example_loss(params, x1, y1):
        return loss_fn(params, x1[None], y1[None])

    return jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0, 0))(params, x, y)


def block_matrix(layer: Any, batched: bool = False) -> np.ndarray:
    """``[kernel.reshape(d_in, d_out); bias]`` of one layer's params (or gradients, updates).

    With ``batched``, every leaf has a leading axis ``N``; the result is ``(N, d_in_aug, d_out)``.
    """
    kernel = np.asarray(layer["kernel"])
    lead = kernel.shape[:1] if batched else ()
    d_out = kernel.shape[-1]
    matrix = kernel.reshape(*lead, -1, d_out)
    if "bias" in layer:
        bias = np.asarray(layer["bias"]).reshape(*lead, 1, d_out)
        matrix = np.concatenate([matrix, bias], axis=-2)
    return matrix


def from_block_matrix(matrix: np.ndarray, like: Any) -> dict:
    """The inverse of :func:`block_matrix`, with the shapes of the layer ``like``."""
    kernel_shape = np.shape(like["kernel"])
    d_in = math.prod(kernel_shape[:-1])
    out = {"kernel": matrix[:d_in].reshape(kernel_shape)}
    if "bias" in like:
        out["bias"] = matrix[d_in]
    return out


# --- Conv patches, by explicit loops --------------------------------------------------------------


def conv_pads(padding: Any, spatial: tuple, kernel_size: tuple, strides: tuple, dilation: tuple):
    """``(pads, mode)``: the ``(lo, hi)`` padding of each spatial axis and the ``jnp.pad`` mode.

    Follows Flax's ``nn.Conv`` (``"SAME"`` is lax's rule; ``"CIRCULAR"``/``"REFLECT"`` pad
    ``((k - 1) // 2, k // 2)`` of the dilated kernel extent ``k``; ``"CAUSAL"`` pads on the left).
    """
    extents = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
    if padding == "VALID":
        return [(0, 0)] * len(spatial), "constant"
    if padding == "SAME":
        pads = []
        for size, extent, stride in zip(spatial, extents, strides, strict=True):
            out = -(-size // stride)
            total = max((out - 1) * stride + extent - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads, "constant"
    if padding in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        return [((e - 1) // 2, e // 2) for e in extents], mode
    if padding == "CAUSAL":
        return [(extents[0] - 1, 0)], "constant"
    if isinstance(padding, int):
        return [(padding, padding)] * len(spatial), "constant"
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding], "constant"


def conv_patches(
    x: jax.Array, kernel_size: tuple, strides: Any = 1, padding: Any = "SAME", dilation: Any = 1
) -> jax.Array:
    """The SUA input patches of ONE example ``x`` of shape ``(*spatial, c_in)``.

    Returns ``(*out_spatial, prod(kernel_size) * c_in)``: feature ``(offset, c)`` at
    ``offset * c_in + c`` with the kernel offsets in row-major order, i.e. the row order of
    ``kernel.reshape(-1, c_out)`` for a kernel of shape ``(*kernel_size, c_in, c_out)``.
    """
    rank = len(kernel_size)
    strides = (strides,) * rank if isinstance(strides, int) else tuple(strides)
    dilation = (dilation,) * rank if isinstance(dilation, int) else tuple(dilation)
    pads, mode = conv_pads(padding, x.shape[:-1], kernel_size, strides, dilation)
    xp = jnp.pad(x, list(pads) + [(0, 0)], mode=mode)
    out_sizes = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, d, s in zip(xp.shape[:-1], kernel_size, dilation, strides, strict=True)
    ]
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s)
            for o, d, s, n in zip(offset, dilation, strides, out_sizes, strict=True)
        )
        columns.append(xp[window])  # (*out_spatial, c_in): input under this kernel offset
    patches = jnp.stack(columns, axis=-2)  # (*out_spatial, prod(kernel_size), c_in)
    return patches.reshape(*out_sizes, -1)


# --- A hand-written forward pass that records h and probes the outputs ---------------------------


class Tape:
    """Linear layers for a hand-written forward pass of ONE example.

    Each call of a layer ``name`` computes ``h @ kernel.reshape(d_in, d_out) + bias`` from the
    layer's input ``h`` (conv: its patches), adds ``probes[name][i]`` for its ``i``-th call, and
    records ``h`` and the output. The gradient of the loss with respect to the probes is
    ``delta``.
    """

    def __init__(self, params: Any, probes: Any = None):
        self.params = params
        self.probes = probes
        self.h: dict[str, list[jax.Array]] = {}
        self.out: dict[str, list[jax.Array]] = {}

    def linear(self, name: str, h: jax.Array) -> jax.Array:
        layer = self.params[name]
        kernel = layer["kernel"]
        out = h @ kernel.reshape(-1, kernel.shape[-1])
        if "bias" in layer:
            out = out + layer["bias"]
        calls = self.h.setdefault(name, [])
        if self.probes is not None:
            out = out + self.probes[name][len(calls)]
        calls.append(h)
        self.out.setdefault(name, []).append(out)
        return out

    def dense(self, name: str, x: jax.Array) -> jax.Array:
        return self.linear(name, x)

    def conv(self, name: str, x: jax.Array, **conv_args) -> jax.Array:
        kernel_size = self.params[name]["kernel"].shape[:-2]
        return self.linear(name, conv_patches(x, kernel_size, **conv_args))


def hand_forward(forward: Callable, params: Any, x: jax.Array) -> jax.Array:
    """The hand-written forward pass on a batch (``forward`` sees one example at a time)."""
    return jax.vmap(lambda x1: forward(Tape(params), x1))(x)


def h_and_delta(
    forward: Callable, output_loss: Callable, params: Any, x: jax.Array, y: jax.Array
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Each layer's ``h`` ``(N, T, d_in)`` and ``delta`` ``(N, T, d_out)``.

    ``forward(tape, x1)`` is the model on one example; ``output_loss(outputs, y)`` the mean loss
    of a batch of outputs. ``delta_n`` is the gradient of example ``n``'s own loss with respect
    to the layer's output, found by differentiating with respect to zero probes added to it.
    Positions ``T`` are the output positions (conv), the extra input axes (sequence) and the
    calls of a shared layer, in call order, concatenated.
    """

    def layer_outputs(x1):
        tape = Tape(params)
        forward(tape, x1)
        return tape.out

    shapes = jax.eval_shape(layer_outputs, x[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def example_loss(probes, x1, y1):
        tape = Tape(params, probes)
        outputs = jax.tree.map(lambda o: o[None], forward(tape, x1))
        return output_loss(outputs, y1[None]), tape.h

    delta, h = jax.vmap(jax.grad(example_loss, has_aux=True), in_axes=(None, 0, 0))(zeros, x, y)

    def positions(calls):  # each call (N, *positions, d) -> (N, T, d)
        return jnp.concatenate([c.reshape(c.shape[0], -1, c.shape[-1]) for c in calls], axis=1)

    return {name: (positions(h[name]), positions(delta[name])) for name in h}


# --- Curvature and updates by dense linear algebra ------------------------------------------------


def augment(h: np.ndarray, has_bias: bool) -> np.ndarray:
    """``h_aug = [h; 1]`` along the last axis when the layer has a bias."""
    h = np.asarray(h)
    return np.concatenate([h, np.ones(h.shape[:-1] + (1,))], axis=-1) if has_bias else h


def factors(h: np.ndarray, delta: np.ndarray, has_bias: bool):
    """``(A, B, T)``: the means over examples and positions of ``h_aug h_augᵀ``, ``δ δᵀ``."""
    h_aug, delta = augment(h, has_bias), np.asarray(delta)
    n, t = h_aug.shape[:2]
    a = np.einsum("nti,ntj->ij", h_aug, h_aug) / (n * t)
    b = np.einsum("nto,ntp->op", delta, delta) / (n * t)
    return a, b, t


def to_kfe(matrix: np.ndarray, basis_a: np.ndarray, basis_b: np.ndarray) -> np.ndarray:
    """``U_Aᵀ M U_B`` of a ``(a, b)`` matrix or of each of a stack ``(N, a, b)``."""
    return np.einsum("ia,...ij,jb->...ab", basis_a, matrix, basis_b)


def ekfac_fisher(per_example: np.ndarray, factor_a: np.ndarray, factor_b: np.ndarray):
    """The EKFAC Fisher ``(U_A ⊗ U_B) diag(vec(s*)) (U_A ⊗ U_B)ᵀ`` and ``s*``.

    ``U_A``, ``U_B`` are the eigenvectors of the factors and
    ``s* = mean_n (U_Aᵀ G_n U_B)²`` for the per-example gradients ``G_n`` ``(N, a, b)``.
    """
    basis_a = np.linalg.eigh(factor_a)[1]
    basis_b = np.linalg.eigh(factor_b)[1]
    scalings = np.mean(to_kfe(per_example, basis_a, basis_b) ** 2, axis=0)
    kron = np.kron(basis_a, basis_b)
    return kron @ np.diag(scalings.ravel()) @ kron.T, scalings


def ekfac_matrix(per_example, factor_a, factor_b, positions, damping, mode) -> np.ndarray:
    """The damped EKFAC matrix whose inverse is applied to ``vec(g)``.

    ``"tikhonov"``: ``F_EKFAC + ε I``. ``"factored"``: the denominator
    ``s* + ε + √ε (T S_A ⊕ S_B)`` in the KFE, i.e., since
    ``(U_A ⊗ U_B) diag(S_A ⊕ S_B) (U_A ⊗ U_B)ᵀ = A ⊗ I + I ⊗ B``,
    ``F_EKFAC + ε I + √ε (T · A ⊗ I + I ⊗ B)``.
    """
    assert mode in ("tikhonov", "factored"), mode
    fisher, _ = ekfac_fisher(per_example, factor_a, factor_b)
    eye_a, eye_b = np.eye(len(factor_a)), np.eye(len(factor_b))
    matrix = fisher + damping * np.eye(len(fisher))
    if mode == "factored":
        matrix += np.sqrt(damping) * (
            positions * np.kron(factor_a, eye_b) + np.kron(eye_a, factor_b)
        )
    return matrix


def kfac_matrix(factor_a, factor_b, positions, damping, mode) -> np.ndarray:
    """``T · A ⊗ B + ε I`` (``"tikhonov"``) or ``(T · A + √ε I) ⊗ (B + √ε I)`` (``"factored"``)."""
    assert mode in ("tikhonov", "factored"), mode
    eye_a, eye_b = np.eye(len(factor_a)), np.eye(len(factor_b))
    if mode == "tikhonov":
        kron = positions * np.kron(factor_a, factor_b)
        return kron + damping * np.eye(len(kron))
    root = np.sqrt(damping)
    return np.kron(positions * factor_a + root * eye_a, factor_b + root * eye_b)


def layer_matrix(layer: "LayerReference", method: str, damping, mode) -> np.ndarray:
    """The dense damped curvature of one layer: EKFAC's (``method="ekfac"``) or KFAC's."""
    if method == "ekfac":
        return ekfac_matrix(
            layer.per_example, layer.factor_a, layer.factor_b, layer.positions, damping, mode
        )
    return kfac_matrix(layer.factor_a, layer.factor_b, layer.positions, damping, mode)


def solve(matrix: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``matrix⁻¹ vec(g)``, reshaped like ``g``."""
    return np.linalg.solve(matrix, grad.ravel()).reshape(grad.shape)


# --- Test problems: Flax models and their hand-written forward passes -----------------------------


class Mlp(nn.Module):
    """Dense layers with tanh."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(7, param_dtype=jnp.float64, name="Dense_0")(x))
        x = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64, name="Dense_1")(x))
        return nn.Dense(3, param_dtype=jnp.float64, name="Dense_2")(x)


def mlp_forward(tape, x):
    x = jnp.tanh(tape.dense("Dense_0", x))
    x = jnp.tanh(tape.dense("Dense_1", x))
    return tape.dense("Dense_2", x)


class Cnn(nn.Module):
    """Conv layers with SAME/VALID/int padding, strides 1 and 2, a dilation and no bias."""

    @nn.compact
    def __call__(self, x):
        conv = dict(param_dtype=jnp.float64)
        x = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME", name="Conv_0", **conv)(x))
        # SAME with stride 2 on 10 pixels pads asymmetrically, (0, 1).
        x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="Conv_1", **conv)(x))
        x = jnp.tanh(
            nn.Conv(
                4, (2, 2), padding="VALID", kernel_dilation=2, use_bias=False, name="Conv_2", **conv
            )(x)
        )
        x = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding=1, name="Conv_3", **conv)(x))
        return nn.Dense(3, param_dtype=jnp.float64, name="Dense_0")(x.reshape(x.shape[0], -1))


def cnn_forward(tape, x):
    x = jnp.tanh(tape.conv("Conv_0", x, padding="SAME"))
    x = jnp.tanh(tape.conv("Conv_1", x, strides=2, padding="SAME"))
    x = jnp.tanh(tape.conv("Conv_2", x, padding="VALID", dilation=2))
    x = jnp.tanh(tape.conv("Conv_3", x, strides=2, padding=1))
    return tape.dense("Dense_0", x.reshape(-1))


class Shared(nn.Module):
    """Weight sharing: ``pair`` is applied to two inputs, ``loop`` twice in sequence."""

    def setup(self):
        self.pair = nn.Dense(8, param_dtype=jnp.float64)
        self.loop = nn.Dense(8, param_dtype=jnp.float64)
        self.head = nn.Dense(3, param_dtype=jnp.float64)

    def __call__(self, x):
        z = jnp.tanh(self.pair(x[:, :8])) + jnp.tanh(self.pair(x[:, 8:]))
        z = jnp.tanh(self.loop(jnp.tanh(self.loop(z))))
        return self.head(z)


def shared_forward(tape, x):
    z = jnp.tanh(tape.dense("pair", x[:8])) + jnp.tanh(tape.dense("pair", x[8:]))
    z = jnp.tanh(tape.dense("loop", jnp.tanh(tape.dense("loop", z))))
    return tape.dense("head", z)


class Sequence(nn.Module):
    """``(N, L, d)`` inputs: a Dense per position, a circular 1-D conv, mean pooling, a head."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64, name="Dense_0")(x))
        x = jnp.tanh(
            nn.Conv(5, (3,), padding="CIRCULAR", param_dtype=jnp.float64, name="Conv_0")(x)
        )
        return nn.Dense(3, param_dtype=jnp.float64, name="Dense_1")(x.mean(axis=1))


def sequence_forward(tape, x):
    x = jnp.tanh(tape.dense("Dense_0", x))
    x = jnp.tanh(tape.conv("Conv_0", x, padding="CIRCULAR"))
    return tape.dense("Dense_1", x.mean(axis=0))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of the softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass
class LayerReference:
    """One layer's reference quantities on one batch."""

    per_example: np.ndarray  # (N, d_in_aug, d_out): G_n from jax.vmap(jax.grad(...))
    grad: np.ndarray  # (d_in_aug, d_out): g = mean_n G_n
    h: np.ndarray  # (N, T, d_in)
    delta: np.ndarray  # (N, T, d_out)
    has_bias: bool
    factor_a: np.ndarray  # (d_in_aug, d_in_aug)
    factor_b: np.ndarray  # (d_out, d_out)
    positions: int  # T


@dataclasses.dataclass(frozen=True)
class Problem:
    """A Flax model in float64, its hand-written per-example forward pass, a loss and data.

    ``output_loss(outputs, y)`` is the MEAN loss of a batch of model outputs. The cached
    properties (params from key 0, a batch from key 1, the reference on it) are computed once
    per test session; jitted functions are compiled once per problem (compilation dominates the
    run time of these small problems).
    """

    model: nn.Module
    forward: Callable
    example_shape: tuple
    batch_size: int
    output_loss: Callable = softmax_cross_entropy
    n_classes: int = 3

    def batch(self, seed: int):
        """``(x, y)``: standard normal inputs and integer labels, from numpy's generator (cheaper
        to make than with ``jax.random``, whose float64 kernels take seconds to compile)."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.batch_size, *self.example_shape))
        return jnp.asarray(x), jnp.asarray(rng.integers(0, self.n_classes, self.batch_size))

    def loss_fn(self, params, x, y):
        return self.output_loss(self.model.apply({"params": params}, x), y)

    @functools.cached_property
    def params(self):
        """Normal kernels scaled by ``1/√fan_in`` and small normal biases, float64, seed 0."""
        x, _ = self.data
        shapes = jax.eval_shape(self.model.init, jax.random.key(0), x)["params"]
        rng = np.random.default_rng(0)

        def draw(path, shape):
            if path[-1].key == "bias":
                return jnp.asarray(0.1 * rng.standard_normal(shape.shape))
            fan_in = math.prod(shape.shape[:-1])
            return jnp.asarray(rng.standard_normal(shape.shape) / np.sqrt(fan_in))

        return jax.tree_util.tree_map_with_path(draw, shapes)

    @functools.cached_property
    def data(self):
        return self.batch(1)

    @functools.cached_property
    def layers(self) -> dict[str, LayerReference]:
        return self.references(self.params, *self.data)

    @functools.cached_property
    def _grads_and_stats(self):
        # jax.jit for speed only: the same computations, compiled.
        return jax.jit(
            lambda params, x, y: (
                per_example_grads(self.loss_fn, params, x, y),
                h_and_delta(self.forward, self.output_loss, params, x, y),
            )
        )

    def references(self, params, x, y) -> dict[str, LayerReference]:
        """Everything the reference needs per layer, from one batch, without ekfac_optax."""
        grads, stats = self._grads_and_stats(params, x, y)
        out = {}
        for name, (h, delta) in stats.items():
            out[name] = layer_reference(grads[name], h, delta, "bias" in params[name])
        return out


def layer_reference(layer_grads: Any, h: Any, delta: Any, has_bias: bool) -> "LayerReference":
    """A layer's reference quantities from its per-example gradients, ``h`` and ``delta``."""
    per_example = block_matrix(layer_grads, batched=True)
    factor_a, factor_b, positions = factors(h, delta, has_bias)
    return LayerReference(
        per_example=per_example,
        grad=per_example.mean(axis=0),
        h=np.asarray(h),
        delta=np.asarray(delta),
        has_bias=has_bias,
        factor_a=factor_a,
        factor_b=factor_b,
        positions=positions,
    )


# Batch sizes are such that N · T > d_in + 1 for every layer, so that A has distinct positive
# eigenvalues and the EKFAC eigenbasis (hence s*) is unique up to signs.
PROBLEMS = {
    "mlp": Problem(Mlp(), mlp_forward, (5,), 24),
    "cnn": Problem(Cnn(), cnn_forward, (10, 10, 2), 16),
    "shared": Problem(Shared(), shared_forward, (16,), 20),
    "sequence": Problem(Sequence(), sequence_forward, (4, 3), 24),
}


def relative_error(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` (a norm-wise relative error)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
