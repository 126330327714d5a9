"""Blocks: the static description of a curvature block, and how a parameter tree maps onto blocks.

A :class:`BlockSpec` is what the layer-kind table (``_kinds``) makes of one
layer: its path, kind, block type and sizes. The functions here read and
rewrite parameter-like trees by block (layer keys are the ``/``-joined Flax
module paths): the leaves in no block (the fallback), the labels for
``optax.multi_transform``, the shape check, and the ``summarize`` table.
"""

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BlockType = Literal["kronecker", "embed", "diagonal"]

# A factor side above this many rows keeps only its diagonal: the default max_factor_dim (see
# scale_by_ekfac for the measurements behind the value).
MAX_FACTOR_DIM = 4096


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one curvature block.

    Attributes:
      path: ``/``-joined Flax module path (the key in ``stats`` and the state).
      kind: the name of the layer kind in ``KINDS`` (``"dense"``, ``"conv"``, ...).
      block: ``"kronecker"``, ``"embed"`` or ``"diagonal"``.
      params: ``(name, shape)`` of each parameter of the block, in order.
      stack: the leading axes of independent same-shaped blocks, ``()`` for one block:
        ``lifted`` first, then the kind's own (the ``G`` groups of a grouped
        convolution, the ``batch_dims`` of a ``DenseGeneral``).
      d_in: fan-in without the bias coordinate (embed: the vocabulary size;
        diagonal: the number of features ``x̂`` has).
      d_out: fan-out (diagonal: the number of scalars, ``[scale; bias]``).
      has_bias: whether the block has a bias (the homogeneous coordinate).
      dtype: dtype of the curvature arrays (float32 for 16-bit params).
      layout: the kind's own static details (axes, groups, conv geometry).
      lifted: the leading axes that a Flax lifted transform (``nn.scan`` or
        ``nn.vmap`` over layers) adds to the layer's parameters, e.g. ``(L,)`` for
        ``L`` scanned layers: each of them is its own block. ``params`` holds the
        lifted shapes.
      max_factor_dim: the preconditioner's cap on a factor's side (``None``: no cap, the
        value :func:`find_blocks` leaves; the preconditioner sets its own); a side above it
        keeps only its diagonal (:attr:`diagonal_a`, :attr:`diagonal_b`).
    """

    path: str
    kind: str
    block: BlockType
    params: tuple[tuple[str, tuple[int, ...]], ...]
    stack: tuple[int, ...]
    d_in: int
    d_out: int
    has_bias: bool
    dtype: Any
    layout: Any = None
    lifted: tuple[int, ...] = ()
    max_factor_dim: int | None = None

    @property
    def d_in_aug(self) -> int:
        """Rows of the block matrix: fan-in plus one for a Kronecker block's bias."""
        return self.d_in + int(self.has_bias and self.block == "kronecker")

    @property
    def diagonal_a(self) -> bool:
        """Whether the input factor ``A`` is kept as its diagonal (identity basis): always for
        an embedding (one-hot inputs), for a Kronecker block above ``max_factor_dim``."""
        if self.block == "embed":
            return True
        return self.max_factor_dim is not None and self.d_in_aug > self.max_factor_dim

    @property
    def diagonal_b(self) -> bool:
        """Whether the output factor ``B`` is kept as its diagonal: above ``max_factor_dim``."""
        return self.max_factor_dim is not None and self.d_out > self.max_factor_dim

    @property
    def tied(self) -> bool:
        """Whether this is a tied embedding: an ``nn.Embed`` also called through ``attend``
        (``layout`` then holds each call's role)."""
        return self.block == "embed" and isinstance(self.layout, tuple)

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the block's parameters."""
        return tuple(name for name, _ in self.params)

    def unlifted(self) -> "BlockSpec":
        """The block of one of the layer's lifted copies: the spec the layer kind works with."""
        if not self.lifted:
            return self
        lead = len(self.lifted)
        return dataclasses.replace(
            self,
            params=tuple((name, shape[lead:]) for name, shape in self.params),
            stack=self.stack[lead:],
            lifted=(),
        )

    def describe(self) -> str:
        """How ``summarize`` names the block."""
        where = self.path or "<root>"
        kind = self.kind
        if self.lifted:
            kind += f", lifted {'x'.join(map(str, self.lifted))}"
        if self.block == "diagonal":
            copies = f"{'x'.join(map(str, self.stack))} stacked " if self.stack else ""
            return f"{copies}diagonal block ({self.d_out} scalars) of {where} [{kind}]"
        capped = self._capped_sides()
        if self.tied:
            return (
                f"tied embedding block {self.d_in}x{self.d_out} (lookup and attend: diagonal "
                f"vocabulary factor, width factor of both uses{capped}) of {where}"
            )
        if self.block == "embed":
            return (
                f"embedding block {self.d_in}x{self.d_out} (diagonal input factor{capped}) "
                f"of {where}"
            )
        size = f"{self.d_in_aug}x{self.d_out}"
        if self.stack:
            size = f"{'x'.join(map(str, self.stack))} stacked {size}"
        capped = f" ({capped[2:]})" if capped else ""
        return f"kronecker block {size} of {where} [{kind}]{capped}"

    def _capped_sides(self) -> str:
        """``", input/output factor diagonal: d > max_factor_dim=c"`` for the capped sides."""
        sides = []
        if self.block == "kronecker" and self.diagonal_a:
            sides.append(("input", self.d_in_aug))
        if self.block != "diagonal" and self.diagonal_b:
            sides.append(("output", self.d_out))
        return "".join(
            f", {side} factor diagonal: {size} > max_factor_dim={self.max_factor_dim}"
            for side, size in sides
        )


class Blocks(dict):
    """:func:`find_blocks`' result: a dict from module path to :class:`BlockSpec`, sorted by
    path, that also says why each other layer it saw falls back.

    Attributes:
      reasons: ``{module path: why}`` for each layer of a kind of the table (or called like
        one) that is no block: :func:`summarize` shows it on the layer's parameters. A dict
        built from this one (a selection of its blocks) is a plain dict, without reasons.
    """

    def __init__(self, blocks: Mapping[str, BlockSpec] = (), reasons: Mapping[str, str] = ()):
        super().__init__(blocks)
        self.reasons = dict(reasons)


def vmapped(fn, axes: Sequence[int]):
    """``fn`` mapped over ``len(axes)`` leading axes (those of a stack)."""
    for _ in axes:
        fn = jax.vmap(fn)
    return fn


def curvature_dtype(dtype: Any) -> Any:
    """float32 for 16-bit parameters, the parameters' own dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def path_key(path: Sequence[Any]) -> str:
    """The ``/``-joined key of a Flax module path or a parameter-tree path."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def leaf_location(key_path: Sequence[Any]) -> tuple[str, str]:
    """``(module path, parameter name)`` of a leaf's parameter-tree path."""
    return path_key(key_path[:-1]), path_key(key_path[-1:])


def subtree(params: Mapping[str, Any], path: str) -> Any:
    """The node of a parameter-like tree at a ``/``-joined module path, or None."""
    node = params
    for name in path.split("/") if path else ():
        if isinstance(node, Mapping) and name not in node and name.isdigit():
            name = int(name)  # an NNX list's index
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def as_arrays(tree: Any) -> Any:
    """A parameter-like tree with arrays as leaves: an NNX model's ``nnx.Param`` state, an
    ``nnx.State`` of variables as ``nnx.as_pure`` gives it; other trees as they are."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return nnx.as_pure(tree)


def layer_paths(layers: Any) -> tuple[str, ...] | None:
    """Validates ``layers``: ``None`` or an iterable of module paths (a dict: its keys)."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"layers must be a sequence of module paths (strings), got {layers!r}")
    return tuple(layers)


def replace_blocks(tree: Any, new_layers: Mapping[str, Mapping[str, jax.Array]]) -> Any:
    """``tree`` with the leaves of each layer in ``new_layers`` replaced; structure kept."""

    def pick(key_path, leaf):
        layer, name = leaf_location(key_path)
        return new_layers.get(layer, {}).get(name, leaf)

    return jax.tree_util.tree_map_with_path(pick, tree)


def fallback_leaves(params: Any, blocks: Mapping[str, BlockSpec]) -> dict[str, Any]:
    """``{leaf path: leaf}`` of every parameter in no block."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        layer, name = leaf_location(key_path)
        spec = blocks.get(layer)
        if spec is None or name not in spec.names:
            out[path_key(key_path)] = leaf
    return out


def block_labels(params: Any, blocks: Mapping[str, BlockSpec]) -> Any:
    """``"block"`` for each parameter in one of ``blocks``, ``"fallback"`` for the others.

    The labels for ``optax.multi_transform``, to send the parameters in no block (or
    in blocks left out of ``blocks``) to another optimizer.

    Args:
      params: the parameter tree.
      blocks: the blocks given to the preconditioner.

    Returns:
      A tree of the structure of ``params`` with a string at each leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
      >>> import ekfac_optax as ek
      >>> model = nn.Sequential([nn.Embed(10, 4), nn.Dense(10)])
      >>> ids = jnp.zeros((2, 3), jnp.int32)
      >>> params = model.init(jax.random.key(0), ids)["params"]
      >>> def loss_fn(params, ids):
      ...     logits = model.apply({"params": params}, ids)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
      >>> blocks = ek.find_blocks(loss_fn, params, ids)
      >>> dense = {path: spec for path, spec in blocks.items() if spec.kind == "dense"}
      >>> ek.block_labels(params, dense)
      {'layers_0': {'embedding': 'fallback'}, 'layers_1': {'bias': 'block', 'kernel': 'block'}}
    """

    blocks = checked(blocks, "block_labels", params)

    def label(key_path, _):
        layer, name = leaf_location(key_path)
        return "block" if layer in blocks and name in blocks[layer].names else "fallback"

    return jax.tree_util.tree_map_with_path(label, params)


def _is_blocks(blocks: Any) -> bool:
    return isinstance(blocks, Mapping) and all(
        isinstance(spec, BlockSpec) and spec.path == path for path, spec in blocks.items()
    )


def checked(blocks: Any, where: str, params: Any = None) -> dict[str, BlockSpec]:
    """The ``blocks`` argument as a dict sorted by path, or a TypeError naming it (and, where
    ``params`` comes before it, saying that a ``params`` of blocks means they are swapped)."""
    if params is not None and _is_blocks(params) and params and not _is_blocks(blocks):
        raise TypeError(
            f"{where}: params is a dict of BlockSpec and blocks is not: the arguments are "
            f"swapped; call {where}(params, blocks)"
        )
    if not _is_blocks(blocks):
        raise TypeError(
            f"{where}: blocks must be the dict of BlockSpec returned by ek.find_blocks(loss_fn, "
            f"params, *batch) (or a subset of it), got {type(blocks).__name__}"
        )
    return dict(sorted(blocks.items()))


def check_params(params: Any, blocks: Mapping[str, BlockSpec], where: str) -> None:
    """Raises a ValueError naming the layer if ``params`` lacks a block's parameter or shape."""
    for path, spec in blocks.items():
        node = subtree(params, path)
        for name, shape in spec.params:
            actual = None
            if isinstance(node, Mapping) and name in node:
                actual = tuple(jnp.shape(node[name]))
            if actual != shape:
                found = sorted(node) if isinstance(node, Mapping) else node
                raise ValueError(
                    f"{where}: layer {path!r} ({spec.kind}) expects a parameter {name!r} of "
                    f"shape {shape}, got {actual if actual is not None else found}; build the "
                    "blocks with ek.find_blocks(loss_fn, params, *batch) for these params"
                )


def with_cap(blocks: Mapping[str, BlockSpec], max_factor_dim: Any) -> dict[str, BlockSpec]:
    """The blocks with the preconditioner's cap on factor sides (``None``: ``MAX_FACTOR_DIM``).

    The cap sets the state's shapes, so it must be known when the transformation is built: a
    Python or numpy integer, or a concrete integer array (``optax.inject_hyperparams`` makes
    it one); a traced value raises a TypeError, anything else below 1 or not an integer a
    ValueError naming ``max_factor_dim``.
    """
    if max_factor_dim is None:
        max_factor_dim = MAX_FACTOR_DIM
    if isinstance(max_factor_dim, jax.core.Tracer):
        raise TypeError(
            "max_factor_dim sets the optimizer state's shapes, so it cannot be traced; with "
            "optax.inject_hyperparams, list it in static_args=('max_factor_dim',)"
        )
    value = max_factor_dim
    if isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0:
        value = value.item()  # inject_hyperparams' array, maybe of a float dtype
        value = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"max_factor_dim must be an integer >= 1 or None, got {max_factor_dim!r}")
    return {
        path: dataclasses.replace(spec, max_factor_dim=int(value)) for path, spec in blocks.items()
    }
