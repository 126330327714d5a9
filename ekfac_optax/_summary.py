"""What the preconditioner does with each parameter, and what its state costs: ``summary`` (rows
of named fields) and ``summarize`` (the same as a table), for a user to read before training.

The state's sizes are those of ``scale_by_ekfac(...).init(params)`` itself, evaluated abstractly
(``jax.eval_shape``: no memory, no FLOPs), so they cannot drift from what ``init`` allocates.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature import _scalings
from ekfac_optax.kinds import _blocks
from ekfac_optax.update import _docstrings, _stacking, _state, _transform


class ParameterRow(NamedTuple):
    """One parameter in :func:`summary`.

    Attributes:
      path: the ``/``-joined parameter path.
      shape: the parameter's shape.
      preconditioning: how it is preconditioned: its block (type, size, layer, kind and capped
        factor sides) or the fallback.
      param_bytes: the parameter's bytes.
      state_bytes: the optimizer state of its block, on the block's first parameter (0 on the
        others), or of its diagonal fallback.
    """

    path: str
    shape: tuple[int, ...]
    preconditioning: str
    param_bytes: int
    state_bytes: int


class Summary(NamedTuple):
    """:func:`summary`'s result.

    Attributes:
      rows: one :class:`ParameterRow` per parameter, in the order of ``params``' leaves.
      param_bytes: all parameters' bytes.
      state_bytes: the bytes of the whole preconditioner state (``tx.init(params)``).
    """

    rows: tuple[ParameterRow, ...]
    param_bytes: int
    state_bytes: int


def _bytes(tree: Any) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def summary(
    params: Any,
    blocks: Mapping[str, _blocks.BlockSpec],
    fallback: str = "diagonal",
    max_factor_dim: int | None = None,
    *,
    tx: Any = None,
) -> Summary:
    """How each parameter is preconditioned and the state it costs, as named fields.

    Args:
      params: the parameter tree given to ``tx.init`` (or a Flax NNX model, or its
        ``nnx.State``).
      blocks: the blocks given to the preconditioner (from ``ek.find_blocks``).
      fallback: the preconditioner's ``fallback`` argument.
      max_factor_dim: the preconditioner's ``max_factor_dim`` (``None``: its default,
        4096): a block's factor sides above it are diagonal, and so is their state.
      tx: the optimizer itself (any chain holding one of this library's preconditioners,
        e.g. ``ek.kfe_adam(...)``, whose per-block state is twice EKFAC's); its ``init``
        gives the state bytes (``None``: ``scale_by_ekfac`` with ``fallback`` and
        ``max_factor_dim``). The total is the whole chain's state.

    Returns:
      A :class:`Summary`: a row per parameter, the parameters' and the state's bytes.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Dense(8), nn.Dense(3)])
      >>> x, y = jnp.ones((4, 5)), jnp.zeros((4,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(params, x, y):
      ...     logits = model.apply({"params": params}, x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> info = ek.summary(params, ek.find_blocks(loss_fn, params, x, y))
      >>> info.param_bytes, info.state_bytes
      (300, 1932)
      >>> [r.path for r in info.rows]
      ['layers_0/bias', 'layers_0/kernel', 'layers_1/bias', 'layers_1/kernel']
      >>> [r.state_bytes for r in info.rows]  # a block's state on its first parameter
      [1048, 0, 876, 0]
    """
    _blocks.checked(blocks, "summary", params)  # blocks kept: a Blocks also has the reasons
    params = _blocks.as_arrays(params)
    _blocks.check_params(params, blocks, "summarize")
    capped = _blocks.with_cap(blocks, max_factor_dim)
    if tx is None:
        tx = _transform.scale_by_ekfac(
            blocks=blocks, fallback=fallback, max_factor_dim=max_factor_dim
        )
    whole = jax.eval_shape(tx.init, params)
    state = _preconditioner_state(whole)
    adam = any(
        isinstance(node, _scalings.AdamSlot)
        for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _scalings.AdamSlot))
    )
    how_else = {
        "diagonal": "diagonal fallback (Adam, {})"
        if adam
        else "diagonal fallback (running N g², {})",
        "identity": "identity (fallback='identity': not preconditioned, {})",
    }[fallback]
    reasons = getattr(blocks, "reasons", {})
    block_bytes = _block_bytes(state.blocks, capped)
    rows, seen = [], set()
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        layer, name = _blocks.leaf_location(key_path)
        path = _blocks.path_key(key_path)
        spec = capped.get(layer)
        if spec is not None and name in spec.names:
            how = spec.describe()
            state_bytes = 0 if layer in seen else block_bytes[layer]
            seen.add(layer)
        else:
            why = f"no block: {reasons[layer]}" if layer in reasons else "in no block"
            how, state_bytes = how_else.format(why), _bytes(state.fallback.get(path))
        shape = tuple(jnp.shape(leaf))
        rows.append(ParameterRow(path, shape, how, _bytes(leaf), state_bytes))
    return Summary(tuple(rows), _bytes(params), _bytes(whole))


def _block_bytes(entries: dict[str, Any], blocks: dict[str, Any]) -> dict[str, int]:
    """The state bytes of each block: its entry's, or its share of its group's stacked entry
    (``stack_blocks=True``: same-shaped blocks, equal shares)."""
    groups = _stacking.plan(blocks, enabled=set(entries) != set(blocks))
    return {
        member: _bytes(entries[key]) // len(g.members)
        for key, g in groups.items()
        for member in g.members
    }


def _preconditioner_state(state: Any) -> Any:
    """The first :class:`ScaleByEkfacState` in an optimizer's state, or a TypeError."""
    found = _state.find_states(state)
    if not found:
        raise TypeError(
            "summary: tx holds no preconditioner of ekfac_optax (no ScaleByEkfacState in its state)"
        )
    return found[0]


def _human(n: int) -> str:
    """Bytes as ``640 B``, ``12.3 kB``, ``8.6 GB`` (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@_docstrings.inherit_arguments(summary)
def summarize(
    params: Any,
    blocks: Mapping[str, _blocks.BlockSpec],
    fallback: str = "diagonal",
    max_factor_dim: int | None = None,
    *,
    tx: Any = None,
) -> str:
    """A readable table of how each parameter is preconditioned and what its state costs.

    Args:
      {inherited arguments}

    Returns:
      A multi-line string: one row per parameter with its path, shape, bytes, the bytes of
      its block's state (on the block's first parameter) and its treatment: its block (type,
      size, layer, kind, capped factor sides) or the fallback; then the totals, the state's
      as a multiple of the parameters'. :func:`summary` gives the same as named fields.
    """
    _blocks.checked(blocks, "summarize", params)
    info = summary(params, blocks, fallback, max_factor_dim, tx=tx)
    rows = [("parameter", "shape", "params", "state", "preconditioning")]
    rows += [
        (
            r.path,
            str(r.shape),
            _human(r.param_bytes),
            _human(r.state_bytes) if r.state_bytes else "-",
            r.preconditioning,
        )
        for r in info.rows
    ]
    ratio = info.state_bytes / max(info.param_bytes, 1)
    total = f"the state is {ratio:.2f}x the parameters"
    rows.append(("total", "", _human(info.param_bytes), _human(info.state_bytes), total))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(f"{r[i]:<{widths[i]}}" for i in range(4)) + f"  {r[4]}" for r in rows
    )
