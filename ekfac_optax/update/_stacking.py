"""Same-shaped blocks processed as one: a stack per distinct shape, whatever the model code.

A transformer written as a Python loop gives one block per layer: the same ``d x d`` projections
``L`` times, each with its own traced stages (factors, ``eigh``, projections, scalings). The
stages already work on stacked blocks (``spec.stack``: the copies of an ``nn.scan``-ned layer, the
groups of a grouped convolution), so an update groups its blocks by :func:`signature` (everything
the stages read: block type, sizes, bias, curvature dtype, stack, capped sides, the statistics'
shapes and dtypes), stacks each group's state, gradient matrices and statistics along a new
leading axis, runs the stages once per group (one batched projection, one stacked ``eigh`` loop,
one traced body) and unstacks the results, when the preconditioner's ``stack_blocks`` asks for
it. The capture and the optimizer state stay per layer: the state's layout does not depend on
the grouping, so checkpoints restore whatever the grouping.

Embeddings (token ids as inputs, a vocabulary-sized diagonal side) are never grouped; a group of
one member is processed as it is, without copies.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.kinds import _blocks


class Group(NamedTuple):
    """Blocks processed as one.

    Attributes:
      spec: the group's block: the members' spec with the leading axis ``(len(members),)``
        added to ``stack`` (a group of one: the member's own spec); its ``path`` names the
        first member.
      members: the members' module paths, in the order of the stacked axis.
    """

    spec: _blocks.BlockSpec
    members: tuple[str, ...]


def signature(spec: _blocks.BlockSpec, h: jax.Array, delta: jax.Array) -> tuple | None:
    """What the stages read of a block and its statistics; blocks with equal signatures can be
    stacked. ``None`` for a block that is never stacked (an embedding)."""
    if spec.block == "embed":
        return None
    return (
        spec.block,
        spec.d_in,
        spec.d_out,
        spec.has_bias,
        jnp.dtype(spec.dtype),
        spec.stack,
        spec.diagonal_a,
        spec.diagonal_b,
        spec.names if spec.block == "diagonal" else None,  # which of scale / bias
        (jnp.shape(h), h.dtype),
        (jnp.shape(delta), delta.dtype),
    )


def group(
    specs: Mapping[str, _blocks.BlockSpec],
    h: Mapping[str, Any],
    delta: Mapping[str, Any],
    enabled: bool = True,
) -> dict[str, Group]:
    """The blocks grouped by :func:`signature`, keyed by each group's first member's path (in
    the order of ``specs``); not ``enabled``: each block its own group."""
    members: dict[Any, list[str]] = {}
    for path, spec in specs.items():
        key = signature(spec, h[path], delta[path]) if enabled else None
        members.setdefault(("alone", path) if key is None else key, []).append(path)
    groups = {}
    for paths in members.values():
        first = specs[paths[0]]
        spec = first
        if len(paths) > 1:
            spec = dataclasses.replace(first, stack=(len(paths), *first.stack), lifted=())
        groups[paths[0]] = Group(spec, tuple(paths))
    return groups


def stack(groups: Mapping[str, Group], values: Mapping[str, Any]) -> dict[str, Any]:
    """Per group, its members' values (pytrees of one structure) stacked along a new leading
    axis; a group of one keeps its member's value."""
    out = {}
    for key, g in groups.items():
        trees = [values[p] for p in g.members]
        out[key] = trees[0] if len(trees) == 1 else jax.tree.map(_stack, *trees)
    return out


def unstack(groups: Mapping[str, Group], values: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`stack`: per member, its slice of its group's value."""
    out = {}
    for key, g in groups.items():
        if len(g.members) == 1:
            out[g.members[0]] = values[key]
            continue
        for i, path in enumerate(g.members):
            out[path] = jax.tree.map(lambda x, i=i: x[i], values[key])
    return out


def _stack(*xs: jax.Array) -> jax.Array:
    return jnp.stack(xs)
