"""Stage 1, capture.

A model's blocks and each block's ``h`` and ``delta`` (linen: ``_capture``; NNX: ``_nnx``; the
taps they share: ``_probes``; ``LayerStats``: ``_stats``).
"""
