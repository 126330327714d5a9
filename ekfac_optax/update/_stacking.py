"""Same-shaped blocks stored and processed as one: a stack per distinct shape, whatever the code.

A transformer written as a Python loop gives one block per layer: the same ``d x d`` projections
``L`` times, each with its own traced stages (factors, ``eigh``, projections, scalings). The
stages already work on stacked blocks (``spec.stack``: the copies of an ``nn.scan``-ned layer, the
groups of a grouped convolution). With the preconditioner's ``stack_blocks``:

- :func:`plan` (at construction) groups the blocks by :func:`spec_signature` (block type, sizes,
  bias, curvature dtype, stack, capped sides): each group's state is stored as one stacked block,
  keyed by its first member's path, its members along a new leading axis in the order of the
  blocks;
- :func:`group` (at each update) groups them by :func:`signature`, which adds the statistics'
  shapes and dtypes: what the stages read. Those groups run the stages once each (one batched
  projection, one stacked ``eigh`` loop, one traced body); a stored group whose members' statistics
  differ in shape (a strided convolution among unstrided ones, a projection of another sequence)
  is split for them and put back together (:func:`regroup`), at the price of a copy of its state.

The capture stays per layer: each update stacks the members' gradient matrices and statistics and
unstacks the preconditioned matrices. Embeddings (token ids as inputs, a vocabulary-sized diagonal
side) are never grouped; a group of one member is processed as it is, without copies.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def spec_signature(spec: _blocks.BlockSpec) -> tuple | None:
    """What the stages read of a block's spec; blocks with equal signatures are stored stacked.
    ``None`` for a block that is never stacked (an embedding)."""
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
    )


def signature(spec: _blocks.BlockSpec, h: jax.Array, delta: jax.Array) -> tuple | None:
    """What the stages read of a block and its statistics; blocks with equal signatures are
    processed stacked. ``None`` for a block that is never stacked (an embedding)."""
    key = spec_signature(spec)
    if key is None:
        return None
    return (*key, (jnp.shape(h), h.dtype), (jnp.shape(delta), delta.dtype))


def plan(specs: Mapping[str, _blocks.BlockSpec], enabled: bool = True) -> dict[str, Group]:
    """The groups whose state is stored as one stacked block, keyed by each group's first
    member's path (in the order of ``specs``); not ``enabled``: each block its own group."""
    return _grouped(specs, lambda p, s: spec_signature(s) if enabled else None)


def group(
    specs: Mapping[str, _blocks.BlockSpec],
    h: Mapping[str, Any],
    delta: Mapping[str, Any],
    enabled: bool = True,
) -> dict[str, Group]:
    """The blocks grouped by :func:`signature`, keyed by each group's first member's path (in
    the order of ``specs``); not ``enabled``: each block its own group."""
    return _grouped(specs, lambda p, s: signature(s, h[p], delta[p]) if enabled else None)


def _grouped(specs: Mapping[str, _blocks.BlockSpec], key_of) -> dict[str, Group]:
    """The blocks grouped by equal ``key_of(path, spec)`` (``None``: a group of its own)."""
    members: dict[Any, list[str]] = {}
    for path, spec in specs.items():
        key = key_of(path, spec)
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


def regroup(source: Mapping[str, Group], target: Mapping[str, Group], values: Mapping[str, Any]):
    """``values`` of the groups ``source`` rearranged into the groups ``target`` (the same
    members, each target group within one source group or made of whole source groups).

    A group found unchanged in both keeps its value as it is (no copy): the usual case, when
    every stored group is processed whole. Otherwise its members' slices are cut out (one static
    slice or gather per group) and concatenated in the target's order.
    """
    where = {m: (key, i) for key, g in source.items() for i, m in enumerate(g.members)}
    out = {}
    for key, g in target.items():
        if key in source and source[key].members == g.members:
            out[key] = values[key]
            continue
        parts = []  # (source key, indices), consecutive members of one source group merged
        for m in g.members:
            k, i = where[m]
            if parts and parts[-1][0] == k:
                parts[-1][1].append(i)
            else:
                parts.append((k, [i]))
        pieces = [_take(source[k], values[k], indices) for k, indices in parts]
        if len(g.members) == 1:
            out[key] = jax.tree.map(lambda x: x[0], pieces[0])
        else:
            out[key] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    return out


def _take(g: Group, value: Any, indices: list[int]) -> Any:
    """The members ``indices`` of the group ``g``'s value, along a leading axis (a group of one:
    its value with that axis added)."""
    if len(g.members) == 1:
        return jax.tree.map(lambda x: x[None], value)
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return jax.tree.map(lambda x: x[indices[0] : indices[0] + len(indices)], value)
    return jax.tree.map(lambda x: x[np.asarray(indices)], value)
