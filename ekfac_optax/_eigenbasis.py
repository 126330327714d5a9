"""PSD-safe eigendecomposition and the map to and from the Kronecker-factored eigenbasis."""

import jax
import jax.numpy as jnp


def safe_eigh(factor: jax.Array, fallback_eigvals: jax.Array, fallback_basis: jax.Array):
    """Eigendecomposition of a symmetric PSD factor, robust to round-off and NaN.

    Symmetrises ``(M + Mᵀ) / 2``, computes ``eigh`` and clips the eigenvalues
    at zero (round-off makes tiny ones negative). If the factor or the result
    is not finite, the fallback pair is returned unchanged. ``eigh`` always
    receives a finite matrix (non-finite entries are zeroed in the same pass
    that symmetrises: cheaper than selecting a stand-in after a reduction).

    Args:
      factor: ``(d, d)`` symmetric positive semi-definite matrix.
      fallback_eigvals: ``(d,)`` eigenvalues to keep if the decomposition fails.
      fallback_basis: ``(d, d)`` basis to keep if the decomposition fails.

    Returns:
      ``(eigvals, basis, ok)``: ``factor ≈ basis @ diag(eigvals) @ basisᵀ``, with
      ascending ``eigvals >= 0``, and whether the new pair was used.
    """
    if factor.ndim != 2 or factor.shape[0] != factor.shape[1]:
        raise ValueError(f"safe_eigh expects a square matrix, got shape {factor.shape}")
    finite_in = jnp.all(jnp.isfinite(factor))
    sym = jnp.nan_to_num((factor + factor.T) / 2)
    eigvals, basis = jnp.linalg.eigh(sym, symmetrize_input=False)
    ok = finite_in & jnp.all(jnp.isfinite(eigvals)) & jnp.all(jnp.isfinite(basis))
    eigvals = jnp.where(ok, jnp.maximum(eigvals, 0), fallback_eigvals)
    basis = jnp.where(ok, basis, fallback_basis)
    return eigvals, basis, ok


def to_eigenbasis(matrix: jax.Array, basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
    """``U_Aᵀ M U_B`` for a ``(d_in_aug, d_out)`` matrix ``M``."""
    return basis_a.T @ matrix @ basis_b


def from_eigenbasis(matrix: jax.Array, basis_a: jax.Array, basis_b: jax.Array) -> jax.Array:
    """``U_A M U_Bᵀ``, the inverse of :func:`to_eigenbasis`."""
    return basis_a @ matrix @ basis_b.T


def inputs_to_eigenbasis(h: jax.Array, basis_a: jax.Array, has_bias: bool) -> jax.Array:
    """``h_aug @ U_A`` for ``(..., d_in)`` inputs, without materialising ``h_aug = [h; 1]``."""
    d = h.shape[-1]
    projected = h @ basis_a[:d]
    return projected + basis_a[d] if has_bias else projected
