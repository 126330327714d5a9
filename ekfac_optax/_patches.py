"""SUA input patches of convolutions and transposed convolutions.

A convolution is a matrix product of each output position's input patch with
``kernel.reshape(-1, c_out)``; the patches are cut out of the padded (and
dilated) input with one strided slice per kernel offset (memory copies only,
several times faster on CPU than the equivalent depthwise identity
convolution). Features are offset-major, channel-minor, so patch feature ``f``
is row ``f`` of ``kernel.reshape(-1, c_out)``.
"""

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static geometry of a convolution, as ``lax.conv_general_dilated`` takes it.

    Attributes:
      kernel_size: spatial kernel shape.
      strides: window strides.
      padding: a string (``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``,
        ``"CAUSAL"``) or explicit ``(lo, hi)`` pairs.
      input_dilation: ``lhs_dilation`` (the strides of a transposed convolution).
      kernel_dilation: ``rhs_dilation``.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]


def _per_axis(value: Any, rank: int) -> tuple[int, ...]:
    value = 1 if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _hashable(padding: Any) -> Any:
    """A padding string as it is, explicit pairs as a tuple of tuples (a spec is hashed)."""
    return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def _kernel_size(module: Any) -> tuple[int, ...]:
    size = module.kernel_size
    return (size,) if isinstance(size, int) else tuple(size)


def conv_geometry(module: Any) -> Geometry:
    """The geometry of an ``nn.Conv``."""
    kernel_size = _kernel_size(module)
    rank = len(kernel_size)
    return Geometry(
        kernel_size=kernel_size,
        strides=_per_axis(module.strides, rank),
        padding=_hashable(canonicalize_padding(module.padding, rank)),
        input_dilation=_per_axis(module.input_dilation, rank),
        kernel_dilation=_per_axis(module.kernel_dilation, rank),
    )


def _transpose_pads(extent: int, stride: int, padding: Any) -> tuple[int, int]:
    """The padding ``lax.conv_transpose`` gives the dilated input (``_conv_transpose_padding``)."""
    if padding == "SAME":
        total = extent + stride - 2
        lo = extent - 1 if stride > extent - 1 else int(np.ceil(total / 2))
    elif padding == "VALID":
        total = extent + stride - 2 + max(extent - stride, 0)
        lo = extent - 1
    else:
        raise ValueError(f"unsupported transposed-convolution padding {padding!r}")
    return lo, total - lo


def conv_transpose_geometry(module: Any) -> Geometry:
    """The geometry of an ``nn.ConvTranspose`` as the convolution ``lax.conv_transpose`` runs.

    ``lax.conv_transpose`` is a convolution with unit window strides of the input
    dilated by the strides; ``"SAME"``/``"VALID"`` become explicit paddings, explicit
    pairs are used as they are.
    """
    kernel_size = _kernel_size(module)
    rank = len(kernel_size)
    strides = _per_axis(module.strides, rank)
    kernel_dilation = _per_axis(module.kernel_dilation, rank)
    padding = canonicalize_padding(module.padding, rank)
    if isinstance(padding, str):
        extents = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        padding = tuple(
            _transpose_pads(e, s, padding) for e, s in zip(extents, strides, strict=True)
        )
    return Geometry(
        kernel_size=kernel_size,
        strides=(1,) * rank,
        padding=tuple(tuple(p) for p in padding),
        input_dilation=strides,
        kernel_dilation=kernel_dilation,
    )


def patches(geometry: Geometry, x: jax.Array) -> jax.Array:
    """SUA input patches, ``(batch..., positions..., prod(kernel_size) * c_in)``.

    The input is padded (and dilated) as ``nn.Conv`` does — CIRCULAR, REFLECT
    and CAUSAL pad it as Flax does before a VALID convolution; string paddings
    resolve as in ``lax.conv_general_dilated`` (``lax.padtype_to_pads`` on the
    undilated input) — and each kernel offset's window is one strided slice.
    """
    kernel_size, strides = geometry.kernel_size, geometry.strides
    rank = len(kernel_size)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel_size, geometry.kernel_dilation, strict=True)]
    n_batch = x.ndim - rank - 1
    padding = geometry.padding
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        pads = [((e - 1) // 2, e // 2) for e in extent]
        pads = [(extent[0] - 1, 0)] if padding == "CAUSAL" else pads
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect", "CAUSAL": "constant"}[padding]
        x = jnp.pad(x, [(0, 0)] * n_batch + pads + [(0, 0)], mode=mode)
        padding = "VALID"
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[n_batch:-1], extent, strides, padding)
    edges = [(lo, hi, d - 1) for (lo, hi), d in zip(padding, geometry.input_dilation, strict=True)]
    unpadded = [(0, 0, 0)] * n_batch
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), unpadded + edges + [(0, 0, 0)])
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[n_batch:-1], extent, strides, strict=True)]
    windows = []
    for offset in itertools.product(*map(range, kernel_size)):
        start = [o * d for o, d in zip(offset, geometry.kernel_dilation, strict=True)]
        limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides, strict=True)]
        windows.append(
            jax.lax.slice(
                x,
                (0,) * n_batch + (*start, 0),
                (*x.shape[:n_batch], *limit, x.shape[-1]),
                (1,) * n_batch + (*strides, 1),
            )
        )
    return jnp.concatenate(windows, axis=-1)
