"""Saving and restoring optimizer states with orbax-checkpoint, with a layer check.

Any pytree holding :class:`ScaleByEkfacState` (an ``opt_state`` of a chain, a
whole train state) saves as it is; restoring first compares the checkpoint's
tree with the expected one, so a model whose layers changed gets an error
that names them instead of an orbax traceback. orbax-checkpoint is the optional extra
``checkpoint`` (``pip install 'ekfac_optax[checkpoint]'``), imported only when called.
"""

import os
from typing import Any

import jax
import numpy as np


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of a pytree of arrays or orbax array metadata."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {
        tuple(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
    }


def _layer_of(path: tuple[str, ...]) -> str:
    """The layer key after ``blocks`` in a state path, or the whole path."""
    if "blocks" in path[:-1]:
        return path[path.index("blocks") + 1]
    return "/".join(path)


def _check_matches(saved: dict, expected: dict, directory: str) -> None:
    only_saved = sorted({_layer_of(p) for p in saved.keys() - expected.keys()})
    only_expected = sorted({_layer_of(p) for p in expected.keys() - saved.keys()})
    differ: dict[str, list[str]] = {}
    for p in sorted(saved.keys() & expected.keys()):
        if saved[p] != expected[p]:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[p], expected[p]
            differ.setdefault(_layer_of(p), []).append(
                f"{p[-1]} {s_dtype}{list(s_shape)} in checkpoint, {e_dtype}{list(e_shape)} expected"
            )
    if only_saved or only_expected or differ:
        layout = (
            "; if the model is the same, the checkpoint was saved by an optimizer with the other "
            "stack_blocks (True: one state entry per group of same-shaped layers, keyed by its "
            "first member; False: one per layer)"
            if (only_saved or only_expected) and not (only_saved and only_expected)
            else ""
        )
        raise ValueError(
            f"checkpoint {directory!r} does not match the optimizer state: "
            f"layers only in the checkpoint {only_saved}, layers only in the model "
            f"{only_expected}, layers with other shapes or dtypes {differ}{layout}"
        )


def _orbax():
    """``orbax.checkpoint``, or an ImportError that names the extra to install."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError(
            "ek.save_state and ek.restore_state need orbax-checkpoint, an optional dependency: "
            "pip install 'ekfac_optax[checkpoint]' (or pip install orbax-checkpoint)"
        ) from error
    return ocp


def save_state(directory: str | os.PathLike, state: Any) -> None:
    """Saves a pytree (e.g. an ``opt_state``) as an orbax checkpoint directory.

    Args:
      directory: the checkpoint directory to create (must not exist).
      state: the pytree of arrays to save.
    """
    ocp = _orbax()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), state)


def restore_state(directory: str | os.PathLike, like: Any) -> Any:
    """Restores a pytree saved by :func:`save_state`, checked against ``like``.

    Args:
      directory: a checkpoint directory written by :func:`save_state`.
      like: a pytree with the expected structure, shapes and dtypes, e.g.
        ``tx.init(params)`` for the current model.

    Returns:
      The restored pytree, with the structure of ``like``.

    Raises:
      ValueError: if the checkpoint's layers, shapes or dtypes differ from
        ``like``'s, naming the mismatching layers.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> import ekfac_optax as ek
      >>> state = {"count": jnp.zeros((), jnp.int32), "w": jnp.ones(3)}
      >>> directory = os.path.join(tempfile.mkdtemp(), "checkpoint")
      >>> ek.save_state(directory, state)
      >>> ek.restore_state(directory, state)["w"]
      Array([1., 1., 1.], dtype=float32)
    """
    ocp = _orbax()
    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(directory).item_metadata.tree
        _check_matches(_flat_shapes(saved), _flat_shapes(like), directory)
        return checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
