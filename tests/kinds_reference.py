"""Independent float64 references for the layer kinds of ``test_kinds.py``.

Nothing here imports ``ekfac_optax``; it builds on ``reference.py`` (per-example gradients by
``jax.vmap(jax.grad(...))``, the hand-written ``Tape`` forward pass, dense ``np.kron`` matrices):

- the first-step EKFAC / EKFAC-ra / KFAC updates of a Kronecker block by dense solves (or, for
  EKFAC-ra, the documented recursion in the eigenbasis of the one-batch factors);
- ``nn.ConvTranspose`` as a convolution of the stride-dilated, padded input: its patches, cut
  out by the explicit loops of ``reference.conv_patches``;
- the K-FAC-reduce factors, the debiased EMA.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref


def assert_distinct(eigvals: np.ndarray, min_gap: float = 1e-6) -> None:
    """The eigenvalues are distinct (relative gap ``>= min_gap``), so that the eigenbasis is
    unique up to signs and EKFAC's ``s*`` is a function of the batch alone: numpy's and JAX's
    ``eigh`` then agree on the eigenvectors to about ``1e-16 / gap``."""
    eigvals = np.sort(np.asarray(eigvals))
    gaps = np.diff(eigvals) / max(eigvals[-1], 1e-300)
    assert gaps.min() >= min_gap, gaps.min()


def kronecker_updates(
    per_example: np.ndarray,
    factor_a: np.ndarray,
    factor_b: np.ndarray,
    positions: int,
    damping: float,
    scaling_decay: float,
    max_cond: float = 1e6,
) -> dict[str, np.ndarray]:
    """First-step updates (``basis_update_every=1``, ``factor_decay=0``) of one block.

    ``per_example`` is ``G_n`` ``(N, a, b)``, ``g = mean_n G_n``, ``factor_a``, ``factor_b`` the
    one-batch factors and ``positions`` the ``T`` of KFAC's ``T · A ⊗ B``.

    - ``"ekfac"``: ``(F_EKFAC + ε I)⁻¹ vec(g)`` (``reference.ekfac_matrix``, dense solve);
    - ``"kfac"``: ``(T A ⊗ B + ε I)⁻¹ vec(g)`` (``reference.kfac_matrix``, dense solve);
    - ``"ekfac-ra"``: the basis update restarts ``s`` from KFAC's ``T S_A ⊗ S_B``, then one
      running step ``s = d T S_A ⊗ S_B + (1 - d) N (U_Aᵀ g U_B)²`` and
      ``U_A [(U_Aᵀ g U_B) / (s + ε)] U_Bᵀ``.

    EKFAC's and EKFAC-ra's are functions of the batch only if the eigenvalues are distinct
    (asserted).
    """
    grad = per_example.mean(axis=0)
    n = per_example.shape[0]
    eigvals_a, basis_a = np.linalg.eigh(factor_a)
    eigvals_b, basis_b = np.linalg.eigh(factor_b)
    assert_distinct(eigvals_a)
    assert_distinct(eigvals_b)
    ekfac = ref.ekfac_matrix(per_example, factor_a, factor_b, positions, damping, "tikhonov")
    kfac = ref.kfac_matrix(factor_a, factor_b, positions, damping, "tikhonov")
    for matrix in (ekfac, kfac):
        assert np.linalg.cond(matrix) < max_cond
    grad_kfe = basis_a.T @ grad @ basis_b
    scalings = scaling_decay * positions * np.outer(eigvals_a, eigvals_b)
    scalings = scalings + (1 - scaling_decay) * n * grad_kfe**2
    assert (scalings.max() + damping) / (scalings.min() + damping) < max_cond
    return {
        "ekfac": ref.solve(ekfac, grad),
        "ekfac-ra": basis_a @ (grad_kfe / (scalings + damping)) @ basis_b.T,
        "kfac": ref.solve(kfac, grad),
    }


def reduce_factors(h: np.ndarray, delta: np.ndarray, has_bias: bool):
    """K-FAC-reduce: ``A = mean_n hbar_n hbar_nᵀ``, ``B = mean_n dbar_n dbar_nᵀ`` with
    ``hbar_n = mean_t h_aug_{n,t}`` and ``dbar_n = sum_t delta_{n,t}``."""
    h_bar = ref.augment(h, has_bias).mean(axis=1)
    d_bar = np.asarray(delta).sum(axis=1)
    n = h_bar.shape[0]
    return h_bar.T @ h_bar / n, d_bar.T @ d_bar / n


def debiased_ema(values: list, decay: float) -> list:
    """``m_k / (1 - d^k)`` for ``m_k = d m_{k-1} + (1 - d) x_k``, ``m_0 = 0``, ``k = 1, 2, ...``."""
    out, average = [], 0.0
    for k, value in enumerate(values, start=1):
        average = decay * average + (1 - decay) * value
        out.append(average / (1 - decay**k))
    return out


# --- nn.ConvTranspose as a convolution of the dilated input ---------------------------------------


def _per_axis(value: Any, rank: int) -> tuple:
    value = 1 if value is None else value
    return (value,) * rank if isinstance(value, int) else tuple(value)


def conv_transpose_pads(padding: Any, kernel_size: tuple, strides: tuple, dilation: tuple):
    """The ``(lo, hi)`` padding of the stride-dilated input, per spatial axis.

    ``lax.conv_transpose``'s rule for the string paddings, on the dilated kernel extent ``k``
    and stride ``s``: ``"SAME"`` pads ``k + s - 2`` in all, ``k - 1`` before when ``s > k - 1``
    and ``ceil((k + s - 2) / 2)`` before otherwise; ``"VALID"`` pads ``k + s - 2 + max(k - s, 0)``
    in all, ``k - 1`` before. Explicit pairs are the padding of the dilated input itself.
    (Checked by ``test_conv_transpose_hand_forward_is_flax``, which compares the hand-written
    forward pass with Flax's output.)
    """
    if not isinstance(padding, str):
        return [tuple(p) for p in padding]
    pads = []
    for size, stride, dil in zip(kernel_size, strides, dilation, strict=True):
        extent = (size - 1) * dil + 1
        if padding == "SAME":
            total = extent + stride - 2
            lo = extent - 1 if stride > extent - 1 else math.ceil(total / 2)
        elif padding == "VALID":
            total = extent + stride - 2 + max(extent - stride, 0)
            lo = extent - 1
        else:
            raise ValueError(padding)
        pads.append((lo, total - lo))
    return pads


def conv_transpose_patches(
    x: jax.Array, kernel_size: tuple, strides: Any, padding: Any, dilation: Any
) -> jax.Array:
    """The patches of ONE example ``x`` ``(*spatial, c_in)`` seen by a transposed convolution.

    ``nn.ConvTranspose`` is a stride-1 convolution of the input dilated by the strides (``s - 1``
    zeros between neighbours) and padded as in :func:`conv_transpose_pads`, with the
    "effective" kernel (:func:`effective_kernel`). The patches are cut out by
    ``reference.conv_patches`` (explicit loops over the kernel offsets).
    """
    rank = len(kernel_size)
    strides, dilation = _per_axis(strides, rank), _per_axis(dilation, rank)
    dilated_shape = tuple((n - 1) * s + 1 for n, s in zip(x.shape[:-1], strides, strict=True))
    dilated = jnp.zeros((*dilated_shape, x.shape[-1]), x.dtype)
    dilated = dilated.at[tuple(slice(None, None, s) for s in strides)].set(x)
    pads = conv_transpose_pads(padding, kernel_size, strides, dilation)
    return ref.conv_patches(dilated, kernel_size, strides=1, padding=pads, dilation=dilation)


def effective_kernel(kernel: Any, transpose_kernel: bool, batched: bool = False) -> Any:
    """The kernel ``(*kernel_size, c_in, c_out)`` that convolves the dilated input.

    ``transpose_kernel=False``: the kernel itself (``(*k, c_in, c_out)``). ``True``: the Flax
    kernel is ``(*k, c_out, c_in)``; flipped along its spatial axes, with the channel axes
    swapped. ``batched``: a leading axis ``N`` (per-example gradients).
    """
    if not transpose_kernel:
        return kernel
    lead = 1 if batched else 0
    spatial = tuple(range(lead, kernel.ndim - 2))
    return jnp.swapaxes(jnp.flip(kernel, axis=spatial), -1, -2)
