"""Trace-time validation: hyperparameters, updates against the state, stats against the blocks.

Every check raises before anything is computed, naming the layer path with the
expected and the actual shapes.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ekfac_optax.capture._stats import LayerStats
from ekfac_optax.curvature._scalings import concrete
from ekfac_optax.kinds import _blocks


def check_hyperparameters(basis_update_every, factor_decay, factor_update_every=1):
    """Raises ValueError/TypeError, naming the hyperparameter, for a value out of range
    (``factor_update_every``: a number, or an array under ``optax.inject_hyperparams``)."""
    value = (
        None
        if isinstance(factor_update_every, bool)
        else concrete("factor_update_every", factor_update_every)
    )
    if isinstance(factor_update_every, bool) or (
        value is not None and not (value >= 1 and value == int(value))
    ):
        raise ValueError(f"factor_update_every must be an int >= 1, got {factor_update_every!r}")
    every = concrete("basis_update_every", basis_update_every)
    if every is not None and not (1 <= every < 2**31 and every == int(every)):
        raise ValueError(
            f"basis_update_every must be an integer in [1, 2**31), got {basis_update_every}"
        )
    value = concrete("factor_decay", factor_decay)
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay}")


def check_damping(name: str, damping, mode: str) -> None:
    """Raises ValueError, naming the argument, for a damping below 0, or not above 0 with
    ``damping_mode="relative"``, TypeError for a value that is no number (a schedule or a traced
    value pass)."""
    if callable(damping):
        return
    value = concrete(name, damping)
    if value is None:
        return
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {damping}")
    if mode == "relative" and not value > 0:
        raise ValueError(
            f"{name} must be > 0 with damping_mode='relative' (a fraction of each block's "
            f"mean scaling), got {damping}"
        )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises ValueError, naming the argument, for a string outside ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_finite_params(params: Any, where: str) -> None:
    """Raises a ValueError naming the parameters that hold a NaN or an infinity, where the
    values are known (not under ``jax.jit``: traced params pass unchecked)."""
    leaves = [
        (_blocks.path_key(key_path), leaf)
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not leaves or any(isinstance(leaf, jax.core.Tracer) for _, leaf in leaves):
        return
    finite = jax.device_get([jnp.all(jnp.isfinite(leaf)) for _, leaf in leaves])
    bad = [path for (path, _), ok in zip(leaves, finite, strict=True) if not ok]
    if bad:
        shown = bad[:5] + (["..."] if len(bad) > 5 else [])
        raise ValueError(
            f"{where}: the params hold NaN or infinite values in {len(bad)} parameter(s): "
            f"{shown}; a preconditioner started from them would produce only NaN updates "
            "(check the initialisation, or the checkpoint they came from)"
        )


def _slot_shape(slot: Any) -> tuple[int, ...] | None:
    """The shape of a rule's slot (every array of a slot has the block's shape)."""
    shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(slot)}
    return shapes.pop() if len(shapes) == 1 else None


def _expected_state_shape(spec: _blocks.BlockSpec) -> tuple[int, ...]:
    if spec.block == "diagonal":
        return (*spec.stack, spec.d_out)
    return (*spec.stack, spec.d_in_aug, spec.d_out)


def _factor_shapes(spec: _blocks.BlockSpec, block: Any):
    """``(side, state shape, expected shape)`` of a block's two factors."""
    for side, d, diagonal in (
        ("a", spec.d_in_aug, spec.diagonal_a),
        ("b", spec.d_out, spec.diagonal_b),
    ):
        expected = (*spec.stack, d) if diagonal else (*spec.stack, d, d)
        yield side, tuple(getattr(block, f"factor_{side}").shape), expected


def check_update(
    updates: Any,
    state: Any,
    blocks: Mapping[str, _blocks.BlockSpec],
    stored: Mapping[str, Any] | None = None,
    *,
    where: str = "scale_by_ekfac",
    tree: str = "scale_by_ekfac.update: updates",
) -> dict[str, _blocks.BlockSpec]:
    """The blocks, checked against ``updates`` and the state; curvature dtype of the state.

    ``stored``: the groups of blocks whose state is one stacked entry (``_stacking.plan``, keyed
    by their first member); ``None``: one entry per block. ``where`` and ``tree`` name the caller
    and ``updates`` in the errors.
    """
    _blocks.check_params(updates, blocks, tree)
    entries = dict(blocks) if stored is None else {key: g.spec for key, g in stored.items()}
    if set(state.blocks) != set(entries):
        raise ValueError(
            f"{where}: the optimizer state's layers do not match its blocks: "
            f"only in blocks {sorted(set(entries) - set(state.blocks))}, "
            f"only in state {sorted(set(state.blocks) - set(entries))}"
            + _layout_hint(set(state.blocks), set(blocks), set(entries))
        )
    wrong = {
        path: f"state {_slot_shape(state.blocks[path].scalings)}, expected "
        f"{_expected_state_shape(s)}"
        for path, s in entries.items()
        if _slot_shape(state.blocks[path].scalings) != _expected_state_shape(s)
    }
    # Same layer shapes, other factor shapes: a state built with another max_factor_dim.
    wrong.update(
        {
            path: f"state factor_{side} {shape}, expected {expected} (max_factor_dim="
            f"{s.max_factor_dim}: the state of an optimizer with another cap?)"
            for path, s in entries.items()
            if s.block != "diagonal" and path not in wrong
            for side, shape, expected in _factor_shapes(s, state.blocks[path])
            if shape != expected
        }
    )
    if wrong:
        raise ValueError(f"{where}: the optimizer state does not match the layers' shapes: {wrong}")
    if state.fallback:
        leaves = _blocks.fallback_leaves(updates, blocks)
        differ = sorted(
            set(leaves) ^ set(state.fallback)
            | {
                p
                for p in set(leaves) & set(state.fallback)
                if jnp.shape(leaves[p]) != _slot_shape(state.fallback[p])
            }
        )
        if differ:
            raise ValueError(
                f"{where}: the updates' parameters outside the blocks do not match the "
                f"optimizer state's fallback: {differ}"
            )
    entry = {m: key for key, g in (stored or {}).items() for m in g.members}
    return {
        path: dataclasses.replace(
            spec, dtype=jax.tree.leaves(state.blocks[entry.get(path, path)].scalings)[0].dtype
        )
        for path, spec in blocks.items()
    }


def _layout_hint(in_state: set[str], layers: set[str], entries: set[str]) -> str:
    """Why a state's entries may differ from the expected ones: the other ``stack_blocks``."""
    if entries != layers and in_state == layers:
        return (
            "; the state holds one entry per layer, an optimizer with stack_blocks=False made "
            "it, and this one has stack_blocks=True (same-shaped blocks stored stacked, one "
            "entry per group): build the state with the optimizer that uses it"
        )
    if entries == layers and in_state < layers:
        return (
            "; the state lacks some layers: an optimizer with stack_blocks=True (one entry per "
            "group of same-shaped blocks) may have made it, and this one has stack_blocks=False"
        )
    return ""


def _expected_stats(spec: _blocks.BlockSpec, n, t) -> tuple[tuple, tuple]:
    """The shapes of ``h`` and ``delta`` for a batch of ``n`` examples and ``t`` positions."""
    if spec.block == "embed":
        return (n, t), (n, t, spec.d_out)
    if spec.block == "diagonal":
        return (*spec.stack, n, t, spec.d_in), (*spec.stack, n, t, spec.d_in)
    return (*spec.stack, n, t, spec.d_in), (*spec.stack, n, t, spec.d_out)


def check_stats(stats: Any, specs: Mapping[str, _blocks.BlockSpec]) -> None:
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
            f"scale_by_ekfac: layers {missing} received no stats. Build the blocks and the "
            "stats from the same loss: blocks = ek.find_blocks(loss_fn, params, *batch) and "
            "ek.value_grad_and_stats(loss_fn, layers=blocks)"
        )
    extra = sorted(set(stats) - set(specs))
    if extra:
        raise ValueError(
            f"scale_by_ekfac: stats has layers {extra} that are not blocks of this optimizer "
            f"(blocks: {sorted(specs)}); pass layers=blocks to value_grad_and_stats"
        )
    batch = None
    for path, spec in specs.items():
        layer = stats[path]
        if not isinstance(layer, LayerStats):
            raise TypeError(f"stats[{path!r}] must be a LayerStats, got {type(layer)}")
        h_shape, delta_shape = jnp.shape(layer.h), jnp.shape(layer.delta)
        lead = len(spec.stack)
        n, t = (delta_shape[lead:] + (None, None))[:2]
        h_expected, delta_expected = _expected_stats(spec, n, t)
        if delta_shape != delta_expected:
            raise ValueError(
                f"stats[{path!r}].delta: expected shape "
                f"{_expected_stats(spec, 'N', 'T')[1]} for {spec.describe()}, got {delta_shape}"
            )
        if h_shape != h_expected:
            raise ValueError(
                f"stats[{path!r}].h: expected shape {h_expected} for {spec.describe()} and "
                f"delta of shape {delta_shape}, got {h_shape}"
            )
        _check_attend(path, spec, layer, n)
        if batch is not None and n != batch[1]:
            raise ValueError(
                f"stats: batch sizes differ: {batch[0]!r} has {batch[1]}, {path!r} has {n}"
            )
        batch = (path, n)


def _check_attend(path: str, spec: _blocks.BlockSpec, layer: LayerStats, n) -> None:
    """A tied embedding's stats carry its attend calls' ``(N, S, d)`` inputs and ``(N, S,
    vocab)`` output gradients; no other block's do."""
    given = (layer.attend_h, layer.attend_delta)
    if not spec.tied:
        if any(x is not None for x in given):
            raise ValueError(
                f"stats[{path!r}] has attend_h/attend_delta, but {spec.describe()} is no tied "
                "embedding"
            )
        return
    shapes = [None if x is None else tuple(jnp.shape(x)) for x in given]
    s = shapes[0][1] if shapes[0] is not None and len(shapes[0]) == 3 else "S"
    expected = [(n, s, spec.d_out), (n, s, spec.d_in)]
    if shapes != expected:
        raise ValueError(
            f"stats[{path!r}]: {spec.describe()} expects attend_h of shape {expected[0]} and "
            f"attend_delta of shape {expected[1]}, got {shapes[0]} and {shapes[1]}"
        )
