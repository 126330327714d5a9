"""Helpers shared by the test modules: data, models, parameters, the train-step recipe, the three
methods side by side, tree comparisons, and the environment of a user's process.

Test modules import from here and from the independent float64 references (``reference.py``,
``kinds_reference.py``: per-example gradients by ``jax.vmap(jax.grad(...))``, hand-written
forward passes, dense solves; they never import ``ekfac_optax``). No test module imports another.
"""

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import ekfac_optax as ek

# --- Data -----------------------------------------------------------------------------------------


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``(1797, 64)`` float64 images in ``[0, 1]`` and their labels."""
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def digits_batches(steps: int, batch: int = 32, dtype: Any = jnp.float32) -> list:
    """``steps`` batches ``(x, y)`` of the digits in one fixed shuffled order (seed 0)."""
    x, y = digits()
    x, y = jnp.asarray(x, dtype), jnp.asarray(y)
    order = np.random.default_rng(0).permutation(len(y))
    usable = len(y) - len(y) % batch
    idx = [order[(i * batch) % usable : (i * batch) % usable + batch] for i in range(steps)]
    return [(x[i], y[i]) for i in idx]


def normal_batch(seed: int, x_shape: tuple, y_shape: tuple, classes: int = 3):
    """Standard normal inputs of ``x_shape`` and integer labels in ``[0, classes)``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape))
    return x, jnp.asarray(rng.integers(0, classes, y_shape))


# --- Models and parameters ------------------------------------------------------------------------


class MLP(nn.Module):
    """Dense layers of ``widths`` with ``activation`` (a ``flax.linen`` function name) between."""

    widths: tuple[int, ...] = (10,)
    activation: str = "tanh"
    dtype: Any = None
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(x)
            if i < len(self.widths) - 1:
                x = getattr(nn, self.activation)(x)
        return x


class NormClassifier(nn.Module):
    """float64 ``Dense(6) -> tanh -> LayerNorm -> Dense(3)``: two Kronecker blocks and a diagonal
    one (the norm's scale and shift)."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64, name="hidden")(x))
        x = nn.LayerNorm(param_dtype=jnp.float64, name="norm")(x)
        return nn.Dense(3, param_dtype=jnp.float64, name="out")(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over every axis of the softmax cross-entropy (classes on the last axis), in at least
    float32."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classifier_loss(model: nn.Module) -> Callable:
    """``loss_fn(params, x, y)``: the mean cross-entropy of a linen ``model``'s logits."""

    def loss_fn(params, x, y):
        return cross_entropy(model.apply({"params": params}, x), y)

    return loss_fn


def init_params(model: nn.Module, *args: Any, seed: int = 0, dtype: Any = None) -> Any:
    """Flax's parameter tree filled from numpy's generator with ``seed`` (no compilation), in the
    model's param dtype or ``dtype``.

    Kernels are normal with variance ``1 / fan_in``, biases ``0.1`` normal, norm scales
    ``1 + 0.2`` normal, embeddings (and any other parameter) standard normal over ``fan_in``
    (``prod(shape[:-1])``, 1 for vectors and scalars).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = path[-1].key
        if name == "bias":
            value = 0.1 * rng.standard_normal(shape.shape)
        elif name == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape.shape)
        else:
            fan_in = math.prod(shape.shape[:-1]) if len(shape.shape) > 1 else 1
            value = rng.standard_normal(shape.shape) / np.sqrt(fan_in)
        return jnp.asarray(value, dtype or shape.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# --- Train steps ----------------------------------------------------------------------------------


def train_step(loss_fn: Callable, tx: optax.GradientTransformationExtraArgs) -> Callable:
    """The README's recipe: ``jax.jit((params, state, *batch) -> (params, state, loss))``."""
    grad_fn = ek.value_grad_and_stats(loss_fn)

    @jax.jit
    def step(params, state, *batch):
        loss, grads, stats = grad_fn(params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss

    return step


def train(step: Callable, params: Any, state: Any, batches: list) -> tuple[Any, Any, list]:
    """``step`` over ``batches``: the final params and state and the losses."""
    losses = []
    for batch in batches:
        params, state, loss = step(params, state, *batch)
        losses.append(float(loss))
    return params, state, losses


METHODS = ("ekfac", "ekfac-ra", "kfac")
DAMPING = 1e-3
SCALING_DECAY = 0.7  # EKFAC-ra's running average (and scale_by_ekfac's fallback average)


def transforms(blocks, *, ekfac_decay=0.0, kfac_decay=0.0, **kwargs) -> dict:
    """The three methods with ``basis_update_every=1`` (``**kwargs``: damping, fallback, ...)."""
    kwargs = dict(blocks=blocks, basis_update_every=1, **kwargs)
    kwargs.setdefault("damping", DAMPING)
    ekfac = dict(factor_decay=ekfac_decay, scaling_decay=SCALING_DECAY, **kwargs)
    return {
        "ekfac": ek.scale_by_ekfac(scaling="batch", **ekfac),
        "ekfac-ra": ek.scale_by_ekfac(scaling="running", **ekfac),
        "kfac": ek.scale_by_kfac(factor_decay=kfac_decay, **kwargs),
    }


def stepper(loss_fn: Callable, txs: dict) -> Callable:
    """``jax.jit((params, states, *args) -> (updates, states, grads, stats))`` for each method.

    ``states`` may be ``None``: then each method starts from ``tx.init(params)`` (first step).
    """

    @jax.jit
    def step(params, states, *args):
        _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, *args)
        if states is None:
            states = {key: tx.init(params) for key, tx in txs.items()}
        out = {key: tx.update(grads, states[key], params, stats=stats) for key, tx in txs.items()}
        return (
            {key: u for key, (u, _) in out.items()},
            {key: s for key, (_, s) in out.items()},
            grads,
            stats,
        )

    return step


# --- Tree comparisons -----------------------------------------------------------------------------


def leaves(tree: Any) -> list[np.ndarray]:
    """The leaves as float64 numpy arrays."""
    return [np.asarray(x).astype(np.float64) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure, bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(actual: Any, expected: Any, what: Any = "", rtol: float = 1e-8) -> None:
    """Same paths; each leaf's error is below ``rtol`` relative to the norm of its layer (its node
    in the tree): a leaf whose exact value is zero (an attention key's bias, to which softmax is
    invariant) holds round-off only, which the layer's scale, not its own, measures."""
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e], what
    layer_norms: dict = {}
    for path, e in flat_e:
        layer_norms[path[:-1]] = layer_norms.get(path[:-1], 0.0) + float(np.sum(np.square(e)))
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        error = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(e, np.float64)))
        scale = max(np.sqrt(layer_norms[path[:-1]]), 1e-300)
        assert error / scale < rtol, (what, jax.tree_util.keystr(path), error / scale)


# --- Processes ------------------------------------------------------------------------------------


def user_environment() -> dict[str, str]:
    """The environment without the suite's settings (8 host devices, LLVM at -O0, float64; see
    ``conftest.py``), for a subprocess that runs as a user's would, with JAX's defaults."""
    env = dict(os.environ)
    suite = ("xla_force_host_platform_device_count", "xla_backend_optimization_level")
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not any(s in f for s in suite)]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_ENABLE_X64", None)
    return env


# --- A small language model of today's style ------------------------------------------------------

LM_VOCAB, LM_WIDTH, LM_HIDDEN = 16, 8, 16


class TiedLM(nn.Module):
    """A small language model of today's style (``test_mixed_precision``, ``test_kfe_adam``):
    tied embedding, pre-norm GLU block without biases, final RMSNorm, ``attend`` logits."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(LM_VOCAB, LM_WIDTH, name="tokens", **kw)
        x = tokens(ids)
        h = nn.RMSNorm(name="norm", **kw)(x)
        up = nn.Dense(LM_HIDDEN, use_bias=False, name="up", **kw)(h)
        gate = nn.Dense(LM_HIDDEN, use_bias=False, name="gate", **kw)(h)
        x = x + nn.Dense(LM_WIDTH, use_bias=False, name="down", **kw)(nn.silu(gate) * up)
        return tokens.attend(nn.RMSNorm(name="final", **kw)(x))


def lm_loss(model):
    def loss_fn(params, ids, labels):
        return cross_entropy(model.apply({"params": params}, ids).astype(jnp.float32), labels)

    return loss_fn


def lm_token_batch(seed, n=32, t=8):
    """Ids and the next-token labels ``(id + 1) % LM_VOCAB``: a task the model can learn."""
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, LM_VOCAB, (n, t)), jnp.int32)
    return ids, (ids + 1) % LM_VOCAB
