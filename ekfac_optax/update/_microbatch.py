"""What each micro-batch of an accumulated step contributes to the preconditioner.

With gradient accumulation (:func:`ekfac_optax.multi_steps`) a real step's batch arrives as
``k`` micro-batches. Everything the preconditioners estimate from a batch is a mean over its
examples, so each micro-batch adds its size ``n_i`` times its own estimate to a :class:`Pending`
sum, and the real step divides by ``Σ n_i``:

- the factors ``A_i``, ``B_i`` of every Kronecker and embedding block;
- EKFAC's ``s*_i`` (and a diagonal block's per-example second moments, where the rule reads
  them), measured in the state's basis, which micro-steps do not change.

The means equal those of one batch of all the examples, so the real step's update is the one of
that batch, exactly, except EKFAC's ``s*`` on a step that changes the basis: the micro-batches'
``s*`` were measured in the old basis and a diagonal does not rotate, so that step measures it
on its last micro-batch alone, in the new basis.

The preconditioner's ``update`` takes the three stages of a real step through its ``stats``
argument (:class:`Allocate`, :class:`Micro`, :class:`Emit`) and its state wrapped in an
:class:`Accumulating` with the sums; ``_accumulate`` drives them.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ekfac_optax.update import _stages, _step


class Pending(NamedTuple):
    """One preconditioner's sums over the micro-batches of the current real step.

    Attributes:
      n: ``()`` int32, the examples accumulated.
      factors: per layer, ``Σ n_i (A_i, B_i)`` (``None``: a diagonal block).
      second_moments: per layer whose rule reads ``s*`` (EKFAC; diagonal blocks of KFAC),
        ``Σ n_i s*_i`` in the state's basis.
    """

    n: jax.Array
    factors: dict[str, Any]
    second_moments: dict[str, jax.Array]


class Accumulating(NamedTuple):
    """A preconditioner's state and its :class:`Pending` sums, as ``update`` takes them."""

    state: Any
    pending: Pending | None


class Allocate(NamedTuple):
    """``stats`` that asks ``update`` for zero sums of the state's shapes."""


class Micro(NamedTuple):
    """``stats`` of a micro-batch that adds to the sums and updates nothing."""

    stats: Any


class Emit(NamedTuple):
    """``stats`` of the last micro-batch: the real step, from the sums and these."""

    stats: Any


def _reads_second_moments(spec, rule) -> bool:
    return spec.block in rule.reads_batch


def zeros(specs, blocks, rule) -> Pending:
    """Zero sums for the layers ``specs`` with states ``blocks``."""
    return Pending(
        n=jnp.zeros([], jnp.int32),
        factors={
            p: None
            if s.block == "diagonal"
            else (jnp.zeros_like(blocks[p].factor_a), jnp.zeros_like(blocks[p].factor_b))
            for p, s in specs.items()
        },
        second_moments={
            p: jnp.zeros_like(blocks[p].scalings)
            for p, s in specs.items()
            if _reads_second_moments(s, rule)
        },
    )


def accumulate(
    pending: Pending, specs, blocks, stats, config, needs_factors=True, always=()
) -> Pending:
    """``pending`` plus what one micro-batch adds: ``n_i`` times its factors and ``s*`` (in
    ``blocks``' bases).

    The factors only where the real step will use them (``needs_factors``, a bool or a ``()``
    bool array, for every layer but those in ``always``, which always add theirs; the sums are
    left as they are otherwise): with ``factor_update_every=m``, a micro-step of the other real
    steps costs the capture, an embedding's factors and, for EKFAC, ``s*``.
    """
    h, delta, attend = _step.statistics(specs, stats)
    n = _step.batch_size(stats)

    def add_weighted(total, tree):
        return jax.tree.map(lambda t, x: t + n * x, total, tree)

    def with_factors(total):
        fresh = {
            p: _stages.batch_factors(specs[p], h[p], delta[p], config, attend.get(p)) for p in total
        }
        return add_weighted(total, fresh)

    factors = dict(pending.factors)
    if needs_factors is True:
        factors = with_factors(factors)
    else:
        factors.update(with_factors({p: factors[p] for p in always}))
        rest = {p: x for p, x in factors.items() if p not in always}
        factors.update(jax.lax.cond(needs_factors, with_factors, lambda t: t, rest))
    second_moments = {
        p: _stages.batch_second_moments(s, blocks[p], h[p], delta[p], attend.get(p))
        for p, s in specs.items()
        if _reads_second_moments(s, config.rule)
    }
    return Pending(pending.n + n, factors, add_weighted(pending.second_moments, second_moments))


def means(total: Pending) -> dict[str, Any]:
    """``n``, ``fresh`` and ``second_moments`` of :class:`~ekfac_optax.update._step.Batch`: the sums
    divided by the examples."""

    def mean(x):
        return x / total.n.astype(x.dtype)

    return dict(
        n=total.n,
        fresh=jax.tree.map(mean, total.factors),
        second_moments=jax.tree.map(mean, total.second_moments),
    )
