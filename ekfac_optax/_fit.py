"""A one-shot fit of the curvature of a trained model over a dataset, without training.

As kronfluence's ``fit_all_factors``: the factors averaged over the whole dataset, their
eigenbasis computed once, then EKFAC's eigenvalue correction ``s* = E[(U_Aᵀ G_n U_B)²]``
re-estimated over the dataset in that basis (George et al.'s Algorithm 1 with the dataset as
one batch). The accumulation is :func:`multi_steps`' (the dataset's batches as micro-batches,
weighted by their examples), the rest the preconditioners' own stages.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from ekfac_optax._accumulate import multi_steps
from ekfac_optax._influence import per_example_grads
from ekfac_optax._operator import Curvature, curvature
from ekfac_optax.capture import _capture, _fisher
from ekfac_optax.curvature import _factors
from ekfac_optax.kinds import _blocks
from ekfac_optax.update import _transform

Method = Literal["ekfac", "kfac"]


def fit_curvature(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    batches: Sequence[tuple[Any, ...]],
    blocks: Mapping[str, _blocks.BlockSpec],
    *,
    method: Method = "ekfac",
    fisher: _fisher.TrueFisher | None = None,
    key: jax.Array | None = None,
    weight_sharing: _factors.WeightSharing = "expand",
    max_factor_dim: int | None = None,
) -> Curvature:
    r"""The EKFAC (or KFAC) curvature of ``params`` over a dataset, fitted once.

    Pass 1 averages the factors ``A = E[h_aug h_augᵀ]`` and ``B = E[δ δᵀ]`` over every example of
    ``batches`` and computes their eigenbases; pass 2 (EKFAC) averages the per-example
    ``s* = (U_Aᵀ G_n U_B)²`` over every example in that basis, so that

    .. math::
      \hat F = (U_A \otimes U_B)\, \mathrm{diag}(\mathrm{vec}\, \mathbb{E}_n[s^*_n])\,
      (U_A \otimes U_B)^\top

    per Kronecker block (KFAC: ``T A ⊗ B`` after pass 1). Diagonal blocks (normalisations) get
    the mean of their exact per-example squared gradients, and so do the parameters in no block
    (the fallback's diagonal; one more pass, of per-example gradients, ``256`` examples at a
    time; with the empirical Fisher only: a ``TrueFisher`` needs every parameter in a block).

    Args:
      loss_fn: ``(params, *batch) -> ()`` the MEAN loss of a batch (as for
        :func:`value_grad_and_stats`); its labels give the empirical Fisher.
      params: the trained parameters (or an NNX model, then ``loss_fn(model, *batch)``).
      batches: the dataset as a sequence of batches (tuples of arrays with a leading axis,
        sizes may differ; each is read once per pass).
      blocks: ``ek.find_blocks(loss_fn, params, *batches[0])``, or a subset.
      method: ``"ekfac"`` (eigenvalue-corrected, two passes) or ``"kfac"`` (one pass).
      fisher: ``None``: the empirical Fisher of ``loss_fn``'s labels; an
        :class:`ekfac_optax.TrueFisher`: the true Fisher, labels drawn from the model's
        predictive distribution (or enumerated, ``samples="exact"``).
      key: the ``jax.random`` key of the draws (with a sampling ``fisher``): batch ``i`` of pass
        ``p`` draws with ``fold_in(key, p · len(batches) + i)``, so a fit is reproducible.
      weight_sharing: as :func:`scale_by_ekfac`.
      max_factor_dim: as :func:`scale_by_ekfac` (a larger side keeps its diagonal).

    Returns:
      A :class:`Curvature` (see :func:`curvature`).

    Raises:
      ValueError: no batches, an unknown ``method``, a sampling ``fisher`` without ``key``, a
        ``fisher`` with parameters in no block.

    Examples:
      Two batches give the curvature of their union; the true Fisher enumerates the labels.

      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> classifier = nn.Dense(3)
      >>> x, y = jax.random.normal(jax.random.key(1), (8, 4)), jnp.arange(8) % 3
      >>> params = classifier.init(jax.random.key(0), x)["params"]
      >>> def predict(params, x, y):
      ...     return classifier.apply({"params": params}, x)
      >>> def loss_fn(params, x, y):
      ...     logits = predict(params, x, y)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> blocks = ek.find_blocks(loss_fn, params, x, y)
      >>> halves = [(x[:5], y[:5]), (x[5:], y[5:])]
      >>> op = ek.fit_curvature(loss_fn, params, halves, blocks)
      >>> whole = ek.fit_curvature(loss_fn, params, [(x, y)], blocks)
      >>> bool(jnp.allclose(op.trace(), whole.trace()))
      True
      >>> fisher = ek.TrueFisher(predict, "categorical", samples="exact")
      >>> true = ek.fit_curvature(loss_fn, params, halves, blocks, fisher=fisher)
      >>> bool(true.trace() > 0)
      True
    """
    batches = list(batches)
    if not batches:
        raise ValueError("fit_curvature: batches is empty")
    if method not in ("ekfac", "kfac"):
        raise ValueError(f"fit_curvature: method must be 'ekfac' or 'kfac', got {method!r}")
    if fisher is not None and not isinstance(fisher, _fisher.TrueFisher):
        raise TypeError(f"fit_curvature: fisher must be None or an ek.TrueFisher, got {fisher!r}")
    if fisher is not None and fisher.samples != "exact" and key is None:
        raise ValueError("fit_curvature: a TrueFisher that samples needs key=jax.random.key(...)")
    outside = _blocks.fallback_leaves(_blocks.as_arrays(params), blocks)
    if fisher is not None and outside:
        raise ValueError(
            "fit_curvature: with a TrueFisher every parameter needs a block; "
            f"{sorted(outside)[:5]} are in none (their diagonal would need per-example gradients "
            "of the drawn labels)"
        )
    options = dict(
        blocks=blocks,
        factor_decay=0.0,  # the accumulated mean of the pass, not a moving average
        basis_update_every=2,  # the basis of pass 1, kept by pass 2
        weight_sharing=weight_sharing,
        max_factor_dim=max_factor_dim,
    )
    if method == "ekfac":
        inner, passes = _transform.scale_by_ekfac(scaling="batch", **options), 2
    else:
        inner, passes = _transform.scale_by_kfac(**options), 1
    tx = multi_steps(inner, len(batches))
    layers = list(blocks)
    if fisher is None:
        capture = _capture.value_grad_and_stats(loss_fn, layers=layers)

        def statistics(params, key, *batch):
            del key
            return capture(params, *batch)
    else:
        repeats = fisher.repeats(params, *batches[0])
        capture = _capture.value_grad_and_stats(
            functools.partial(fisher.loss, repeats=repeats), layers=layers
        )

        def statistics(params, key, *batch):
            return capture(params, key, *batch)

    arrays = _blocks.as_arrays(params)  # an NNX model's nnx.Param state; linen params as they are

    @jax.jit
    def step(params, state, key, *batch):
        _, grads, stats = statistics(params, key, *batch)
        return tx.update(_blocks.as_arrays(grads), state, arrays, stats=stats)[1]

    state = tx.init(arrays)
    for p in range(passes):
        for i, batch in enumerate(batches):
            sub = None if key is None else jax.random.fold_in(key, p * len(batches) + i)
            state = step(params, state, sub, *batch)
    op = curvature(state, params, blocks, max_factor_dim)
    return op._with_fallback(_fallback_moments(loss_fn, params, batches, blocks)) if outside else op


def _fallback_moments(loss_fn, params, batches, blocks) -> dict[str, jax.Array]:
    """Per parameter in no block, the mean over the batches' examples of its squared
    per-example gradient."""

    @jax.jit
    def sums(params, *batch):
        grads = per_example_grads(loss_fn, params, *batch, chunk_size=256)
        leaves = _blocks.fallback_leaves(_blocks.as_arrays(grads), blocks)
        return {path: jnp.sum(g**2, axis=0) for path, g in leaves.items()}, len(batch[0])

    totals, n = None, 0
    for batch in batches:
        part, size = sums(params, *batch)
        totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
        n += size
    return {path: total / n for path, total in totals.items()}
