"""Aliases: each preconditioner chained with ``optax.scale_by_learning_rate``."""

from collections.abc import Mapping

import jax
import optax
from jax.sharding import Mesh

from ekfac_optax import _blocks, _factors, _scalings
from ekfac_optax._transform import Fallback, ScalarOrSchedule, scale_by_ekfac, scale_by_kfac


def ekfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    scaling: _scalings.ScalingName = "batch",
    scaling_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC: :func:`scale_by_ekfac` then ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      blocks, damping, basis_update_every, factor_decay, scaling, scaling_decay,
      damping_mode, weight_sharing, fallback, mesh, max_factor_dim: see
        :func:`scale_by_ekfac`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` to ``update``.
    """
    return optax.chain(
        scale_by_ekfac(
            blocks=blocks,
            damping=damping,
            basis_update_every=basis_update_every,
            factor_decay=factor_decay,
            scaling=scaling,
            scaling_decay=scaling_decay,
            damping_mode=damping_mode,
            weight_sharing=weight_sharing,
            fallback=fallback,
            mesh=mesh,
            max_factor_dim=max_factor_dim,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    blocks: Mapping[str, _blocks.BlockSpec],
    damping: ScalarOrSchedule = 1e-3,
    basis_update_every: jax.typing.ArrayLike = 20,
    factor_decay: jax.typing.ArrayLike = 0.95,
    damping_mode: _scalings.DampingMode = "tikhonov",
    weight_sharing: _factors.WeightSharing = "expand",
    fallback: Fallback = "diagonal",
    mesh: Mesh | None = None,
    max_factor_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """KFAC: :func:`scale_by_kfac` then ``optax.scale_by_learning_rate``.

    Args:
      learning_rate: a float or an optax schedule.
      blocks, damping, basis_update_every, factor_decay, damping_mode,
      weight_sharing, fallback, mesh, max_factor_dim: see :func:`scale_by_kfac`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; pass ``stats=`` to ``update``.
    """
    return optax.chain(
        scale_by_kfac(
            blocks=blocks,
            damping=damping,
            basis_update_every=basis_update_every,
            factor_decay=factor_decay,
            damping_mode=damping_mode,
            weight_sharing=weight_sharing,
            fallback=fallback,
            mesh=mesh,
            max_factor_dim=max_factor_dim,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
