"""Trace-time validation: hyperparameters, updates against the state, stats against the blocks.

Every check raises before anything is computed, naming the layer path with the
expected and the actual shapes.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ekfac_optax import _layers
from ekfac_optax._capture import LayerStats


def concrete(name: str, value: Any) -> float | None:
    """A Python, numpy or concrete-array number as a float; None for tracers and schedules."""
    if isinstance(value, jax.core.Tracer) or (callable(value) and name == "damping"):
        return None
    if (
        value is None
        or isinstance(value, (bool, str))
        or not jnp.issubdtype(jnp.result_type(value), jnp.number)
        or jnp.ndim(value) != 0
    ):
        raise TypeError(f"{name} must be a scalar number, got {value!r}")
    return float(value)


def check_hyperparameters(damping, basis_update_every, factor_decay, scaling_decay):
    """Raises ValueError/TypeError, naming the hyperparameter, for a value out of range."""
    damping_value = concrete("damping", damping)
    if damping_value is not None and not damping_value >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    every = concrete("basis_update_every", basis_update_every)
    if every is not None and not (1 <= every < 2**31 and every == int(every)):
        raise ValueError(
            f"basis_update_every must be an integer in [1, 2**31), got {basis_update_every}"
        )
    for name, decay in (("factor_decay", factor_decay), ("scaling_decay", scaling_decay)):
        value = concrete(name, decay)
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {decay}")


def block_specs(
    updates: Any, state_blocks: Mapping[str, Any], layers: tuple[str, ...] | None
) -> dict[str, _layers.BlockSpec]:
    """The blocks of ``updates``, checked against the state's; curvature dtype of the state."""
    for path in state_blocks:
        node = _layers.subtree(updates, path)
        if isinstance(node, Mapping) and _layers.KERNEL in node and _layers.BIAS in node:
            d_out = jnp.shape(node[_layers.KERNEL])[-1]
            if jnp.shape(node[_layers.BIAS]) != (d_out,):
                raise ValueError(
                    f"scale_by_ekfac: updates of layer {path!r}: bias has shape "
                    f"{jnp.shape(node[_layers.BIAS])}, expected ({d_out},) to match kernel "
                    f"{jnp.shape(node[_layers.KERNEL])}"
                )
    specs = _layers.find_blocks(updates, layers)
    if set(specs) != set(state_blocks):
        raise ValueError(
            "scale_by_ekfac: the updates' layers do not match the optimizer state: "
            f"only in updates {sorted(set(specs) - set(state_blocks))}, "
            f"only in state {sorted(set(state_blocks) - set(specs))}"
        )
    wrong = {
        path: f"state {state_blocks[path].scalings.shape}, expected {(s.d_in_aug, s.d_out)}"
        for path, s in specs.items()
        if state_blocks[path].scalings.shape != (s.d_in_aug, s.d_out)
    }
    if wrong:
        raise ValueError(
            f"scale_by_ekfac: the optimizer state does not match the layers' shapes: {wrong}"
        )
    return {
        path: dataclasses.replace(spec, dtype=state_blocks[path].scalings.dtype)
        for path, spec in specs.items()
    }


def check_stats(stats: Any, specs: Mapping[str, _layers.BlockSpec]) -> None:
    """Trace-time check of ``stats`` against the blocks: the layer, expected vs actual."""
    if stats is None:
        raise TypeError(
            "scale_by_ekfac.update needs the keyword argument stats=..., the third output of "
            "ek.value_grad_and_stats(loss_fn)(params, ...): "
            "tx.update(grads, opt_state, params, stats=stats)"
        )
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a dict from layer path to LayerStats, got {type(stats)}")
    missing = sorted(set(specs) - set(stats))
    if missing:
        raise ValueError(
            f"scale_by_ekfac: layers {missing} received no stats. value_grad_and_stats captures "
            "nn.Dense and nn.Conv calls made inside loss_fn; a kernel of any other module must be "
            "left out: pass layers=[...] without these paths to scale_by_ekfac (see "
            "ek.summarize(params, layers)) and the same list to value_grad_and_stats."
        )
    extra = sorted(set(stats) - set(specs))
    if extra:
        raise ValueError(
            f"scale_by_ekfac: stats has layers {extra} that are not Kronecker blocks of this "
            f"optimizer (blocks: {sorted(specs)}); pass the same layers=[...] to "
            "value_grad_and_stats and scale_by_ekfac"
        )
    batch = None
    for path, spec in specs.items():
        layer = stats[path]
        if not isinstance(layer, LayerStats):
            raise TypeError(f"stats[{path!r}] must be a LayerStats, got {type(layer)}")
        h_shape, delta_shape = jnp.shape(layer.h), jnp.shape(layer.delta)
        n, t = (h_shape[:2] + (None, None))[:2]
        if len(h_shape) != 3 or h_shape[2] != spec.d_in:
            raise ValueError(
                f"stats[{path!r}].h: expected shape (N, T, {spec.d_in}) for kernel "
                f"{spec.kernel_shape}, got {h_shape}"
            )
        if delta_shape != (n, t, spec.d_out):
            raise ValueError(
                f"stats[{path!r}].delta: expected shape {(n, t, spec.d_out)} for kernel "
                f"{spec.kernel_shape} and h of shape {h_shape}, got {delta_shape}"
            )
        if batch is not None and n != batch[1]:
            raise ValueError(
                f"stats: batch sizes differ: {batch[0]!r} has {batch[1]}, {path!r} has {n}"
            )
        batch = (path, n)
