"""What a layer is: Kronecker blocks found in the parameter tree.

A Kronecker block is a ``kernel`` whose last axis is fan-out and whose other
axes are fan-in (``nn.Dense``: ``(d_in, d_out)``; ``nn.Conv``:
``(*kernel_size, c_in, c_out)``), together with its sibling ``bias`` of shape
``(d_out,)`` when present. The bias is the homogeneous coordinate of the input:
``h_aug = [h; 1]``, so kernel and bias form one ``(d_in + 1, d_out)`` matrix.

Every other parameter (LayerNorm scales, embeddings, ...) is not
preconditioned: it passes through unchanged (identity fallback).
Layer keys are the ``/``-joined Flax module paths.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

KERNEL = "kernel"
BIAS = "bias"

# The module types whose calls are captured, and how their input becomes `h`.
# "dense": h is the last axis of the input; "conv": h are the SUA input patches.
CAPTURED_MODULES: tuple[tuple[type, str], ...] = ((nn.Conv, "conv"), (nn.Dense, "dense"))


def module_kind(module: Any) -> str | None:
    """Returns "dense" or "conv" for a captured module, None for any other."""
    for module_type, kind in CAPTURED_MODULES:
        if isinstance(module, module_type):
            if kind == "conv" and (module.feature_group_count != 1 or module.mask is not None):
                return None
            return kind
    return None


def path_key(path: Sequence[Any]) -> str:
    """The ``/``-joined key of a Flax module path or a parameter-tree path."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def leaf_location(key_path: Sequence[Any]) -> tuple[str, str]:
    """``(module path, parameter name)`` of a leaf's parameter-tree path."""
    return path_key(key_path[:-1]), path_key(key_path[-1:])


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one Kronecker block.

    Attributes:
      path: ``/``-joined Flax module path (the key in ``stats`` and the state).
      kernel_shape: shape of the ``kernel`` parameter.
      has_bias: whether a sibling ``bias`` of shape ``(d_out,)`` exists.
      dtype: dtype of the curvature arrays (float32 for 16-bit params).
    """

    path: str
    kernel_shape: tuple[int, ...]
    has_bias: bool
    dtype: Any

    @property
    def d_in(self) -> int:
        """Fan-in of the kernel (without the bias coordinate)."""
        return math.prod(self.kernel_shape[:-1])

    @property
    def d_in_aug(self) -> int:
        """Rows of the block matrix: fan-in plus one for the bias."""
        return self.d_in + int(self.has_bias)

    @property
    def d_out(self) -> int:
        """Fan-out of the kernel."""
        return self.kernel_shape[-1]


def curvature_dtype(dtype: Any) -> Any:
    """float32 for 16-bit parameters, the parameters' own dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def subtree(params: Mapping[str, Any], path: str) -> Any:
    """The node of a parameter-like tree at a ``/``-joined module path, or None."""
    node = params
    for name in path.split("/") if path else ():
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def layer_paths(layers: Sequence[str] | None) -> tuple[str, ...] | None:
    """Validates a ``layers`` argument: ``None`` or a sequence of module paths."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"layers must be a sequence of module paths (strings), got {layers!r}")
    return tuple(layers)


def _bias_fits(node: Mapping[str, Any]) -> bool:
    bias = node.get(BIAS)
    return bias is None or tuple(jnp.shape(bias)) == (jnp.shape(node[KERNEL])[-1],)


def find_blocks(params: Any, layers: Sequence[str] | None = None) -> dict[str, BlockSpec]:
    """Infers the Kronecker blocks of a Flax parameter tree.

    Args:
      params: the parameter tree (the ``"params"`` collection).
      layers: optional explicit list of module paths to precondition. Each must
        hold a ``kernel`` of at least two axes and, if any, a ``bias`` of shape
        ``(d_out,)``. ``None`` takes every such ``kernel`` in the tree; others
        (e.g. an ``nn.DenseGeneral`` with several output axes and a bias) are
        left to the identity.

    Returns:
      A dict from module path to :class:`BlockSpec`, sorted by path.

    Raises:
      TypeError: if ``layers`` is not a sequence of strings.
      ValueError: if a path in ``layers`` holds no usable ``kernel``.
    """
    layers = layer_paths(layers)
    if layers is None:
        paths = []
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
            layer, name = leaf_location(key_path)
            if name == KERNEL and jnp.ndim(leaf) >= 2 and _bias_fits(subtree(params, layer)):
                paths.append(layer)
    else:
        paths = list(layers)
    blocks = {}
    for path in sorted(paths):
        node = subtree(params, path)
        kernel = node.get(KERNEL) if isinstance(node, Mapping) else None
        if kernel is None or jnp.ndim(kernel) < 2:
            raise ValueError(
                f"layers: {path!r} holds no kernel parameter with at least 2 axes "
                f"(found {None if node is None else sorted(node)}); remove it from layers"
            )
        if not _bias_fits(node):
            raise ValueError(
                f"layers: {path!r} has a bias of shape {tuple(jnp.shape(node[BIAS]))}, expected "
                f"({jnp.shape(kernel)[-1]},) to match kernel {tuple(jnp.shape(kernel))}; "
                "remove it from layers"
            )
        blocks[path] = BlockSpec(
            path=path,
            kernel_shape=tuple(jnp.shape(kernel)),
            has_bias=BIAS in node,
            dtype=curvature_dtype(jnp.result_type(kernel)),
        )
    return blocks


def to_matrix(layer_params: Mapping[str, jax.Array], spec: BlockSpec) -> jax.Array:
    """``[kernel.reshape(d_in, d_out); bias]`` as a ``(d_in_aug, d_out)`` matrix."""
    kernel = jnp.reshape(layer_params[KERNEL], (spec.d_in, spec.d_out)).astype(spec.dtype)
    if not spec.has_bias:
        return kernel
    return jnp.concatenate([kernel, layer_params[BIAS][None, :].astype(spec.dtype)], axis=0)


def from_matrix(matrix: jax.Array, like: Mapping[str, jax.Array], spec: BlockSpec) -> dict:
    """Inverse of :func:`to_matrix`, with the dtypes of ``like``."""
    kernel = like[KERNEL]
    out = dict(like)
    out[KERNEL] = jnp.reshape(matrix[: spec.d_in], kernel.shape).astype(kernel.dtype)
    if spec.has_bias:
        out[BIAS] = matrix[spec.d_in].astype(like[BIAS].dtype)
    return out


def replace_blocks(tree: Any, new_layers: Mapping[str, Mapping[str, jax.Array]]) -> Any:
    """``tree`` with the leaves of each layer in ``new_layers`` replaced; structure kept."""

    def pick(key_path, leaf):
        layer, name = leaf_location(key_path)
        return new_layers.get(layer, {}).get(name, leaf)

    return jax.tree_util.tree_map_with_path(pick, tree)


def summarize(params: Any, layers: Sequence[str] | None = None) -> str:
    """A readable table of how each parameter is preconditioned.

    Args:
      params: the parameter tree given to ``tx.init``.
      layers: the same ``layers`` argument given to ``scale_by_ekfac``.

    Returns:
      A multi-line string: one row per parameter with its path, shape and
      treatment (``kronecker block`` with the block's size, or ``identity``).
    """
    blocks = find_blocks(params, layers)
    rows = [("parameter", "shape", "preconditioning")]
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        layer, name = leaf_location(key_path)
        spec = blocks.get(layer)
        if spec is not None and (name == KERNEL or (name == BIAS and spec.has_bias)):
            how = f"kronecker block {spec.d_in_aug}x{spec.d_out} of {spec.path or '<root>'}"
        else:
            how = "identity (not preconditioned)"
        rows.append((path_key(key_path), str(tuple(jnp.shape(leaf))), how))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)
