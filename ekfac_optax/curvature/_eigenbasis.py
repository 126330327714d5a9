"""PSD-safe eigendecomposition and the map to and from the Kronecker-factored eigenbasis."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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


def eigh_each(factors: jax.Array, fallback_eigvals: jax.Array, fallback_bases: jax.Array):
    """:func:`safe_eigh` of each ``(d, d)`` factor of a ``(k, d, d)`` stack, one LAPACK call each.

    Never a batched ``eigh``: on CPU, jaxlib's batched LAPACK kernels split a large batch
    into chunks, schedule them on XLA's intra-op thread pool and block that pool's thread
    until they are done (``ParallelBatchMap``); when XLA runs as many such kernels at once as
    the pool has threads (two on a 2-core machine; blocks of ``nn.scan``-stacked layers),
    every thread waits for chunks that no thread is left to run, and the step never ends. A
    ``lax.map`` (a loop) of single-matrix calls runs each decomposition inline, so it cannot
    wait on the pool; independent stacks still run side by side.
    """
    return jax.lax.map(lambda args: safe_eigh(*args), (factors, fallback_eigvals, fallback_bases))


def eigh_all(
    factors: Sequence[jax.Array],
    fallbacks: Sequence[tuple[jax.Array, jax.Array]],
    mesh: Mesh | None = None,
) -> list[tuple[jax.Array, jax.Array]]:
    """:func:`safe_eigh` of every factor, spread over the devices of ``mesh``.

    A factor of shape ``(*stack, d, d)`` is a stack of factors (one single-matrix ``eigh``
    per member in a loop, :func:`eigh_each`). Without a mesh (or with one device), one call
    per factor or stack.
    With a ``mesh`` of more than one device, same-shaped factors (the members of
    stacks included) are stacked and the stack is split along the stack axis over
    all the mesh's devices (``shard_map``; padded with identities to a multiple of
    the device count), so every factor is decomposed on one device only; the
    results are then replicated (an all-gather of the eigenvalues and eigenvectors).

    Args:
      factors: ``(d, d)`` or ``(*stack, d, d)`` symmetric PSD matrices.
      fallbacks: per factor, the ``(eigvals, basis)`` to keep if its decomposition fails
        (with the factor's leading axis).
      mesh: the devices to spread the decompositions over; ``None`` decomposes every factor on
        every device that runs the computation.

    Returns:
      Per factor, ``(eigvals, basis)`` as :func:`safe_eigh` returns them.
    """
    # Stacks of any rank as one leading axis.
    leads = [f.shape[:-2] for f in factors]
    factors = [
        f.reshape(-1, *f.shape[-2:]) if lead else f for f, lead in zip(factors, leads, strict=True)
    ]
    fallbacks = [
        (v.reshape(-1, v.shape[-1]), b.reshape(-1, *b.shape[-2:])) if lead else (v, b)
        for (v, b), lead in zip(fallbacks, leads, strict=True)
    ]
    if mesh is None or mesh.size == 1:
        out = [
            (eigh_each if f.ndim == 3 else safe_eigh)(f, *fallback)[:2]
            for f, fallback in zip(factors, fallbacks, strict=True)
        ]
    else:
        members, owners = [], []
        for i, (factor, (vals, basis)) in enumerate(zip(factors, fallbacks, strict=True)):
            if factor.ndim == 3:
                members += [(factor[g], (vals[g], basis[g])) for g in range(factor.shape[0])]
                owners += [i] * factor.shape[0]
            else:
                members.append((factor, (vals, basis)))
                owners.append(i)
        decomposed = _eigh_spread([m[0] for m in members], [m[1] for m in members], mesh)
        out = []
        for i, factor in enumerate(factors):
            mine = [d for d, owner in zip(decomposed, owners, strict=True) if owner == i]
            if factor.ndim == 3:
                out.append((jnp.stack([v for v, _ in mine]), jnp.stack([b for _, b in mine])))
            else:
                out.append(mine[0])
    return [
        (v.reshape(*lead, v.shape[-1]), b.reshape(*lead, *b.shape[-2:])) if lead else (v, b)
        for (v, b), lead in zip(out, leads, strict=True)
    ]


def _eigh_spread(factors, fallbacks, mesh: Mesh) -> list[tuple[jax.Array, jax.Array]]:
    """:func:`eigh_all` of ``(d, d)`` factors over a mesh of more than one device."""
    groups: dict[tuple, list[int]] = {}
    for i, factor in enumerate(factors):
        groups.setdefault((factor.shape, factor.dtype), []).append(i)
    replicated = NamedSharding(mesh, PartitionSpec())
    spread = PartitionSpec(mesh.axis_names)
    decompose = jax.shard_map(
        eigh_each, mesh=mesh, in_specs=spread, out_specs=spread, check_vma=False
    )
    out: list = [None] * len(factors)
    for (shape, dtype), members in groups.items():
        pad = -len(members) % mesh.size
        eye = jnp.broadcast_to(jnp.eye(shape[0], dtype=dtype), (pad, *shape))
        stack = jnp.concatenate([jnp.stack([factors[i] for i in members]), eye])
        fallback_vals = jnp.concatenate(
            [jnp.stack([fallbacks[i][0] for i in members]), jnp.zeros((pad, shape[0]), dtype)]
        )
        fallback_bases = jnp.concatenate([jnp.stack([fallbacks[i][1] for i in members]), eye])
        # Replicated inputs: each device slices its share locally (left to itself, XLA's
        # sharding propagation may build the stack sharded and gather it first).
        stack, fallback_vals, fallback_bases = jax.lax.with_sharding_constraint(
            (stack, fallback_vals, fallback_bases), replicated
        )
        vals, bases, _ = decompose(stack, fallback_vals, fallback_bases)
        vals, bases = jax.lax.with_sharding_constraint((vals, bases), replicated)
        for j, i in enumerate(members):
            out[i] = (vals[j], bases[j])
    return out


def to_eigenbasis(matrix: jax.Array, basis_a: jax.Array | None, basis_b: jax.Array | None):
    """``U_Aᵀ M U_B`` for a ``(d_in_aug, d_out)`` matrix ``M``; a ``None`` basis is the
    identity (a side kept diagonal)."""
    if basis_a is not None:
        matrix = basis_a.T @ matrix
    return matrix if basis_b is None else matrix @ basis_b


def from_eigenbasis(matrix: jax.Array, basis_a: jax.Array | None, basis_b: jax.Array | None):
    """``U_A M U_Bᵀ``, the inverse of :func:`to_eigenbasis`."""
    if basis_a is not None:
        matrix = basis_a @ matrix
    return matrix if basis_b is None else matrix @ basis_b.T


def inputs_to_eigenbasis(h: jax.Array, basis_a: jax.Array | None, has_bias: bool) -> jax.Array:
    """``h_aug @ U_A`` for ``(..., d_in)`` inputs, without materialising ``h_aug = [h; 1]``
    (but for ``U_A = I``, ``basis_a=None``: then ``h_aug`` itself)."""
    if basis_a is None:
        ones = jnp.ones((*h.shape[:-1], 1), h.dtype)
        return jnp.concatenate([h, ones], axis=-1) if has_bias else h
    d = h.shape[-1]
    projected = h @ basis_a[:d]
    return projected + basis_a[d] if has_bias else projected


def outputs_to_eigenbasis(delta: jax.Array, basis_b: jax.Array | None) -> jax.Array:
    """``delta @ U_B`` for ``(..., d_out)`` output gradients (``None``: ``U_B = I``)."""
    return delta if basis_b is None else delta @ basis_b
