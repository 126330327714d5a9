"""``LayerStats``: what a captured layer saw in one batch, as the optimizer reads it."""

from typing import NamedTuple

import jax


class LayerStats(NamedTuple):
    """What a block's layer saw in one batch; positions ``t`` are conv output
    positions, extra input axes (e.g. sequence) and repeated calls of a shared
    module, concatenated.

    Attributes:
      h: ``(*stack, N, T, d_in)`` inputs without the bias coordinate (conv:
        SUA patches, flattened in the order of the block matrix's rows, held as
        :class:`~ekfac_optax.kinds._patches.Patches` of the padded input, which
        ``np.asarray`` or ``.dense()`` materialise; normalisation layers: the
        normalised input ``x̂``), or ``(N, T)`` integer token ids for an embedding.
      delta: ``(*stack, N, T, d_out)`` gradients of the per-example loss with
        respect to the layer outputs (``N`` times the gradient of the mean loss;
        normalisation layers: ``d_out`` is the number of features).
      attend_h: a tied embedding's (an ``nn.Embed`` also called through ``attend``)
        ``(N, S, d)`` inputs of its attend calls; ``None`` for every other block.
      attend_delta: ``(N, S, vocab)`` gradients of the per-example loss with respect to the
        attend calls' outputs (the logits); ``None`` for every other block.
    """

    h: jax.Array
    delta: jax.Array
    attend_h: jax.Array | None = None
    attend_delta: jax.Array | None = None
