"""EKFAC, EKFAC-ra and KFAC as optax gradient transformations.

Per Kronecker block (see ``_layers``) with ``h_aug = [h; 1]`` and output
gradients ``delta``, the per-example gradient is
``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ`` and the update is
``U_A [(U_Aᵀ g U_B) / (s + damping)] U_Bᵀ`` where ``U_A``, ``U_B`` are the
eigenvectors of ``A = E[h_aug h_augᵀ]`` and ``B = E[delta deltaᵀ]`` (the
Kronecker-factored eigenbasis, KFE) and ``s`` the scalings (``_scalings``).

References:
  George, Laurent, Bouthillier, Ballas, Vincent. Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis. NeurIPS 2018.
  https://arxiv.org/abs/1806.03884
  Martens & Grosse. Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature. ICML 2015. https://arxiv.org/abs/1503.05671
  Grosse & Martens. A Kronecker-factored approximate Fisher matrix for
  convolution layers. ICML 2016. https://arxiv.org/abs/1602.01407
"""

import functools
import numbers
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ekfac_optax import _eigenbasis, _factors, _layers, _scalings, _validation

Scaling = Literal["batch", "running", "kfac"]
ScalarOrSchedule = jax.typing.ArrayLike | optax.Schedule


class BlockState(NamedTuple):
    """Curvature of one Kronecker block; ``a = d_in (+1 with bias)``, ``b = d_out``.

    Attributes:
      factor_a: ``(a, a)`` moving average of ``A = E[h_aug h_augᵀ]``.
      factor_b: ``(b, b)`` moving average of ``B = E[delta deltaᵀ]``.
      eigvals_a: ``(a,)`` eigenvalues ``S_A`` of ``factor_a`` at the last basis update.
      basis_a: ``(a, a)`` eigenvectors ``U_A`` (columns).
      eigvals_b: ``(b,)`` eigenvalues ``S_B`` of ``factor_b``.
      basis_b: ``(b, b)`` eigenvectors ``U_B`` (columns).
      scalings: ``(a, b)`` the scalings ``s`` of the last update, in the KFE.
    """

    factor_a: jax.Array
    factor_b: jax.Array
    eigvals_a: jax.Array
    basis_a: jax.Array
    eigvals_b: jax.Array
    basis_b: jax.Array
    scalings: jax.Array


class ScaleByEkfacState(NamedTuple):
    """State of :func:`scale_by_ekfac` and :func:`scale_by_kfac`.

    Attributes:
      count: ``()`` int32, number of updates applied so far (skipped ones excluded).
      skipped: ``()`` int32, number of updates skipped for non-finite numbers.
      blocks: one :class:`BlockState` per Kronecker block, keyed by module path.
    """

    count: jax.Array
    skipped: jax.Array
    blocks: dict[str, BlockState]


def _all_finite(tree: Any) -> jax.Array:
    """Whether every number in ``tree`` is finite, as a ``()`` bool."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _init_block(spec: _layers.BlockSpec) -> BlockState:
    a, b, dtype = spec.d_in_aug, spec.d_out, spec.dtype
    return BlockState(
        factor_a=jnp.zeros((a, a), dtype),
        factor_b=jnp.zeros((b, b), dtype),
        eigvals_a=jnp.zeros((a,), dtype),
        basis_a=jnp.eye(a, dtype=dtype),
        eigvals_b=jnp.zeros((b,), dtype),
        basis_b=jnp.eye(b, dtype=dtype),
        scalings=jnp.zeros((a, b), dtype),
    )


def _scale_by_kfe(
    damping: ScalarOrSchedule,
    basis_update_every: jax.typing.ArrayLike,
    factor_decay: jax.typing.ArrayLike,
    scaling: Scaling,
    scaling_decay: jax.typing.ArrayLike,
    damping_mode: _scalings.DampingMode,
    layers: Sequence[str] | None,
    mesh: Mesh | None,
) -> optax.GradientTransformationExtraArgs:
    """The shared machinery of :func:`scale_by_ekfac` and :func:`scale_by_kfac`."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    _validation.check_hyperparameters(damping, basis_update_every, factor_decay, scaling_decay)
    if scaling not in ("batch", "running", "kfac"):
        raise ValueError(f"scaling must be 'batch' or 'running', got {scaling!r}")
    if damping_mode not in ("tikhonov", "factored"):
        raise ValueError(f"damping_mode must be 'tikhonov' or 'factored', got {damping_mode!r}")
    layers = _layers.layer_paths(layers)

    def init_fn(params):
        blocks = _layers.find_blocks(params, layers)
        return ScaleByEkfacState(
            count=jnp.zeros([], jnp.int32),
            skipped=jnp.zeros([], jnp.int32),
            blocks={path: _init_block(spec) for path, spec in blocks.items()},
        )

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
        del params, extra_args
        specs = _validation.block_specs(updates, state.blocks, layers)
        _validation.check_stats(stats, specs)
        count = state.count
        damping_now = damping(count) if callable(damping) else damping

        # Statistics of this batch, in the curvature dtype.
        h = {path: stats[path].h.astype(spec.dtype) for path, spec in specs.items()}
        delta = {path: stats[path].delta.astype(spec.dtype) for path, spec in specs.items()}

        def with_factors(blocks):
            return {
                path: block._replace(
                    factor_a=_factors.debiased_ema(
                        block.factor_a,
                        _factors.factor_a(h[path], specs[path].has_bias),
                        factor_decay,
                        count,
                    ),
                    factor_b=_factors.debiased_ema(
                        block.factor_b, _factors.factor_b(delta[path]), factor_decay, count
                    ),
                )
                for path, block in blocks.items()
            }

        # With one-batch factors (factor_decay=0) only the basis updates need them.
        one_batch = isinstance(factor_decay, numbers.Real) and factor_decay == 0
        blocks = dict(state.blocks) if one_batch else with_factors(state.blocks)

        # Amortized: the eigenbasis on updates 0, n, 2n, ...
        def new_basis(blocks):
            blocks = with_factors(blocks) if one_batch else blocks
            paths = list(blocks)
            decomposed = _eigenbasis.eigh_all(
                [f for p in paths for f in (blocks[p].factor_a, blocks[p].factor_b)],
                [
                    pair
                    for p in paths
                    for pair in (
                        (blocks[p].eigvals_a, blocks[p].basis_a),
                        (blocks[p].eigvals_b, blocks[p].basis_b),
                    )
                ],
                mesh,
            )
            out = {}
            for i, path in enumerate(paths):
                (eigvals_a, basis_a), (eigvals_b, basis_b) = decomposed[2 * i : 2 * i + 2]
                # EKFAC-ra restarts its average from KFAC's eigenvalues.
                positions = h[path].shape[1]
                out[path] = blocks[path]._replace(
                    eigvals_a=eigvals_a,
                    basis_a=basis_a,
                    eigvals_b=eigvals_b,
                    basis_b=basis_b,
                    scalings=_scalings.kfac_scalings(eigvals_a, eigvals_b, positions),
                )
            return out

        if isinstance(basis_update_every, numbers.Integral) and basis_update_every == 1:
            blocks = new_basis(blocks)
        else:
            blocks = jax.lax.cond(count % basis_update_every == 0, new_basis, lambda b: b, blocks)

        new_updates = {}
        for path, spec in specs.items():
            block = blocks[path]
            n, positions = h[path].shape[:2]
            grad_kfe = _eigenbasis.to_eigenbasis(
                _layers.to_matrix(_layers.subtree(updates, path), spec),
                block.basis_a,
                block.basis_b,
            )
            if scaling == "batch":
                scalings = _scalings.batch_scalings(
                    _eigenbasis.inputs_to_eigenbasis(h[path], block.basis_a, spec.has_bias),
                    delta[path] @ block.basis_b,
                )
            elif scaling == "running":
                scalings = _scalings.running_scalings(block.scalings, grad_kfe, n, scaling_decay)
            else:
                scalings = _scalings.kfac_scalings(block.eigvals_a, block.eigvals_b, positions)
            denominator = _scalings.damped(
                scalings, damping_now, block.eigvals_a, block.eigvals_b, positions, damping_mode
            )
            preconditioned = _eigenbasis.from_eigenbasis(
                _scalings.divide(grad_kfe, denominator, damping_now), block.basis_a, block.basis_b
            )
            new_updates[path] = _layers.from_matrix(
                preconditioned, _layers.subtree(updates, path), spec
            )
            blocks[path] = block._replace(scalings=scalings)

        # A step with a non-finite input or result changes nothing but `skipped`.
        finite = _all_finite((updates, h, delta, new_updates, blocks))
        applied = ScaleByEkfacState(
            count=optax.safe_increment(count), skipped=state.skipped, blocks=blocks
        )
        rejected = state._replace(skipped=optax.safe_increment(state.skipped))
        new_state = jax.tree.map(functools.partial(jnp.where, finite), applied, rejected)
        updates = jax.tree.map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
            _layers.replace_blocks(updates, new_updates),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_ekfac(
    *,
    damping: ScalarOrSchedule = 1e-3,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    scaling: Literal["batch", "running"] = "batch",
    scaling_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    layers: Sequence[str] | None = None,
    mesh: Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with EKFAC: a diagonal scaling in the Kronecker-factored eigenbasis.

    For each Kronecker block (an ``nn.Dense``/``nn.Conv`` kernel with its
    bias, ``g`` the ``(d_in + 1, d_out)`` matrix of the incoming update):

    .. math::
      U_A \left[ (U_A^\top g U_B) \oslash (s + \epsilon) \right] U_B^\top

    with ``U_A``, ``U_B`` the eigenvectors of the factors ``A = E[h_aug h_augᵀ]``
    and ``B = E[delta deltaᵀ]`` (means over examples and positions, debiased
    moving averages with ``factor_decay``; ``0`` uses the current batch alone),
    recomputed on updates ``0, n, 2n, ...`` for ``n = basis_update_every``.
    The scalings ``s`` are re-estimated every update:

    - ``scaling="batch"`` (Algorithm 1): ``s = mean_n (U_Aᵀ G_n U_B)²`` from
      the per-example gradients ``G_n = Σ_t h_aug_{n,t} delta_{n,t}ᵀ`` of the
      current batch (``stats``).
    - ``scaling="running"`` (EKFAC-ra): ``s ← d s + (1 - d) N (U_Aᵀ g U_B)²``
      with ``d = scaling_decay``, ``N`` the batch size and ``g`` the incoming
      update (the minibatch gradient when this is first in the chain). The
      factor ``N`` makes ``s`` estimate the same per-example second moment as
      ``"batch"``, so ``damping`` means the same in both. At each basis change
      ``s`` restarts from KFAC's ``T S_A ⊗ S_B``.

    Parameters that are not in a block (LayerNorm, Embed, ...) pass through
    unchanged; :func:`ekfac_optax.summarize` lists what is preconditioned.

    Non-finite numbers never enter the state: an update whose incoming
    gradient, ``stats`` or result holds a NaN or Inf returns zeros and leaves
    the state as it was, except ``skipped`` which counts such updates (and
    ``count``, which counts applied updates only, does not move). A failed
    ``eigh`` keeps that factor's previous eigenbasis.

    Args:
      damping: ``ε >= 0`` added to the scalings, a float or an optax schedule of
        the update count. ``ε = 0`` gives the pseudo-inverse: directions whose
        scaling is 0 up to round-off (relative ``max(a, b) · eps``) get no step.
      basis_update_every: recompute the eigenbasis every this many updates.
      factor_decay: decay of the moving averages of ``A`` and ``B``, in ``[0, 1)``.
      scaling: ``"batch"`` (EKFAC) or ``"running"`` (EKFAC-ra).
      scaling_decay: decay of the running average for ``scaling="running"``.
      damping_mode: ``"tikhonov"`` (``s + ε``) or ``"factored"``
        (``s + ε + √ε (T S_A ⊕ S_B)``, the paper's Appendix C).
      layers: module paths of the blocks; ``None`` takes every ``kernel`` of
        the params with at least two axes (with its sibling ``bias``).
      mesh: a ``jax.sharding.Mesh`` over whose devices the eigendecompositions
        are spread: each factor is decomposed on one device and the results are
        all-gathered. ``None``: every device decomposes every factor. Data
        parallelism needs no argument: jit the train step with the batch sharded
        and XLA reduces the gradients, factors and scalings across devices.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      the keyword-only argument ``stats`` from
      :func:`ekfac_optax.value_grad_and_stats`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Dense(3)
      >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> tx = optax.chain(ek.scale_by_ekfac(damping=1e-3), optax.scale_by_learning_rate(0.1))
      >>> state = tx.init(params)
      >>> loss, grads, stats = ek.value_grad_and_stats(loss_fn)(params, x, y)
      >>> updates, state = tx.update(grads, state, params, stats=stats)

    References:
      George et al., Fast Approximate Natural Gradient Descent in a
      Kronecker-factored Eigenbasis, NeurIPS 2018 (Algorithm 1, Appendix C).
    """
    if scaling not in ("batch", "running"):
        raise ValueError(f"scaling must be 'batch' or 'running', got {scaling!r}")
    return _scale_by_kfe(
        damping,
        basis_update_every,
        factor_decay,
        scaling,
        scaling_decay,
        damping_mode,
        layers,
        mesh,
    )


def scale_by_kfac(
    *,
    damping: ScalarOrSchedule = 1e-3,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    layers: Sequence[str] | None = None,
    mesh: Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions with KFAC, computed in the same eigenbasis machinery.

    Per block, ``(T A ⊗ B + ε I)⁻¹ g`` (``"tikhonov"``) or
    ``((T A + √ε I) ⊗ (B + √ε I))⁻¹ g`` (``"factored"``), i.e. the scalings
    are KFAC's eigenvalues ``T S_A ⊗ S_B`` in the KFE, where ``T`` is the
    number of positions per example (1 for dense layers; the KFC scaling of
    Grosse & Martens for conv layers and shared weights). ``A``, ``B`` and
    their eigendecomposition follow :func:`scale_by_ekfac`; the inverse is
    refreshed every ``basis_update_every`` updates.

    Args:
      damping: ``ε``, a float or an optax schedule of the update count.
      basis_update_every: recompute the eigendecomposition every this many updates.
      factor_decay: decay of the moving averages of ``A`` and ``B``, in ``[0, 1)``.
      damping_mode: ``"tikhonov"`` or ``"factored"``.
      layers: module paths of the blocks; ``None`` infers them from the params.
      mesh: devices to spread the eigendecompositions over; see
        :func:`scale_by_ekfac`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
      the keyword-only argument ``stats``.

    References:
      Martens & Grosse, Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature, ICML 2015; Grosse & Martens, A Kronecker-factored
      approximate Fisher matrix for convolution layers, ICML 2016.
    """
    return _scale_by_kfe(
        damping, basis_update_every, factor_decay, "kfac", 0.0, damping_mode, layers, mesh
    )
