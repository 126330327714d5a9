"""One update of the preconditioners as named stages over all blocks, each callable on its own.

``scale_by_ekfac``'s update is these stages in order (``benchmarks/step_cost.py`` times each
one, the library's own functions, next to its flop model):

1. :func:`prepare`: this batch's statistics and gradient matrices in the curvature dtype, per
   layer and per group of blocks computed as one (``_stacking``).
2. :func:`factors`: each layer's factors of this batch, averaged into the state.
3. :func:`basis`: the eigenbases of the factors (amortized: every ``basis_update_every``
   updates); the scalings restart from KFAC's eigenvalues.
4. :func:`precondition`: the scalings of the rule and ``U_A [(U_Aᵀ g U_B) / (s + damping)]
   U_Bᵀ`` per block.
5. :func:`guard`: whether everything that can become non-finite is finite (the update then
   applies; else it changes nothing but ``skipped``).

The capture (forward and backward with the statistics) comes before, in
``value_grad_and_stats``; the fallback (``_stages.fallback``) and the write-back after.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.curvature import _scalings
from ekfac_optax.kinds import _blocks, _kinds
from ekfac_optax.update import _stacking, _stages


class Batch(NamedTuple):
    """One update's inputs, prepared once by :func:`prepare`.

    Attributes:
      specs: per layer, its block (in the curvature dtype).
      groups: the groups of blocks computed as one, keyed by their first member.
      layer_h: per layer, ``h`` in the curvature dtype (an embedding's: its token ids).
      layer_delta: per layer, ``delta`` in the curvature dtype.
      attend: per tied embedding (never grouped), its attend calls' ``(h, delta)``.
      h: per group, its members' ``h`` stacked.
      delta: per group, its members' ``delta`` stacked.
      grads: per group, its members' gradient matrices ``[W; b]`` stacked.
      n: the batch size (accumulated: the examples of all micro-batches, an array).
      count: the number of updates applied so far.
      damping: this update's damping.
      embedding_damping: this update's damping of the embeddings' blocks.
      fresh: per layer, the factors of the micro-batches accumulated for this update
        (``_microbatch``); ``None``: computed from this batch's statistics.
      second_moments: per group, the ``s*`` accumulated in the state's basis, for the blocks
        whose rule reads it; ``None``: measured on this batch.
      refreshed: ``()`` bool, whether this update changes the basis (read only with
        ``second_moments``).
    """

    specs: dict[str, _blocks.BlockSpec]
    groups: dict[str, _stacking.Group]
    layer_h: dict[str, jax.Array]
    layer_delta: dict[str, jax.Array]
    attend: dict[str, tuple[jax.Array, jax.Array]]
    h: dict[str, jax.Array]
    delta: dict[str, jax.Array]
    grads: dict[str, jax.Array]
    n: int
    count: jax.Array
    damping: Any
    embedding_damping: Any
    fresh: dict[str, Any] | None = None
    second_moments: dict[str, Any] | None = None
    refreshed: Any = None

    def damping_of(self, spec: _blocks.BlockSpec) -> Any:
        """The damping of a block: :attr:`embedding_damping` for an embedding's."""
        return self.embedding_damping if spec.block == "embed" else self.damping

    @property
    def group_specs(self) -> dict[str, _blocks.BlockSpec]:
        """Per group, its (stacked) block."""
        return {key: g.spec for key, g in self.groups.items()}


def statistics(specs, stats) -> tuple[dict, dict, dict]:
    """``(h, delta, attend)`` per layer in the curvature dtype (an embedding's ``h``: its token
    ids; ``attend``: per tied embedding, its attend calls' ``(h, delta)``)."""
    h = {
        p: stats[p].h if s.block == "embed" else stats[p].h.astype(s.dtype)
        for p, s in specs.items()
    }
    delta = {p: stats[p].delta.astype(s.dtype) for p, s in specs.items()}
    attend = {
        p: (stats[p].attend_h.astype(s.dtype), stats[p].attend_delta.astype(s.dtype))
        for p, s in specs.items()
        if s.tied
    }
    return h, delta, attend


def batch_size(stats) -> int:
    """The number of examples ``N`` of a batch's statistics (1 without any block)."""
    return next((s.delta.shape[-3] for s in stats.values()), 1)


def prepare(
    specs, updates, stats, count, damping, embedding_damping, stack_blocks: bool, **accumulated
) -> Batch:
    """Stage 1: this batch's statistics and gradient matrices, per layer and per group
    (``accumulated``: :class:`Batch`'s ``n``, ``fresh``, ``second_moments`` (per layer) and
    ``refreshed`` of several micro-batches, ``_microbatch``)."""
    h, delta, attend = statistics(specs, stats)
    grads = {p: _kinds.to_matrix(_blocks.subtree(updates, p), s) for p, s in specs.items()}
    groups = _stacking.group(specs, h, delta, stack_blocks)
    if accumulated.get("second_moments") is not None:
        moments = accumulated["second_moments"]  # the blocks whose rule reads s*: whole groups
        accumulated["second_moments"] = _stacking.stack(
            {key: g for key, g in groups.items() if key in moments}, moments
        )
    return Batch(
        specs=dict(specs),
        groups=groups,
        layer_h=h,
        layer_delta=delta,
        attend=attend,
        h=_stacking.stack(groups, h),
        delta=_stacking.stack(groups, delta),
        grads=_stacking.stack(groups, grads),
        n=accumulated.pop("n", batch_size(stats)),
        count=count,
        damping=damping,
        embedding_damping=embedding_damping,
        **accumulated,
    )


def factors(
    batch: Batch,
    blocks: Mapping[str, Any],
    config: _stages.Config,
    count: Any = None,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Stage 2: the groups' states with this batch's factors averaged in (``count``: the factor
    updates before this one, by default ``batch.count``; ``keys``: only these groups, by default
    all; the others are returned as they are).

    Each layer's factors come from its own statistics (one matmul each: as fast as a batched
    one on a CPU, and the statistics are not copied), then are stacked per group. Computed from
    a group's stacked statistics instead, the 12-block LM of ``benchmarks/depth.py`` stepped in
    264 ms instead of 225 and compiled in 10.0 s instead of 8.7 (2-core CPU).
    """
    groups = {key: batch.groups[key] for key in (batch.groups if keys is None else keys)}
    members = [p for g in groups.values() for p in g.members]
    fresh = _stacking.stack(groups, batch.fresh or layer_factors(batch, config, members))
    new = dict(blocks)
    for key in groups:
        new[key] = _stages.new_factors(
            blocks[key], fresh[key], batch.count if count is None else count, config
        )
    return new


def layer_factors(
    batch: Batch, config: _stages.Config, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per layer (``layers``, by default all), this batch's factors ``(A, B)`` (``None``: a
    diagonal block)."""
    return {
        p: _stages.batch_factors(
            batch.specs[p], batch.layer_h[p], batch.layer_delta[p], config, batch.attend.get(p)
        )
        for p in (batch.specs if layers is None else layers)
    }


def factors_every_update(spec: _blocks.BlockSpec) -> bool:
    """Whether a block's factors are averaged in on every update, also with
    ``factor_update_every > 1``: an embedding's. Its input side is the frequency of each token
    in the batch, a diagonal that costs a count, and a batch sees only some of the tokens: from
    every m-th batch alone, a token seen only in the others keeps a zero frequency, and its
    row's step is divided by the damping alone. Measured on the LM at a vocabulary of 8,192 of
    ``benchmarks/defaults.py`` (grafted EKFAC-ra, basis every 10, lr 3e-2): factors every 10
    updates ended at 5.31 against 4.60 every update, 4.63 with the embedding's every update."""
    return spec.block == "embed"


def basis(batch: Batch, blocks: Mapping[str, Any], mesh, config: _stages.Config) -> dict:
    """Stage 3: the groups' states with the eigenbases of their factors (``_stages.new_bases``)."""
    return _stages.new_bases(batch.group_specs, blocks, batch.h, mesh, config, batch.count)


def precondition(batch: Batch, blocks: Mapping[str, Any], config: _stages.Config):
    """Stage 4: ``(updates, new states)`` per group: each block's scalings and its
    preconditioned gradient matrix (``_stages.precondition``)."""
    updates, new = {}, dict(blocks)
    for key, spec in batch.group_specs.items():
        updates[key], new[key] = _stages.precondition(
            spec,
            blocks[key],
            batch.grads[key],
            batch.h[key],
            batch.delta[key],
            batch.n,
            batch.count,
            batch.damping_of(spec),
            config,
            batch.attend.get(key),
            None if batch.second_moments is None else batch.second_moments.get(key),
            batch.refreshed,
        )
    return updates, new


def guard(
    batch: Batch, updates, blocks, one_batch: bool, rule: _scalings.ScalingRule, extra: Any = ()
) -> jax.Array:
    """Stage 5: whether this update's results (and ``extra``: the fallback's) are finite.

    What can become non-finite is checked once, and only where it shows: the preconditioned
    updates; the new scalings (the rule's :meth:`~_scalings.ScalingRule.may_overflow`
    part of its slot: a scaling that overflowed to inf gives a zero update, not a non-finite
    one); the new factors' diagonals. A factor is a mean of Gram matrices ``h hᵀ`` (the moving
    average of them), whose largest entries sit on its diagonal (``|A_ij| <= √(A_ii A_jj)``), so
    a non-finite or overflowing factor has a non-finite diagonal: ``a + b`` numbers checked
    instead of ``a² + b²``. A non-finite input shows in what it feeds: ``h`` and ``delta`` in the
    factors' diagonals (every update, unless ``factor_decay=0``: ``one_batch``) and the batch
    ``s*``, the gradients in the preconditioned updates; the statistics that may feed nothing
    (diagonal blocks, one-batch factors) are checked themselves. The eigenvalues and bases are
    not: ``safe_eigh`` keeps the previous pair when a decomposition is not finite. Each array
    checked is a kernel to compile and a pass over memory (a 12-block LM's update compiled in
    13.2 s with every array checked, 9.5 s with the factors whole, 5.1 s unchecked).
    """
    unfed = {
        key: (batch.h[key], batch.delta[key], batch.attend.get(key))
        for key, spec in batch.group_specs.items()
        if one_batch or spec.block == "diagonal"
    }
    may_overflow = []
    for key, spec in batch.group_specs.items():
        block = blocks[key]
        may_overflow.append(rule.may_overflow(block.scalings))
        if spec.block == "diagonal":
            continue
        for factor, diagonal in (
            (block.factor_a, spec.diagonal_a),
            (block.factor_b, spec.diagonal_b),
        ):
            may_overflow.append(factor if diagonal else jnp.diagonal(factor, axis1=-2, axis2=-1))
    return all_finite((unfed, updates, may_overflow, extra))


def all_finite(tree: Any) -> jax.Array:
    """Whether every number in ``tree`` is finite, as a ``()`` bool.

    One fused reduction per array, ``isfinite(Σ_arrays Σ x)`` (summed in at least float32): a
    NaN or an infinity makes the total NaN or infinite (``inf - inf`` is NaN), so nothing
    non-finite passes. ``all(isfinite(x))``, whose boolean array XLA writes out before reducing
    it, took 2.8x the time of the sum on four float32 arrays of 1025 x 1024 (1.28 ms against
    0.46 on the 2-core CPU). The price: an
    array of finite numbers whose sum overflows (float32: ``Σ|x| > 3.4e38``, entries around
    ``1e32`` in a million) counts as non-finite, a step no one wants applied either.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    dtype = jnp.result_type(jnp.float32, *leaves)
    return jnp.isfinite(sum(jnp.sum(x, dtype=dtype) for x in leaves))


def select(finite: jax.Array, applied: Any, rejected: Any) -> Any:
    """``applied`` if ``finite`` else ``rejected`` (trees of one structure): one ``jnp.where`` per
    array, on ``finite`` computed once.

    Not ``lax.cond(finite, lambda: applied, lambda: rejected)``: XLA copies a branch's operands
    into the conditional's results, a pass over every array of the new state on every step
    (+21% of a 1024-wide MLP's EKFAC-ra step at batch 128, +19% of KFAC's, against a step
    without the guard: ``benchmarks/guard_cost.py``). ``finite`` itself
    comes out of a trivial ``lax.cond``, which XLA does not fuse into its users: otherwise it
    fuses the chain of checks behind ``finite`` into each array's select, a program (and a
    compile time) growing with arrays times checks (a 2-block LM's step compiled in 4.4 s
    instead of 3.0, a 12-block one's in 118 s instead of 11; ``lax.optimization_barrier`` did
    not stop it).
    """
    finite = jax.lax.cond(finite, lambda: jnp.asarray(True), lambda: jnp.asarray(False))
    return jax.tree.map(lambda a, r: jnp.where(finite, a, r), applied, rejected)
