"""The layer kinds of issue 14 against exact equivalences and first-principles references.

Each test runs the three methods on one batch (``basis_update_every=1``, ``factor_decay=0`` unless
the test is about averages): EKFAC (``scale_by_ekfac(scaling="batch")``), EKFAC-ra
(``scaling="running"``) and KFAC (``scale_by_kfac``), with blocks from ``ek.find_blocks``.

- Exact equivalences (same library, another model that computes the same function with plain
  ``nn.Dense``/``nn.Conv`` layers, validated by ``test_reference_updates.py``): ``nn.DenseGeneral``
  = ``nn.Dense`` on reshaped inputs; ``batch_dims`` = one ``nn.Dense`` per slice; a grouped or
  depthwise ``nn.Conv`` = one ``nn.Conv`` per group; ``nn.Embed`` = ``nn.Dense`` on one-hot
  inputs. The two models' factors are equal up to round-off; with distinct eigenvalues (batch
  sizes chosen for it) the updates agree to round-off amplified by ``1 / gap``: measured
  ``<= 1.2e-14``, tolerance ``RTOL = 1e-8``.
- First-principles references (``kinds_reference.py``, float64, never a library intermediate):
  per-example gradients by ``jax.vmap(jax.grad(...))``, ``h`` and ``delta`` from a hand-written
  forward pass with zero probes, dense ``np.kron`` matrices solved by ``np.linalg.solve``. Every
  solved matrix has a condition number below ``1e6`` (asserted), so the float64 solve is accurate
  to ``~1e-10`` (measured ``<= 4e-14``); tolerance ``RTOL``. A modelling error (a missing
  ``T``, a wrong average, the wrong decay, expand instead of reduce, a transposed kernel layout)
  changes the updates by ``1e-3`` or more; the tests assert the references are that far from
  the plain gradient or from the alternative, so the comparisons are not vacuous.

Perturbed references were checked to fail (by hand, not kept as tests): groups sliced
interleaved (``kernel[..., g::G]``) instead of contiguously -> error 1.1; the fallback's EMA
without debiasing -> 0.57; EKFAC-ra's norm reference with decay 0.5 instead of 0.7 -> 0.098; the
ConvTranspose ``transpose_kernel=True`` kernel swapped but not flipped -> the hand forward pass
is off by 0.04 (1-D) and 0.01 (2-D).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import kinds_reference as kr
import numpy as np
import optax
import pytest
import reference as ref
from helpers import (
    DAMPING,
    METHODS,
    SCALING_DECAY,
    assert_trees_close,
    classifier_loss,
    cross_entropy,
    init_params,
    normal_batch,
    stepper,
    train,
    train_step,
    transforms,
)

import ekfac_optax as ek

F64 = jnp.float64
KFAC_DECAY = 0.6  # scale_by_kfac's factor_decay where a test is about averages
RTOL = 1e-8  # norm-wise relative; see the module docstring


def first_step(loss_fn, params, *args, **kwargs):
    """``(blocks, updates, states, grads, stats)`` of the first step of the three methods."""
    blocks = ek.find_blocks(loss_fn, params, *args)
    updates, states, grads, stats = stepper(loss_fn, transforms(blocks, **kwargs))(
        params, None, *args
    )
    return blocks, updates, states, grads, stats


def assert_close(actual, expected, what, rtol=RTOL):
    error = ref.relative_error(np.asarray(actual, np.float64), np.asarray(expected, np.float64))
    assert error < rtol, (what, error)


def summary_rows(params, blocks, **kwargs) -> dict[str, str]:
    """``summarize``'s rows keyed by the parameter path they start with."""
    table = ek.summarize(params, blocks, **kwargs)
    paths = [
        "/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    rows = {}
    for line in table.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in paths:
            rows[first] = line
    assert set(rows) == set(paths), table
    return rows


# --- 1. nn.DenseGeneral = nn.Dense on reshaped inputs ---------------------------------------------

H, HD, D = 2, 3, 4  # heads, head dim, model dim


class DenseGeneralNet(nn.Module):
    """(a) q/k/v: ``axis=-1``, ``features=(H, HD)``, with bias; (b) out: ``axis=(-2, -1)``,
    ``features=D``, without bias; (c) both on inputs with two extra position axes."""

    @nn.compact
    def __call__(self, x):  # (N, 2, 2, D)
        q = nn.DenseGeneral((H, HD), axis=-1, param_dtype=F64, name="qkv")(x)  # (N, 2, 2, H, HD)
        return nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, param_dtype=F64, name="out")(
            jnp.tanh(q)
        )  # (N, 2, 2, D): logits


class DenseGeneralAsDense(nn.Module):
    """The same function with ``nn.Dense`` on reshaped inputs."""

    @nn.compact
    def __call__(self, x):
        q = nn.Dense(H * HD, param_dtype=F64, name="qkv")(x).reshape(*x.shape[:-1], H, HD)
        q = jnp.tanh(q).reshape(*x.shape[:-1], H * HD)
        return nn.Dense(D, use_bias=False, param_dtype=F64, name="out")(q)


G_STACK = 2  # the batch_dims slices


class StackedDenseGeneralNet(nn.Module):
    """(d) ``batch_dims=(0,)`` on ``(G, N, L, d_in)``: the example axis is axis 1."""

    @nn.compact
    def __call__(self, x):  # (G, N, L, 4)
        z = nn.DenseGeneral((2, 3), batch_dims=(0,), param_dtype=F64, name="stacked")(x)
        return z.reshape(*z.shape[:-2], 6)  # (G, N, L, 6): logits


class StackedAsDense(nn.Module):
    """The same function with one ``nn.Dense`` per slice ``x[g]``."""

    @nn.compact
    def __call__(self, x):
        return jnp.stack(
            [nn.Dense(6, param_dtype=F64, name=f"stacked_{g}")(x[g]) for g in range(x.shape[0])]
        )


def dense_general_to_dense(params) -> dict:
    return {
        "qkv": {
            "kernel": params["qkv"]["kernel"].reshape(D, H * HD),
            "bias": params["qkv"]["bias"].reshape(H * HD),
        },
        "out": {"kernel": params["out"]["kernel"].reshape(H * HD, D)},
    }


def stacked_to_dense(params) -> dict:
    layer = params["stacked"]
    return {
        f"stacked_{g}": {
            "kernel": layer["kernel"][g].reshape(4, 6),
            "bias": layer["bias"][g].ravel(),
        }
        for g in range(G_STACK)
    }


def assert_updates_equal(actual: dict, expected: dict, method: str) -> None:
    for path, layer in expected.items():
        for name in layer:
            assert_close(actual[path][name], layer[name], (method, path, name))


def test_dense_general_equals_dense():
    """DenseGeneral's update in every mode is the equivalent nn.Dense's, reshaped back: q/k/v
    ``(D, H, HD)`` kernel as ``(D, H*HD)``, out ``(H, HD, D)`` as ``(H*HD, D)``, positions from
    every non-contracted axis (``T = 4``). Blocks: kind "dense_general", ``d_in`` = prod of the
    contracted axes, ``d_out`` = prod(features)."""
    x, y = normal_batch(1, (6, 2, 2, D), (6, 2, 2), classes=D)  # N T = 24 > d_in + 1 = 7
    params = init_params(DenseGeneralNet(), x)
    blocks, updates, _, grads, _ = first_step(classifier_loss(DenseGeneralNet()), params, x, y)
    dense_params = dense_general_to_dense(params)
    _, dense_updates, _, _, _ = first_step(
        classifier_loss(DenseGeneralAsDense()), dense_params, x, y
    )

    for method in METHODS:
        assert_updates_equal(dense_general_to_dense(updates[method]), dense_updates[method], method)
    # Not vacuous: the preconditioning changes the gradient.
    g = dense_general_to_dense(grads)["qkv"]["kernel"]
    assert ref.relative_error(g, dense_updates["ekfac"]["qkv"]["kernel"]) > 1e-2
    assert set(blocks) == {"qkv", "out"}
    for path, (d_in, d_out) in {"qkv": (D, H * HD), "out": (H * HD, D)}.items():
        spec = blocks[path]
        assert (spec.kind, spec.block, spec.stack) == ("dense_general", "kronecker", ()), spec
        assert (spec.d_in, spec.d_out) == (d_in, d_out), spec


def test_dense_general_batch_dims_equals_separate_dense():
    """``batch_dims=(0,)`` on ``(G, N, L, d_in)``: a stacked block (``stack == (G,)``, state
    arrays with a leading ``G``) whose slice ``g`` updates as an ``nn.Dense`` of its own on
    ``x[g]``, the example axis being axis 1 (the first after the batch dims)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((G_STACK, 6, 2, 4)))  # N T = 12 > d_in + 1 = 5
    y = jnp.asarray(rng.integers(0, 6, (G_STACK, 6, 2)))
    params = init_params(StackedDenseGeneralNet(), x)
    blocks, updates, states, _, _ = first_step(
        classifier_loss(StackedDenseGeneralNet()), params, x, y
    )
    dense_params = stacked_to_dense(params)
    _, dense_updates, _, _, _ = first_step(classifier_loss(StackedAsDense()), dense_params, x, y)

    for method in METHODS:
        assert_updates_equal(stacked_to_dense(updates[method]), dense_updates[method], method)
    spec = blocks["stacked"]
    assert (spec.kind, spec.stack, spec.d_in, spec.d_out) == ("dense_general", (G_STACK,), 4, 6)
    for method in METHODS:
        block = states[method].blocks["stacked"]
        assert block.factor_a.shape == (G_STACK, 5, 5), block.factor_a.shape
        assert block.factor_b.shape == (G_STACK, 6, 6), block.factor_b.shape


# --- 1b. nn.Einsum = the nn.DenseGeneral of the same linear map -----------------------------------

EINSUM_CASES = {
    # name: (equation, kernel shape, kernel axes of the twin's kernel, output transpose, stacked)
    "attention": ("btd,dnh->btnh", (4, 2, 3), (0, 1, 2), None, False),
    "permuted": ("btd,hdn->bnth", (3, 4, 2), (1, 2, 0), (0, 2, 1, 3), False),
    "experts": ("ebd,edf->bfe", (2, 4, 5), (0, 1, 2), (1, 2, 0), True),
}


class EinsumNet(nn.Module):
    """One ``nn.Einsum`` (with a bias); logits from its output."""

    case: str

    @nn.compact
    def __call__(self, x):
        equation, shape, _, _, stacked = EINSUM_CASES[self.case]
        if stacked:  # (N, 4) -> two "experts" see x and 2x: (E, N, 4)
            x = jnp.stack([x, 2 * x])
        y = nn.Einsum(shape, equation, param_dtype=F64, name="layer")(x)
        if stacked:
            return y.sum(-1)  # (N, 5)
        return (
            jnp.swapaxes(y, 1, 2).reshape(*x.shape[:2], -1)
            if self.case == "permuted"
            else (y.reshape(*x.shape[:2], -1))
        )


class EinsumTwin(nn.Module):
    """The same map as ``nn.DenseGeneral`` (features ``(2, 3)``, or 5 with ``batch_dims``)."""

    case: str

    @nn.compact
    def __call__(self, x):
        if EINSUM_CASES[self.case][4]:
            y = nn.DenseGeneral(5, batch_dims=(0,), param_dtype=F64, name="layer")(
                jnp.stack([x, 2 * x])
            )
            return y.sum(0)
        return nn.DenseGeneral((2, 3), param_dtype=F64, name="layer")(x).reshape(*x.shape[:2], -1)


def einsum_to_twin(layer: dict, case: str) -> dict:
    """An Einsum's parameters (or gradients, updates) in its DenseGeneral twin's layout."""
    _, _, axes, _, stacked = EINSUM_CASES[case]
    out = {"kernel": jnp.transpose(layer["kernel"], axes)}
    # The bias is over the output's kernel letters in the output's order: "bfe" -> (f, e).
    out["bias"] = layer["bias"].T if stacked else layer["bias"]
    return out


@pytest.mark.parametrize("case", list(EINSUM_CASES))
def test_einsum_equals_dense_general(case):
    """An ``nn.Einsum`` whose equation is a linear map of its input is a Kronecker block (a
    stack for kernel letters kept in the output, as the experts of a mixture): its update in
    every method is that of the ``nn.DenseGeneral`` computing the same function, with the
    kernel's and bias's axes permuted as the equation orders them (the output permuted too)."""
    rng = np.random.default_rng(11)
    stacked = EINSUM_CASES[case][4]
    x = jnp.asarray(rng.standard_normal((16, 4) if stacked else (16, 3, 4)))  # N T > d_in + 1
    y = jnp.asarray(rng.integers(0, 5 if stacked else 6, x.shape[:-1]))
    params = init_params(EinsumNet(case), x)
    blocks, updates, _, grads, _ = first_step(classifier_loss(EinsumNet(case)), params, x, y)
    spec = blocks["layer"]
    assert (spec.kind, spec.block, spec.stack) == ("einsum", "kronecker", (2,) if stacked else ())
    twin = {"layer": einsum_to_twin(params["layer"], case)}
    twin_loss = classifier_loss(EinsumTwin(case))
    np.testing.assert_allclose(
        twin_loss(twin, x, y), classifier_loss(EinsumNet(case))(params, x, y), rtol=1e-12
    )
    _, expected, _, _, _ = first_step(twin_loss, twin, x, y)
    for method in METHODS:
        actual = {"layer": einsum_to_twin(updates[method]["layer"], case)}
        assert_updates_equal(actual, expected[method], method)
    g = einsum_to_twin(grads["layer"], case)["kernel"]
    assert ref.relative_error(g, expected["ekfac"]["layer"]["kernel"]) > 1e-2  # not vacuous


class EinsumFallbackNet(nn.Module):
    equation: str
    shape: tuple

    @nn.compact
    def __call__(self, x):
        y = nn.Einsum(self.shape, self.equation, use_bias=False, param_dtype=F64, name="mix")(x)
        return nn.Dense(3, param_dtype=F64, name="head")(y.reshape(x.shape[0], -1))


@pytest.mark.parametrize(
    "equation, shape, reason",
    [
        ("nd,dk->nd", (4, 2), "kernel axes 'k' summed out"),
        ("nd,ndk->nk", (5, 4, 2), "no example axis"),
        ("...d,dk->...k", (4, 2), "ellipsis"),
    ],
)
def test_einsum_that_is_no_linear_map_of_its_input_falls_back_with_its_reason(
    equation, shape, reason
):
    """An Einsum whose equation sums kernel axes away, maps the example axis away or uses an
    ellipsis is no block; ``summarize`` gives the reason on its kernel."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)))
    model = EinsumFallbackNet(equation, shape)
    params = init_params(model, x)
    blocks = ek.find_blocks(classifier_loss(model), params, x, jnp.zeros(5, jnp.int32))
    assert "mix" not in blocks and "head" in blocks
    row = summary_rows(params, blocks)["mix/kernel"]
    assert "no block: Einsum" in row and reason in row, row


# --- 2. Grouped and depthwise nn.Conv = one nn.Conv per group -------------------------------------


GROUPS = {"depthwise": 2, "grouped": 2}


class GroupedNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, 5, 5, 2)
        # Depthwise (G = c_in = 2), channel multiplier 2: groups of 1 input, 2 output channels.
        z = nn.Conv(4, (3, 3), feature_group_count=2, param_dtype=F64, name="depthwise")(x)
        # Grouped: 2 groups of 2 input and 2 output channels, strided.
        z = nn.Conv(4, (3, 3), strides=2, feature_group_count=2, param_dtype=F64, name="grouped")(
            jnp.tanh(z)
        )
        return z.mean(axis=(1, 2))  # (N, 4): logits


class GroupsAsConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        z = jnp.concatenate(
            [
                nn.Conv(2, (3, 3), param_dtype=F64, name=f"depthwise_{g}")(x[..., g : g + 1])
                for g in range(2)
            ],
            axis=-1,
        )
        z = jnp.tanh(z)
        z = jnp.concatenate(
            [
                nn.Conv(2, (3, 3), strides=2, param_dtype=F64, name=f"grouped_{g}")(
                    z[..., 2 * g : 2 * g + 2]
                )
                for g in range(2)
            ],
            axis=-1,
        )
        return z.mean(axis=(1, 2))


def split_groups(params) -> dict:
    """Group ``g`` of a conv with ``G`` groups: ``kernel[..., g*cout_g:(g+1)*cout_g]`` (it sees
    input channels ``g*cin_g:(g+1)*cin_g``) and the same slice of the bias."""
    out = {}
    for path, groups in GROUPS.items():
        kernel, bias = params[path]["kernel"], params[path]["bias"]
        c_out = kernel.shape[-1] // groups
        for g in range(groups):
            out[f"{path}_{g}"] = {
                "kernel": kernel[..., g * c_out : (g + 1) * c_out],
                "bias": bias[g * c_out : (g + 1) * c_out],
            }
    return out


def test_grouped_and_depthwise_conv_equal_one_conv_per_group():
    """Depthwise (G=c_in=2, multiplier 2) and grouped (G=2) convs: the update of group ``g`` is
    that of a separate ``nn.Conv`` on its input channels; the state is stacked, ``factor_a``
    ``(G, a, a)``, ``factor_b`` ``(G, b, b)``, ``scalings`` ``(G, a, b)``."""
    x, y = normal_batch(3, (8, 5, 5, 2), (8,), classes=4)  # N T >= 72 > d_in + 1 = 19
    params = init_params(GroupedNet(), x)
    blocks, updates, states, grads, _ = first_step(classifier_loss(GroupedNet()), params, x, y)
    split_params = split_groups(params)
    _, split_updates, _, _, _ = first_step(classifier_loss(GroupsAsConvs()), split_params, x, y)

    for method in METHODS:
        assert_updates_equal(split_groups(updates[method]), split_updates[method], method)
    g = split_groups(grads)["grouped_0"]["kernel"]
    assert ref.relative_error(g, split_updates["ekfac"]["grouped_0"]["kernel"]) > 1e-2
    for path, d_in, d_out in (("depthwise", 9, 2), ("grouped", 18, 2)):
        spec = blocks[path]
        assert (spec.kind, spec.block, spec.stack) == ("conv", "kronecker", (2,)), spec
        assert (spec.d_in, spec.d_out) == (d_in, d_out), spec
        for method in METHODS:
            block = states[method].blocks[path]
            assert block.factor_a.shape == (2, d_in + 1, d_in + 1)
            assert block.factor_b.shape == (2, d_out, d_out)
            assert block.scalings.shape == (2, d_in + 1, d_out)


# --- 3. nn.Embed = nn.Dense(use_bias=False) on one-hot inputs -------------------------------------

VOCAB, WIDTH = 6, 3


class EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, ids):  # (N, L) integers
        return nn.Embed(VOCAB, WIDTH, param_dtype=F64, name="tokens")(ids)  # logits


class OneHotNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        one_hot = jax.nn.one_hot(ids, VOCAB, dtype=F64)
        return nn.Dense(WIDTH, use_bias=False, param_dtype=F64, name="tokens")(one_hot)


def token_batch(seed: int, distinct_counts: bool):
    """``(ids (5, 3), labels (5, 3))``. With ``distinct_counts`` the tokens ``0..5`` appear
    ``1, 2, 3, 4, 5, 0`` times: the input factor ``diag(counts) / (N T)`` has distinct
    eigenvalues, so the EKFAC eigenbasis of the one-hot Dense is unique."""
    rng = np.random.default_rng(seed)
    if distinct_counts:
        ids = np.repeat(np.arange(VOCAB), [1, 2, 3, 4, 5, 0])
        ids = rng.permutation(ids).reshape(5, 3)
    else:
        ids = rng.integers(0, VOCAB, (5, 3))
    return jnp.asarray(ids), jnp.asarray(rng.integers(0, WIDTH, (5, 3)))


def test_embed_equals_one_hot_dense():
    """nn.Embed's update is that of nn.Dense(use_bias=False) on one-hot inputs with kernel =
    embedding: KFAC on any batch; EKFAC and EKFAC-ra on a batch with distinct token counts. The
    state's input factor is the diagonal ``(vocab,)``, never ``vocab x vocab``."""
    ids, labels = token_batch(4, distinct_counts=True)
    params = init_params(EmbedNet(), ids)
    one_hot_params = {"tokens": {"kernel": params["tokens"]["embedding"]}}
    embed_loss, one_hot_loss = classifier_loss(EmbedNet()), classifier_loss(OneHotNet())
    blocks = ek.find_blocks(embed_loss, params, ids, labels)
    spec = blocks["tokens"]
    assert (spec.kind, spec.block, spec.d_in, spec.d_out) == ("embed", "embed", VOCAB, WIDTH)
    embed_step = stepper(embed_loss, transforms(blocks))
    one_hot_step = stepper(
        one_hot_loss, transforms(ek.find_blocks(one_hot_loss, one_hot_params, ids, labels))
    )

    for distinct, methods in ((True, METHODS), (False, ("kfac",))):
        ids, labels = token_batch(5 if distinct else 6, distinct)
        if not distinct:  # the KFAC batch has repeated counts (a degenerate eigenbasis)
            assert len(set(np.bincount(np.asarray(ids).ravel(), minlength=VOCAB))) < VOCAB
        updates, states, _, _ = embed_step(params, None, ids, labels)
        expected, _, _, _ = one_hot_step(one_hot_params, None, ids, labels)
        for method in methods:
            block = states[method].blocks["tokens"]
            assert block.factor_a.shape == (VOCAB,), block.factor_a.shape
            assert block.factor_b.shape == (WIDTH, WIDTH)
            assert_close(
                updates[method]["tokens"]["embedding"],
                expected[method]["tokens"]["kernel"],
                (method, distinct),
            )


class TiedNet(nn.Module):
    """One Embed used as the input embedding and, through ``attend``, as the output layer."""

    def setup(self):
        self.tokens = nn.Embed(VOCAB, WIDTH, param_dtype=F64)
        self.mix = nn.Dense(WIDTH, param_dtype=F64)

    def __call__(self, ids):
        return self.tokens.attend(jnp.tanh(self.mix(self.tokens(ids))))


def tied_reference(params, ids, labels):
    """``(per-example gradients G_n of the tied embedding, T A ⊗ B)`` of ``TiedNet`` computed
    from first principles: ``G_n`` by ``jax.vmap(jax.grad(...))`` of the model (both uses of the
    weight summed by autodiff); the lookup's output gradients ``delta``, the attend calls' inputs
    ``x`` and logit gradients ``g`` from a hand-written forward pass with zero probes; the dense
    Fisher of the two Kronecker blocks ``F = T diag(counts / N T) ⊗ E[δδᵀ] + S diag E[g²] ⊗
    E[x xᵀ]`` built with ``np.kron``, and its partial traces over either side, so that
    ``T A ⊗ B = Tr_width F ⊗ Tr_vocab F / tr F`` (the factors' documented definition)."""
    n, t = ids.shape
    embedding = params["tokens"]["embedding"]
    kernel, bias = params["mix"]["kernel"], params["mix"]["bias"]

    def loss(probe_lookup, probe_logits):
        e = embedding[ids] + probe_lookup
        x = jnp.tanh(e @ kernel + bias)
        return cross_entropy(x @ embedding.T + probe_logits, labels), x

    zeros = (jnp.zeros((n, t, WIDTH), F64), jnp.zeros((n, t, VOCAB), F64))
    (delta, g), x = jax.grad(loss, argnums=(0, 1), has_aux=True)(*zeros)
    delta, g, x = (np.asarray(a).reshape(n * t, -1) for a in (n * delta, n * g, x))
    counts = np.bincount(np.asarray(ids).ravel(), minlength=VOCAB) / (n * t)
    fisher = t * np.kron(np.diag(counts), delta.T @ delta / (n * t))
    fisher += t * np.kron(np.diag((g**2).mean(axis=0)), x.T @ x / (n * t))
    blocks = fisher.reshape(VOCAB, WIDTH, VOCAB, WIDTH)
    vocab_side = np.einsum("iaja->ij", blocks)  # Tr_width F
    width_side = np.einsum("iaib->ab", blocks)  # Tr_vocab F
    per_example = ref.per_example_grads(classifier_loss(TiedNet()), params, ids, labels)
    product = np.kron(vocab_side, width_side) / np.trace(fisher)
    return np.asarray(per_example["tokens"]["embedding"]), vocab_side, width_side, product


def test_tied_embed_is_one_block_against_per_example_gradients():
    """A tied embedding (``__call__`` and ``attend``) is one block: diagonal vocabulary factor,
    width factor of both uses. Its first updates in every method equal the dense float64
    references of ``kronecker_updates`` (``s*`` from the tied per-example gradients, KFAC from
    ``T A ⊗ B``) for the factors of ``tied_reference``; the state holds a ``(vocab,)`` vector
    and a ``(width, width)`` matrix whose Kronecker product is the reference's. The updates are
    far (``> 1e-2``) from the diagonal fallback the weight got before, and from the block of the
    lookup alone, so the comparison is not vacuous."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    labels = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    params = init_params(TiedNet(), ids)
    loss_fn = classifier_loss(TiedNet())
    blocks, updates, states, grads, _ = first_step(loss_fn, params, ids, labels)
    spec = blocks["tokens"]
    assert (spec.block, spec.tied, spec.d_in, spec.d_out) == ("embed", True, VOCAB, WIDTH)
    assert blocks["mix"].block == "kronecker"

    per_example, vocab_side, width_side, product = tied_reference(params, ids, labels)
    g = np.asarray(grads["tokens"]["embedding"])
    np.testing.assert_allclose(per_example.mean(axis=0), g, rtol=1e-12)
    assert np.allclose(vocab_side, np.diag(np.diag(vocab_side)))  # diagonal by construction
    # T A ⊗ B with any split of the scale between the factors: A = Tr_width F / (T tr F).
    t = ids.shape[1]
    factor_a = vocab_side / (t * np.trace(width_side))
    expected = kr.kronecker_updates(per_example, factor_a, width_side, t, DAMPING, SCALING_DECAY)
    fallback = g / (5 * g**2 + DAMPING)  # N = 5
    for method in METHODS:
        block = states[method].blocks["tokens"]
        assert block.factor_a.shape == (VOCAB,) and block.factor_b.shape == (WIDTH, WIDTH)
        state_product = t * np.kron(np.diag(block.factor_a), block.factor_b)
        assert_close(state_product, product, (method, "T A ⊗ B"))
        actual = updates[method]["tokens"]["embedding"]
        assert_close(actual, expected[method], method)
        assert ref.relative_error(np.asarray(actual), fallback) > 1e-2, method
    row = summary_rows(params, blocks)["tokens/embedding"]
    assert "tied embedding block 6x3" in row, row


def test_embedding_damping_is_the_embeddings_own_relative_damping():
    """``embedding_damping`` is the damping of the (tied) embedding's block and of no other.
    With ``damping_mode="relative"``, ``damping=0.1`` and ``embedding_damping=1.0``, the
    embedding's first updates in every method equal the dense float64 references of
    ``kronecker_updates`` with the Tikhonov damping ``1.0 · mean(s)``, the mean computed here
    from ``tied_reference`` without a basis (it is basis-independent): EKFAC's
    ``mean_n ||G_n||² / (a b)``, EKFAC-ra's ``(d T tr A tr B + (1 - d) N ||g||²) / (a b)`` (its
    restart from KFAC, then one running step), KFAC's ``T tr A tr B / (a b)``. The Dense layer's
    updates are those with ``damping=0.1`` alone (whose relative damping
    ``test_reference_updates.py`` checks against its reference), and the embedding's are far
    (``> 1e-2``) from those, so the comparison is not vacuous. A schedule, and the argument
    injected by ``optax.inject_hyperparams``, give the same updates."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    labels = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    params = init_params(TiedNet(), ids)
    loss_fn = classifier_loss(TiedNet())
    relative = dict(damping=0.1, damping_mode="relative")
    blocks, updates, _, grads, _ = first_step(
        loss_fn, params, ids, labels, embedding_damping=1.0, **relative
    )
    _, plain, _, _, _ = first_step(loss_fn, params, ids, labels, **relative)

    per_example, vocab_side, width_side, _ = tied_reference(params, ids, labels)
    n, t = ids.shape
    factor_a = vocab_side / (t * np.trace(width_side))
    g = np.asarray(grads["tokens"]["embedding"])
    kfac_mean = t * np.trace(factor_a) * np.trace(width_side) / g.size
    means = {
        "ekfac": np.mean(np.sum(per_example**2, axis=(1, 2))) / g.size,
        "ekfac-ra": SCALING_DECAY * kfac_mean + (1 - SCALING_DECAY) * n * np.sum(g**2) / g.size,
        "kfac": kfac_mean,
    }
    for method in METHODS:
        expected = kr.kronecker_updates(
            per_example, factor_a, width_side, t, 1.0 * means[method], SCALING_DECAY
        )[method]
        actual = updates[method]["tokens"]["embedding"]
        assert_close(actual, expected, method)
        assert ref.relative_error(np.asarray(actual), plain[method]["tokens"]["embedding"]) > 1e-2
        np.testing.assert_array_equal(
            updates[method]["mix"]["kernel"], plain[method]["mix"]["kernel"]
        )

    options = dict(blocks=blocks, basis_update_every=1, factor_decay=0.0, **relative)
    scheduled = ek.scale_by_ekfac(embedding_damping=optax.constant_schedule(1.0), **options)
    injected = optax.inject_hyperparams(ek.scale_by_ekfac, static_args=("blocks",))(
        embedding_damping=1.0, **options
    )
    _, states, _, _ = stepper(loss_fn, {"scheduled": scheduled, "injected": injected})(
        params, None, ids, labels
    )
    assert float(states["injected"].hyperparams["embedding_damping"]) == 1.0
    for key, tx in (("scheduled", scheduled), ("injected", injected)):
        out, _, _, _ = stepper(loss_fn, {key: tx})(params, None, ids, labels)
        # Injected hyperparameters are arrays, folded otherwise than constants: round-off only.
        assert_trees_close(out[key], updates["ekfac"], key, rtol=1e-12)


class WrongWidthTiedNet(nn.Module):
    """A tied embedding whose attend gets inputs of another width than its lookup gives."""

    @nn.compact
    def __call__(self, ids):
        tokens = nn.Embed(VOCAB, WIDTH, param_dtype=F64, name="tokens")
        x = nn.Dense(WIDTH + 1, use_bias=False, param_dtype=F64, name="mix")(tokens(ids))
        return tokens.attend(x)


class AttendOnlyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Embed(VOCAB, WIDTH, param_dtype=F64, name="tokens").attend(x)


def test_tied_embed_bad_stats_and_attend_only():
    """Stats of a tied embedding without its attend calls' arrays, or with mismatched shapes:
    a ValueError naming the layer and the expected shapes, before any state changes. An
    ``nn.Embed`` used only through ``attend`` is no block, and ``summarize`` says why."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    labels = jnp.asarray(rng.integers(0, VOCAB, (5, 3)))
    params = init_params(TiedNet(), ids)
    loss_fn = classifier_loss(TiedNet())
    blocks = ek.find_blocks(loss_fn, params, ids, labels)
    _, grads, stats = ek.value_grad_and_stats(loss_fn)(params, ids, labels)
    tx = ek.scale_by_ekfac(blocks=blocks)
    state = tx.init(params)
    tokens = stats["tokens"]
    for bad in (
        tokens._replace(attend_h=None),
        tokens._replace(attend_delta=tokens.attend_delta[:, :, :-1]),
    ):
        with pytest.raises(ValueError, match="tokens.*attend_h of shape"):
            tx.update(grads, state, params, stats={**stats, "tokens": bad})
    with pytest.raises(ValueError, match="mix.*no tied embedding"):
        tx.update(
            grads,
            state,
            params,
            stats={
                **stats,
                "mix": stats["mix"]._replace(
                    attend_h=tokens.attend_h, attend_delta=tokens.attend_delta
                ),
            },
        )

    wrong = {"tokens": params["tokens"], "mix": {"kernel": jnp.ones((WIDTH, WIDTH + 1))}}
    with pytest.raises(ValueError, match=r"'tokens' is tied.*\(5, 3, 4\)"):
        ek.find_blocks(classifier_loss(WrongWidthTiedNet()), wrong, ids, labels)

    x = jnp.asarray(rng.normal(size=(5, 3, WIDTH)))
    params = init_params(AttendOnlyNet(), x)
    blocks = ek.find_blocks(classifier_loss(AttendOnlyNet()), params, x, labels)
    assert "tokens" not in blocks
    row = summary_rows(params, blocks)["tokens/embedding"]
    assert "only through attend" in row, row


def test_tied_embed_factors_reduce_to_each_use():
    """The tied factors' ``T A ⊗ B`` is exactly each use's own Kronecker block when the other use
    contributes nothing: the lookup's ``T diag(counts) ⊗ E[δδᵀ]`` with zero logit gradients, the
    attend's ``S diag E[g²] ⊗ E[x xᵀ]`` with zero lookup gradients (float64, round-off only)."""
    from ekfac_optax.curvature import _factors

    rng = np.random.default_rng(3)
    n, t, s = 4, 3, 2
    ids = jnp.asarray(rng.integers(0, VOCAB, (n, t)))
    delta = rng.normal(size=(n, t, WIDTH))
    x, g = rng.normal(size=(n, s, WIDTH)), rng.normal(size=(n, s, VOCAB))
    counts = np.bincount(np.asarray(ids).ravel(), minlength=VOCAB) / (n * t)
    flat = delta.reshape(-1, WIDTH)
    lookup = t * np.kron(np.diag(counts), flat.T @ flat / (n * t))
    flat_x = x.reshape(-1, WIDTH)
    attend = s * np.kron(np.diag((g.reshape(-1, VOCAB) ** 2).mean(0)), flat_x.T @ flat_x / (n * s))
    for args, expected in (
        ((delta, x, np.zeros_like(g)), lookup),
        ((np.zeros_like(delta), x, g), attend),
    ):
        a, b = _factors.tied_factors(ids, *map(jnp.asarray, args), VOCAB)
        assert_close(t * np.kron(np.diag(a), b), expected, "reduces")


def test_embed_on_floats_raises_naming_the_layer():
    """An nn.Embed called on floats: a ValueError naming its path (Flax's own error does not)."""
    ids, labels = token_batch(8, distinct_counts=False)
    params = init_params(EmbedNet(), ids)
    loss_fn = classifier_loss(EmbedNet())
    floats = ids.astype(F64)
    with pytest.raises(ValueError, match="tokens"):
        ek.find_blocks(loss_fn, params, floats, labels)
    with pytest.raises(ValueError, match="tokens"):
        ek.value_grad_and_stats(loss_fn)(params, floats, labels)


# --- 4. Scale and shift of the norms: g / (s + ε) from per-example gradients ----------------------


class NormNet(nn.Module):
    """LayerNorm, RMSNorm and GroupNorm around a Dense layer (per-example normalisation:
    per-example gradients are those of a batch of one)."""

    @nn.compact
    def __call__(self, x):  # (N, L, 4)
        z = nn.LayerNorm(param_dtype=F64, name="layer_norm")(x)
        z = nn.Dense(6, param_dtype=F64, name="dense")(z)
        z = jnp.tanh(nn.RMSNorm(param_dtype=F64, name="rms_norm")(z))
        return nn.GroupNorm(num_groups=2, param_dtype=F64, name="group_norm")(z)  # logits


NORMS = {"layer_norm": 8, "rms_norm": 6, "group_norm": 12}  # path: number of scalars


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, probe=None):  # (N, L, 4)
        z = nn.Dense(5, param_dtype=F64, name="dense")(x)
        z = nn.BatchNorm(use_running_average=False, param_dtype=F64, name="batch_norm")(z)
        if probe is not None:  # the reference's zero probe on the BatchNorm output
            z = z + probe
        return z  # logits


BATCH_STATS = {"batch_norm": {"mean": jnp.zeros(5, F64), "var": jnp.ones(5, F64)}}


def batch_norm_loss(params, x, y, probe=None):
    logits, _ = BatchNormNet().apply(
        {"params": params, "batch_stats": BATCH_STATS}, x, probe, mutable=["batch_stats"]
    )
    return cross_entropy(logits, y)


@jax.jit
def batch_norm_per_example(params, x, y):
    """BatchNorm's per-example gradients by the formula (not separable through the batch
    statistics): ``x_hat`` normalised by hand with the batch mean and (biased) variance of the
    Dense output, ``delta_n = N dLoss/d(output_n)`` by differentiating the loss with respect to a
    zero probe on the BatchNorm output; ``G_n = Σ_t x_hat δ`` (scale), ``Σ_t δ`` (bias)."""
    n = x.shape[0]
    z = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    mean, var = z.mean(axis=(0, 1)), z.var(axis=(0, 1))
    x_hat = (z - mean) / jnp.sqrt(var + 1e-5)  # nn.BatchNorm's default epsilon
    probe = jnp.zeros(z.shape, z.dtype)
    delta = n * jax.grad(batch_norm_loss, argnums=3)(params, x, y, probe)
    return {"scale": jnp.einsum("nto,nto->no", x_hat, delta), "bias": delta.sum(axis=1)}


def norm_references(per_example_steps: list) -> dict:
    """The expected updates ``g / (s + ε)`` of a diagonal block at each step, from its
    per-example gradients ``G_n`` (``per_example_steps[k]``: a dict of ``(N, ...)`` leaves)."""
    n = next(iter(per_example_steps[0].values())).shape[0]
    grads = [{k: v.mean(axis=0) for k, v in pe.items()} for pe in per_example_steps]
    second = [{k: (v**2).mean(axis=0) for k, v in pe.items()} for pe in per_example_steps]
    names, steps = list(grads[0]), range(len(grads))
    scalings = {
        "ekfac": {name: [s[name] for s in second] for name in names},
        "ekfac-ra": {
            name: kr.debiased_ema([n * g[name] ** 2 for g in grads], SCALING_DECAY)
            for name in names
        },
        "kfac": {name: kr.debiased_ema([s[name] for s in second], KFAC_DECAY) for name in names},
    }
    return {
        method: [
            {name: grads[k][name] / (scalings[method][name][k] + DAMPING) for name in names}
            for k in steps
        ]
        for method in METHODS
    }


def run_steps(loss_fn, params, batches, **kwargs):
    """The updates of 3 steps of the three methods (params fixed), and the blocks."""
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    step = stepper(loss_fn, transforms(blocks, **kwargs))
    states, out = None, []
    for batch in batches:
        updates, states, _, _ = step(params, states, *batch)
        out.append(updates)
    return blocks, out, states


def test_norm_scale_and_shift_per_example():
    """LayerNorm, RMSNorm, GroupNorm: 3 steps (params fixed, 3 batches); EKFAC ``s = mean_n
    G_n²`` of the batch, EKFAC-ra the debiased EMA (``scaling_decay``) of ``N g²``, KFAC the
    debiased EMA (``factor_decay=0.6``) of ``mean_n G_n²``; update ``g / (s + ε)``, with
    ``G_n`` from ``jax.vmap(jax.grad(...))``."""
    batches = [normal_batch(10 + k, (8, 3, 4), (8, 3), classes=6) for k in range(3)]
    params = init_params(NormNet(), batches[0][0])
    loss_fn = classifier_loss(NormNet())
    blocks, updates, _ = run_steps(loss_fn, params, batches, kfac_decay=KFAC_DECAY)
    per_example = jax.jit(ref.per_example_grads, static_argnums=0)
    grads = [per_example(loss_fn, params, *batch) for batch in batches]
    for path in NORMS:
        expected = norm_references([{k: np.asarray(v) for k, v in g[path].items()} for g in grads])
        for method in METHODS:
            for k in range(3):
                for name, value in expected[method][k].items():
                    assert_close(updates[k][method][path][name], value, (method, k, path, name))
        # Not vacuous: batch, running and averaged scalings differ at step 2.
        scale = expected["ekfac"][2]["scale"]
        assert ref.relative_error(expected["ekfac-ra"][2]["scale"], scale) > 1e-3
        assert ref.relative_error(expected["kfac"][2]["scale"], scale) > 1e-3
    # The blocks (BlockSpec: a diagonal block's d_out is its number of scalars, d_in the
    # number of features of x_hat, i.e. the size of its scale or bias).
    for path, size in NORMS.items():
        spec = blocks[path]
        assert (spec.kind, spec.block) == ("scale_and_shift", "diagonal"), spec
        features = {int(np.prod(shape)) for _, shape in spec.params}
        assert (spec.d_in, spec.d_out) == (features.pop(), size), spec


def test_batch_norm_scale_and_shift():
    """BatchNorm in train mode (mutable batch_stats): as the other norms, with ``G_n`` from the
    formula ``Σ_t x_hat δ`` / ``Σ_t δ`` (``batch_norm_per_example``), which the test first checks
    against the minibatch gradient (``mean_n G_n = g``)."""
    batches = [normal_batch(20 + k, (8, 3, 4), (8, 3), classes=5) for k in range(3)]
    params = init_params(BatchNormNet(), batches[0][0])
    blocks, updates, _ = run_steps(batch_norm_loss, params, batches, kfac_decay=KFAC_DECAY)
    per_example = []
    grad_fn = jax.jit(jax.grad(batch_norm_loss))
    for x, y in batches:
        pe = {k: np.asarray(v) for k, v in batch_norm_per_example(params, x, y).items()}
        g = grad_fn(params, x, y)["batch_norm"]
        for name in pe:  # validates x_hat and delta: their mean is autodiff's gradient
            assert_close(pe[name].mean(axis=0), g[name], name, rtol=1e-12)
        per_example.append(pe)
    expected = norm_references(per_example)
    for method in METHODS:
        for k in range(3):
            for name, value in expected[method][k].items():
                assert_close(updates[k][method]["batch_norm"][name], value, (method, k, name))
    spec = blocks["batch_norm"]
    assert (spec.kind, spec.block) == ("scale_and_shift", "diagonal"), spec
    assert (spec.d_in, spec.d_out) == (5, 10), spec  # 5 features, scale and bias


# --- 5. nn.ConvTranspose: stats = per-example gradients; updates = the dense reference ------------

# (name, features, kernel_size, strides, padding, kernel_dilation, transpose_kernel, use_bias)
CONV_TRANSPOSE = {
    "1d": (
        ("ct_same", 3, (3,), 1, "SAME", 1, False, True),
        ("ct_explicit", 2, (2,), 2, ((1, 0),), 2, True, False),
    ),
    "2d": (
        ("ct_valid", 3, (3, 3), 2, "VALID", 1, True, True),
        ("ct_explicit", 2, (3, 2), 1, ((2, 1), (0, 1)), (2, 1), False, False),
    ),
}
CONV_TRANSPOSE_INPUTS = {"1d": (6, 4, 2), "2d": (6, 3, 3, 2)}


class ConvTransposeNet(nn.Module):
    layers: tuple

    @nn.compact
    def __call__(self, x):
        for name, features, kernel, strides, padding, dilation, transpose, bias in self.layers:
            x = nn.ConvTranspose(
                features,
                kernel,
                strides=strides,
                padding=padding,
                kernel_dilation=dilation,
                transpose_kernel=transpose,
                use_bias=bias,
                param_dtype=F64,
                name=name,
            )(x)
            x = jnp.tanh(x)
        return x.mean(axis=tuple(range(1, x.ndim - 1)))  # logits


def conv_transpose_forward(layers):
    """The hand-written forward pass of ONE example (``reference.Tape``): each layer is a
    linear map of the patches of its stride-dilated, padded input; ``tape`` holds the
    effective kernels (``kinds_reference.effective_kernel``)."""

    def forward(tape, x):
        for name, _, kernel, strides, padding, dilation, _, _ in layers:
            patches = kr.conv_transpose_patches(x, kernel, strides, padding, dilation)
            x = jnp.tanh(tape.linear(name, patches))
        return x.mean(axis=tuple(range(x.ndim - 1)))

    return forward


def to_effective(tree, layers, batched=False) -> dict:
    """A params-like tree with each ConvTranspose kernel in the effective layout."""
    out = dict(tree)
    for name, *_, transpose, _ in layers:
        out[name] = dict(tree[name])
        out[name]["kernel"] = kr.effective_kernel(tree[name]["kernel"], transpose, batched)
    return out


@pytest.fixture(scope="module", params=sorted(CONV_TRANSPOSE))
def conv_transpose_case(request):
    layers = CONV_TRANSPOSE[request.param]
    model = ConvTransposeNet(layers)
    x, y = normal_batch(30, CONV_TRANSPOSE_INPUTS[request.param], (6,), classes=2)
    params = init_params(model, x)
    loss_fn = classifier_loss(model)
    forward = conv_transpose_forward(layers)
    effective = to_effective(params, layers)

    @jax.jit
    def reference(params, effective, x, y):
        return (
            model.apply({"params": params}, x),
            ref.hand_forward(forward, effective, x),
            ref.per_example_grads(loss_fn, params, x, y),
            ref.h_and_delta(forward, ref.softmax_cross_entropy, effective, x, y),
        )

    flax_out, hand_out, per_example, h_delta = reference(params, effective, x, y)
    per_example = to_effective(per_example, layers, batched=True)
    library = first_step(loss_fn, params, x, y)
    return layers, params, (flax_out, hand_out, per_example, h_delta), library


def test_conv_transpose_hand_forward_is_flax(conv_transpose_case):
    """The hand-written forward pass (dilated input, padding rule, effective kernel) computes
    Flax's nn.ConvTranspose model: validates the reference's h and kernel layout."""
    _, _, (flax_out, hand_out, _, _), _ = conv_transpose_case
    # The same products summed in another order: round-off only.
    np.testing.assert_allclose(hand_out, flax_out, rtol=1e-12, atol=1e-13)


def test_conv_transpose_stats_are_per_example_grads(conv_transpose_case):
    """``G_n = Σ_t h_aug δᵀ`` for the reference's h/δ AND for the library's ``stats[path]``
    (``h`` ``(N, T, d_in)`` without the bias column), against ``jax.vmap(jax.grad(...))``.
    The block matrix is ``[K.reshape(-1, c_out); bias]`` of the effective kernel ``K``:
    ``transpose_kernel=False``: ``K = kernel`` (``(*k, c_in, c_out)``, i.e.
    ``kernel.reshape(-1, c_out)``); ``transpose_kernel=True``: the Flax kernel is
    ``(*k, c_out, c_in)`` and ``K = flip(kernel, spatial axes).swapaxes(-1, -2)``."""
    layers, params, (_, _, per_example, h_delta), library = conv_transpose_case
    blocks, _, _, _, stats = library
    for name, features, *_, bias in layers:
        spec = blocks[name]
        assert (spec.kind, spec.block) == ("conv_transpose", "kronecker"), spec
        expected = ref.block_matrix(per_example[name], batched=True)
        h, delta = h_delta[name]
        ours = np.einsum("nti,nto->nio", ref.augment(h, bias), delta)
        assert ref.relative_error(ours, expected) < 1e-12, name  # round-off only
        assert stats[name].h.shape[-1] == expected.shape[1] - bias, name
        assert stats[name].delta.shape[-1] == features, name
        theirs = np.einsum(
            "nti,nto->nio", ref.augment(stats[name].h, bias), np.asarray(stats[name].delta)
        )
        assert ref.relative_error(theirs, expected) < 1e-12, name


def test_conv_transpose_updates_match_dense_reference(conv_transpose_case):
    """EKFAC / EKFAC-ra / KFAC updates of every ConvTranspose against the dense
    reference from the reference's own h/δ and per-example gradients (``T`` = output positions)."""
    layers, _, (_, _, per_example, h_delta), library = conv_transpose_case
    _, updates, _, grads, _ = library
    for name, (h, delta) in h_delta.items():
        layer = ref.layer_reference(per_example[name], h, delta, "bias" in per_example[name])
        expected = kr.kronecker_updates(
            layer.per_example,
            layer.factor_a,
            layer.factor_b,
            layer.positions,
            DAMPING,
            SCALING_DECAY,
        )
        for method in METHODS:
            actual = ref.block_matrix(to_effective(updates[method], layers)[name])
            assert_close(actual, expected[method], (method, name))
        assert ref.relative_error(layer.grad, expected["ekfac"]) > 1e-2, name
    del grads


# --- 6. The fallback: learned positional parameters, a scalar gate --------------------------------


class PositionGate(nn.Module):
    """A learned positional parameter ``(L, d)`` and a scalar gate: in no block."""

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos", nn.initializers.normal(1.0), x.shape[1:], F64)
        gate = self.param("gate", nn.initializers.ones, (), F64)
        return gate * (x + pos)


class FallbackNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, L, 3)
        z = PositionGate(name="position_gate")(x)
        return nn.Dense(3, param_dtype=F64, name="dense")(jnp.tanh(z))


def test_fallback_diagonal_and_identity():
    """3 steps (params fixed): the positional parameter and the gate get ``g / (s + ε)`` with
    ``s`` the debiased EMA of ``N g²`` (decay ``scaling_decay`` for scale_by_ekfac, batch and
    running, ``factor_decay`` for scale_by_kfac); ``fallback="identity"`` passes ``g`` through
    unchanged; ``summarize`` marks them."""
    batches = [normal_batch(40 + k, (8, 4, 3), (8, 4)) for k in range(3)]
    params = init_params(FallbackNet(), batches[0][0])
    loss_fn = classifier_loss(FallbackNet())
    blocks = ek.find_blocks(loss_fn, params, *batches[0])
    assert set(blocks) == {"dense"}
    txs = transforms(blocks, kfac_decay=KFAC_DECAY)
    identity = transforms(blocks, fallback="identity")
    txs.update({f"{key}-identity": identity[key] for key in ("ekfac", "kfac")})
    step = stepper(loss_fn, txs)
    grad_fn = jax.jit(jax.grad(loss_fn))
    states, history = None, []
    for k, batch in enumerate(batches):
        updates, states, _, _ = step(params, states, *batch)
        g = grad_fn(params, *batch)["position_gate"]
        history.append({name: np.asarray(v) for name, v in g.items()})
        for name in ("pos", "gate"):
            expected = {}
            for method, decay in (
                ("ekfac", SCALING_DECAY),
                ("ekfac-ra", SCALING_DECAY),
                ("kfac", KFAC_DECAY),
            ):
                s = kr.debiased_ema([8 * h[name] ** 2 for h in history], decay)[k]  # N = 8
                expected[method] = history[k][name] / (s + DAMPING)
                actual = updates[method]["position_gate"][name]
                assert_close(actual, expected[method], (method, k, name))
                if method != "ekfac-ra":
                    np.testing.assert_array_equal(
                        updates[f"{method}-identity"]["position_gate"][name], history[k][name]
                    )
            if k == 2:  # not vacuous: the two decays and the one-step value differ
                one_step = history[k][name] / (8 * history[k][name] ** 2 + DAMPING)
                assert ref.relative_error(one_step, expected["ekfac"]) > 1e-3
                assert ref.relative_error(expected["kfac"], expected["ekfac"]) > 1e-3
    for method in METHODS:
        assert states[method].fallback["position_gate/pos"].shape == (4, 3)
        assert states[method].fallback["position_gate/gate"].shape == ()
    rows = summary_rows(params, blocks)
    rows_identity = summary_rows(params, blocks, fallback="identity")
    for path in ("position_gate/pos", "position_gate/gate"):
        assert "diagonal fallback" in rows[path], rows[path]
        assert "identity" in rows_identity[path], rows_identity[path]
    for path in ("dense/kernel", "dense/bias"):
        assert "kronecker" in rows[path] and "kronecker" in rows_identity[path]


# --- 7. weight_sharing="reduce" ------------------------------------------------------------------


class ReduceNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # (N, L=3, 3)
        z = jnp.tanh(nn.Dense(4, param_dtype=F64, name="dense")(x))
        z = jnp.tanh(nn.Conv(3, (2,), padding="VALID", param_dtype=F64, name="conv")(z))
        return z.mean(axis=1)  # logits


def reduce_forward(tape, x):
    z = jnp.tanh(tape.dense("dense", x))
    z = jnp.tanh(tape.conv("conv", z, padding="VALID"))
    return z.mean(axis=0)


def test_weight_sharing_reduce():
    """K-FAC-reduce: ``A = mean_n hbar hbarᵀ`` (``hbar_n = mean_t h_aug``), ``B = mean_n dbar
    dbarᵀ`` (``dbar_n = Σ_t δ``); KFAC ``(A ⊗ B + ε I)⁻¹ g`` (no ``T``), EKFAC the dense EKFAC
    Fisher in the eigenbasis of these ``A``, ``B`` with ``s* = mean_n (U_Aᵀ G_n U_B)²``; EKFAC-ra
    restarts from KFAC's eigenvalues ``S_A ⊗ S_B`` (``T = 1``). For a Dense on a sequence and a
    Conv."""
    model = ReduceNet()
    x, y = normal_batch(50, (24, 3, 3), (24,))  # N = 24 > d_in + 1 = 9 (conv): A has full rank
    params = init_params(model, x)
    loss_fn = classifier_loss(model)
    _, updates, _, _, _ = first_step(loss_fn, params, x, y, weight_sharing="reduce")
    per_example, h_delta = jax.jit(
        lambda p, x, y: (
            ref.per_example_grads(loss_fn, p, x, y),
            ref.h_and_delta(reduce_forward, ref.softmax_cross_entropy, p, x, y),
        )
    )(params, x, y)
    for name, (h, delta) in h_delta.items():
        layer = ref.layer_reference(per_example[name], h, delta, True)
        # hbar, dbar against G_n: Σ_t h δᵀ = G_n (validates the reference's h, delta).
        ours = np.einsum("nti,nto->nio", ref.augment(h, True), delta)
        assert ref.relative_error(ours, layer.per_example) < 1e-12
        factor_a, factor_b = kr.reduce_factors(h, delta, True)
        expected = kr.kronecker_updates(
            layer.per_example, factor_a, factor_b, 1, DAMPING, SCALING_DECAY
        )
        for method in METHODS:
            assert_close(ref.block_matrix(updates[method][name]), expected[method], (method, name))
        # Not vacuous: reduce is not expand here.
        expand = kr.kronecker_updates(
            layer.per_example,
            layer.factor_a,
            layer.factor_b,
            layer.positions,
            DAMPING,
            SCALING_DECAY,
        )
        for method in METHODS:
            assert ref.relative_error(expand[method], expected[method]) > 1e-3, (method, name)


# --- 8. A stock Flax transformer -----------------------------------------------------------------


class Transformer(nn.Module):
    vocab: int = 11
    width: int = 8
    length: int = 5

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed")(ids)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.length, self.width))
        h = nn.LayerNorm(name="ln_0")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(
            h, h, mask=nn.make_causal_mask(ids)
        )
        return nn.Dense(self.vocab, name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(x)))


def test_stock_transformer_runs():
    """Embed, a learned positional param, MultiHeadDotProductAttention, LayerNorm, a Dense MLP:
    ``ek.ekfac(1e-2, blocks=ek.find_blocks(...))`` runs 3 jitted steps with finite losses, and
    every parameter is in a block or the diagonal fallback (no "identity" row)."""
    model = Transformer()
    rng = np.random.default_rng(60)
    ids = jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32)
    params = init_params(model, ids)  # float32, the model's param dtype
    loss_fn = classifier_loss(model)
    blocks = ek.find_blocks(loss_fn, params, ids, targets)
    assert blocks["embed"].kind == "embed"
    assert blocks["attention/query"].kind == "dense_general"
    assert blocks["attention/out"].kind == "dense_general"
    assert blocks["ln_0"].kind == "scale_and_shift"
    tx = ek.ekfac(1e-2, blocks=blocks)

    params, _, losses = train(
        train_step(loss_fn, tx), params, tx.init(params), [(ids, targets)] * 3
    )
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
    rows = summary_rows(params, blocks)
    assert not [row for row in rows.values() if "identity" in row], rows


# --- 9. float32 and bfloat16 smoke tests ---------------------------------------------------------


class AllKinds(nn.Module):
    """Every new kind once in one model, computed in ``dtype``, parameters in ``param_dtype``
    (``None``: ``dtype``)."""

    dtype: Any
    param_dtype: Any = None

    @nn.compact
    def __call__(self, ids):  # (N, L=4)
        param_dtype = self.param_dtype or self.dtype
        kw = dict(dtype=self.dtype, param_dtype=param_dtype)
        x = nn.Embed(VOCAB, 8, name="tokens", **kw)(ids)  # (N, L, 8)
        x = x + self.param("pos", nn.initializers.normal(0.1), (4, 8), param_dtype)  # fallback
        x = nn.LayerNorm(name="layer_norm", **kw)(x)
        x = nn.Conv(8, (3,), feature_group_count=2, name="grouped", **kw)(x)
        x = nn.ConvTranspose(4, (3,), strides=2, name="conv_transpose", **kw)(jnp.tanh(x))
        # (2L, N, 4) with batch_dims=(0,): the example axis is axis 1.
        x = jnp.tanh(x).transpose(1, 0, 2)
        return nn.DenseGeneral(3, batch_dims=(0,), name="stacked", **kw)(x).mean(axis=0)


@pytest.mark.parametrize(
    "dtype, param_dtype, cap",
    [
        (jnp.float32, None, None),
        (jnp.bfloat16, None, None),
        (jnp.bfloat16, jnp.float32, None),
        (jnp.float32, None, 3),
    ],
    ids=["float32", "bfloat16", "bfloat16_compute", "float32_capped"],
)
def test_dtype_smoke(dtype, param_dtype, cap):
    """One jitted step of each method on every new kind: finite updates of the params' dtype,
    the step applied (not skipped as non-finite, which would return zeros), the curvature in
    float32 (bfloat16 parameters, or float32 parameters with bfloat16 compute: bfloat16 ``h``
    and ``delta``). With ``max_factor_dim=3`` every kind's sides above 3 keep their diagonal
    (vectors in the state)."""
    model = AllKinds(dtype, param_dtype)
    param_dtype = param_dtype or dtype
    rng = np.random.default_rng(70)
    ids = jnp.asarray(rng.integers(0, VOCAB, (8, 4)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 3, (8,)), jnp.int32)
    params = init_params(model, ids)  # in param_dtype

    def loss_fn(params, ids, labels):
        return cross_entropy(model.apply({"params": params}, ids).astype(jnp.float32), labels)

    blocks, updates, states, _, stats = first_step(
        loss_fn, params, ids, labels, damping=1e-2, max_factor_dim=cap
    )
    assert stats["grouped"].h.dtype == dtype and stats["grouped"].delta.dtype == dtype
    kinds = {path: spec.kind for path, spec in blocks.items()}
    assert kinds == {
        "tokens": "embed",
        "layer_norm": "scale_and_shift",
        "grouped": "conv",
        "conv_transpose": "conv_transpose",
        "stacked": "dense_general",
    }, kinds
    assert blocks["stacked"].stack == (8,) and blocks["grouped"].stack == (2,)
    for method in METHODS:
        assert int(states[method].skipped) == 0, method
        curvature = {leaf.dtype for leaf in jax.tree.leaves(states[method].blocks)}
        assert curvature == {jnp.dtype(jnp.float32)}, (method, curvature)
        for path, spec in blocks.items():
            block = states[method].blocks[path]
            if spec.block != "diagonal" and cap is not None:
                assert block.factor_b.ndim == len(spec.stack) + (1 if spec.d_out > cap else 2)
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates[method]):
            assert leaf.dtype == param_dtype, (method, path, leaf.dtype)
            assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (method, path)
            assert np.any(np.asarray(leaf, np.float32) != 0), (method, path)
