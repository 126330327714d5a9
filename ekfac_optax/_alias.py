"""Aliases: each preconditioner chained with ``optax.scale_by_learning_rate``."""

from collections.abc import Mapping
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from ekfac_optax._graft import graft as _graft
from ekfac_optax._norm_constraint import clip_by_fisher_norm
from ekfac_optax.curvature import _factors, _scalings
from ekfac_optax.kinds import _blocks
from ekfac_optax.update import _docstrings
from ekfac_optax.update._transform import (
    Fallback,
    ScalarOrSchedule,
    scale_by_ekfac,
    scale_by_kfac,
    scale_by_kfe_adam,
)


@_docstrings.inherit_arguments(scale_by_ekfac)
def ekfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    embedding_damping: ScalarOrSchedule | None = None,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    scaling: _scalings.ScalingName = "batch",
    scaling_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
    graft: optax.GradientTransformation | None = None,
    norm_constraint: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC: :func:`scale_by_ekfac` then ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      {inherited arguments}
      graft: a transformation whose per-parameter update norms EKFAC's directions take
        (:func:`graft`), e.g. ``optax.scale_by_adam()``: the learning rate is then on that
        transformation's scale. ``None`` (default): EKFAC's own norms.
      norm_constraint: bound each step's squared norm in EKFAC's curvature, ``η² gᵀF̂⁻¹g``, by
        this (:func:`clip_by_fisher_norm`; kfac-jax's ``norm_constraint``), e.g. ``1e-3``; not
        with ``graft``. ``None`` (default): unbounded.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` to ``update``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Dense(2)
      >>> x = jnp.arange(24.0).reshape(8, 3) / 24
      >>> y = 2 * x[:, :2] - 1
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def mse(params, x, y):
      ...     return jnp.mean((model.apply({"params": params}, x) - y) ** 2)
      >>> tx = ek.ekfac(0.03, blocks=ek.find_blocks(mse, params, x, y))
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def train_step(params, state):
      ...     loss, grads, stats = ek.value_grad_and_stats(mse)(params, x, y)
      ...     updates, state = tx.update(grads, state, params, stats=stats)
      ...     return optax.apply_updates(params, updates), state, loss
      >>> losses = [float(train_step(params, state)[2])]
      >>> for _ in range(20):
      ...     params, state, loss = train_step(params, state)
      >>> print(f"{losses[0]:.2f} -> {float(loss):.2f}")
      0.37 -> 0.12
    """
    return _scaled(
        scale_by_ekfac(
            blocks=blocks,
            damping=damping,
            embedding_damping=embedding_damping,
            basis_update_every=basis_update_every,
            factor_decay=factor_decay,
            factor_update_every=factor_update_every,
            scaling=scaling,
            scaling_decay=scaling_decay,
            damping_mode=damping_mode,
            weight_sharing=weight_sharing,
            fallback=fallback,
            mesh=mesh,
            max_factor_dim=max_factor_dim,
            stack_blocks=stack_blocks,
        ),
        graft,
        learning_rate,
        norm_constraint,
    )


@_docstrings.inherit_arguments(scale_by_ekfac)
def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    embedding_damping: ScalarOrSchedule | None = None,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
    graft: optax.GradientTransformation | None = None,
    norm_constraint: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """KFAC: :func:`scale_by_kfac` then ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      {inherited arguments}
      graft: a transformation whose per-parameter update norms KFAC's directions take
        (:func:`graft`), e.g. ``optax.scale_by_adam()``. ``None`` (default): KFAC's own norms.
      norm_constraint: bound each step's squared norm in KFAC's curvature, ``η² gᵀF̂⁻¹g``, by
        this (:func:`clip_by_fisher_norm`; kfac-jax's ``norm_constraint``), e.g. ``1e-3``; not
        with ``graft``. ``None`` (default): unbounded.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` to ``update``.

    Examples:
      Without blocks every parameter gets the fallback (here a one-parameter "model"):

      >>> import jax.numpy as jnp
      >>> import ekfac_optax as ek
      >>> tx = ek.kfac(1e-3, blocks={})
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -2.0])}, state, params, stats={})
      >>> print(updates["w"])
      [-0.00199203  0.00049988]
    """
    return _scaled(
        scale_by_kfac(
            blocks=blocks,
            damping=damping,
            embedding_damping=embedding_damping,
            basis_update_every=basis_update_every,
            factor_decay=factor_decay,
            factor_update_every=factor_update_every,
            damping_mode=damping_mode,
            weight_sharing=weight_sharing,
            fallback=fallback,
            mesh=mesh,
            max_factor_dim=max_factor_dim,
            stack_blocks=stack_blocks,
        ),
        graft,
        learning_rate,
        norm_constraint,
    )


def _scaled(
    direction: optax.GradientTransformation,
    graft: optax.GradientTransformation | None,
    learning_rate: optax.ScalarOrSchedule,
    norm_constraint: jax.typing.ArrayLike | None,
) -> optax.GradientTransformationExtraArgs:
    """``direction`` (grafted onto ``graft``'s norms, or its steps' curvature norm bounded by
    ``norm_constraint``, if given), then the learning rate."""
    if graft is not None and norm_constraint is not None:
        raise ValueError(
            "graft and norm_constraint exclude each other: graft sets each parameter's update "
            "norm to its transformation's, norm_constraint bounds the preconditioner's own step"
        )
    if graft is not None:
        direction = _graft(graft, direction)
    if norm_constraint is not None:
        direction = clip_by_fisher_norm(direction, learning_rate, norm_constraint)
    return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))


@_docstrings.inherit_arguments(scale_by_kfe_adam)
def kfe_adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """KFE-Adam: :func:`scale_by_kfe_adam` then ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      {inherited arguments}

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` to ``update``.

    Examples:
      A parameter in no block gets plain Adam, as ``optax.adam(1e-3)``:

      >>> import jax.numpy as jnp, optax
      >>> import ekfac_optax as ek
      >>> params, grads = {"w": jnp.ones(2)}, {"w": jnp.array([0.5, -2.0])}
      >>> ours, peer = ek.kfe_adam(1e-3, blocks={}), optax.adam(1e-3)
      >>> mine, _ = ours.update(grads, ours.init(params), params, stats={})
      >>> theirs, _ = peer.update(grads, peer.init(params), params)
      >>> bool(jnp.allclose(mine["w"], theirs["w"]))
      True
    """
    return kfe_adamw(
        learning_rate,
        blocks=blocks,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=0.0,
        basis_update_every=basis_update_every,
        factor_decay=factor_decay,
        factor_update_every=factor_update_every,
        weight_sharing=weight_sharing,
        fallback=fallback,
        mesh=mesh,
        max_factor_dim=max_factor_dim,
        stack_blocks=stack_blocks,
    )


@_docstrings.inherit_arguments(scale_by_kfe_adam)
def kfe_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """KFE-Adam with decoupled weight decay, as ``optax.adamw``: :func:`scale_by_kfe_adam`,
    ``optax.add_decayed_weights(weight_decay, mask)``, ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      weight_decay: the decoupled weight decay (``optax.adamw``'s default, 1e-4).
      mask: which parameters decay (``optax.add_decayed_weights``'s ``mask``).
      {inherited arguments}

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` and ``params`` to
      ``update``.

    Examples:
      A parameter in no block gets plain AdamW, as ``optax.adamw(1e-3, weight_decay=0.1)``:

      >>> import jax.numpy as jnp, optax
      >>> import ekfac_optax as ek
      >>> params, grads = {"w": jnp.ones(2)}, {"w": jnp.array([0.5, -2.0])}
      >>> ours = ek.kfe_adamw(1e-3, blocks={}, weight_decay=0.1)
      >>> peer = optax.adamw(1e-3, weight_decay=0.1)
      >>> mine, _ = ours.update(grads, ours.init(params), params, stats={})
      >>> theirs, _ = peer.update(grads, peer.init(params), params)
      >>> bool(jnp.allclose(mine["w"], theirs["w"]))
      True
    """
    decay = (
        []
        if isinstance(weight_decay, float) and weight_decay == 0.0
        else [optax.add_decayed_weights(weight_decay, mask)]
    )
    return optax.chain(
        scale_by_kfe_adam(
            blocks=blocks,
            b1=b1,
            b2=b2,
            eps=eps,
            basis_update_every=basis_update_every,
            factor_decay=factor_decay,
            factor_update_every=factor_update_every,
            weight_sharing=weight_sharing,
            fallback=fallback,
            mesh=mesh,
            max_factor_dim=max_factor_dim,
            stack_blocks=stack_blocks,
        ),
        *decay,
        optax.scale_by_learning_rate(learning_rate),
    )


@_docstrings.inherit_arguments(scale_by_ekfac)
def grafted_ekfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    damping: ScalarOrSchedule = 0.1,
    embedding_damping: ScalarOrSchedule | None = 1.0,
    damping_mode: _scalings.DampingMode = "relative",
    scaling: _scalings.ScalingName = "running",
    basis_update_every: jax.typing.ArrayLike = 10,
    factor_decay: jax.typing.ArrayLike = 0.95,
    factor_update_every: int = 1,
    scaling_decay: jax.typing.ArrayLike = 0.99,
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
    stack_blocks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC-ra's directions with AdamW's step sizes: what the benchmarks recommend trying first.

    ``optax.chain(graft(optax.scale_by_adam(b1, b2, eps), scale_by_ekfac(...)),
    optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))``:
    each parameter's update is EKFAC's ``U_A [(U_Aᵀ g U_B) / (s + ε mean(s))] U_Bᵀ`` (the
    running ``s*`` averaged with ``scaling_decay = 0.99``, a damping relative to each block's
    scalings: ``ε = 0.1``, and 1.0 for an embedding's block) rescaled to the Frobenius norm of
    Adam's update of the same gradient (:func:`graft`), then AdamW's decoupled weight decay and
    learning rate. The learning rate is Adam's: it transfers across models and across the
    damping. On the out-of-the-box benchmark of ``docs/benchmarks.md`` (2-core CPU, 200 steps, one
    grid ``{1e-3 .. 1e-1}`` for every method), with these defaults: AdamW's best final loss in 0.60x
    AdamW's steps on a character LM (1.68 against AdamW's best 2.18; lr 1e-2), 0.18x on the 28x28
    auto-encoder (lr 3e-2), 0.76x on an LM at a vocabulary of 8,192 (4.17 against 5.01; lr 3e-2); no
    run of the grid diverged. Try ``learning_rate`` in ``[1e-2, 3e-2]``. Over 600 steps on the LM at
    8,192 it ends at 2.72 against AdamW's 2.76, over 1,000 steps at 2.31 against 2.29: the early
    lead is spent, and it stays within 1% of AdamW (0.95 was 9% behind at 600 steps).

    The scalings' decay 0.99 (``scale_by_ekfac``'s default is 0.95): the running ``s`` restarts
    from KFAC's eigenvalues at each basis change, and with 0.95 it follows the last few batches'
    squared gradients, noisy in the small-curvature directions where ``1/s`` is largest. With
    0.95 the grafted EKFAC-ra led AdamW on the LM at 8,192 until step 365 and then fell behind
    (600 steps: 3.02); with 0.99 in 200 steps the same or fewer steps to AdamW's best on all six
    problems of the benchmark (LM 0.76x against 0.79x, small auto-encoder 0.14x against 0.19x),
    final losses a little higher on the 28x28 auto-encoder (271.4 against 267.3) and the
    character LM (1.678 against 1.672), and worse runs at lr 1e-1 (none diverged); 0.999 ended
    lower on the long run (2.65) but at 283.3 on the 28x28 auto-encoder.

    The embedding's own damping (measured with the scalings' decay 0.95): its scalings follow the
    tokens' frequencies, so ``0.1 mean(s)`` is mostly the rare tokens' and shrinks with the
    vocabulary. With 0.1 for the embedding too, the LM at 8,192 took 0.88x AdamW's steps (4.59);
    with 0.3, 1.0 and 3.0, 0.82x, 0.79x and 0.79x, the character LM 0.60x with each (final 1.68,
    1.66, 1.67, 1.71). With it, a ``damping=0.3`` for the other blocks gained nothing (0.79x;
    the character LM 0.61x, 1.73).

    Args:
      learning_rate: a float or an optax schedule (Adam's scale).
      b1: Adam's first-moment decay, in ``[0, 1)`` (the norms only).
      b2: Adam's second-moment decay, in ``[0, 1)`` (the norms only).
      eps: Adam's ``eps``, ``>= 0`` (the norms only).
      weight_decay: the decoupled weight decay (``optax.adamw``'s default, 1e-4).
      mask: which parameters decay (``optax.add_decayed_weights``'s ``mask``).
      damping: ``ε``; with the default ``damping_mode="relative"``, a fraction of each block's
        mean scaling (``> 0``).
      embedding_damping: ``ε`` of the embeddings' blocks (``nn.Embed``, tied or not), by default
        1.0: a fraction of the block's mean scaling, as ``damping``; with another
        ``damping_mode``, set it too. ``None``: ``damping``.
      {inherited arguments}

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` and ``params`` to
      ``update``.

    Raises:
      ValueError: ``b1`` or ``b2`` outside ``[0, 1)``, ``eps < 0``, or a bad argument of
        :func:`scale_by_ekfac`.

    Examples:
      A parameter in no block gets the fallback's direction and Adam's norm: the first step of
      a one-coordinate parameter is Adam's, ``-learning_rate · sign(g)``:

      >>> import jax.numpy as jnp
      >>> import ekfac_optax as ek
      >>> tx = ek.grafted_ekfac(0.03, blocks={}, weight_decay=0.0)
      >>> params = {"w": jnp.ones(1)}
      >>> updates, _ = tx.update({"w": jnp.array([-2.0])}, tx.init(params), params, stats={})
      >>> print(updates["w"].round(4))  # float32: Adam's bias corrections round at 1e-5
      [0.03]

    References:
      Agarwal, Anil, Hazan, Koren, Zhang. Disentangling Adaptive Gradient Methods from Learning
      Rates. 2020. https://arxiv.org/abs/2002.11803
      George et al., Fast Approximate Natural Gradient Descent in a Kronecker-factored
      Eigenbasis, NeurIPS 2018.
    """
    _scalings.AdamScaling(b1=b1, b2=b2, eps=eps).check()
    direction = scale_by_ekfac(
        blocks=blocks,
        damping=damping,
        embedding_damping=embedding_damping,
        basis_update_every=basis_update_every,
        factor_decay=factor_decay,
        factor_update_every=factor_update_every,
        scaling=scaling,
        scaling_decay=scaling_decay,
        damping_mode=damping_mode,
        weight_sharing=weight_sharing,
        fallback=fallback,
        mesh=mesh,
        max_factor_dim=max_factor_dim,
        stack_blocks=stack_blocks,
    )
    return optax.chain(
        _graft(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), direction),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
