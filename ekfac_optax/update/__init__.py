"""Stage 4, update.

A block's stages (``_stages``), a step's named stages (``_step``, ``_stacking``), the checks
(``_validation``), micro-batches (``_microbatch``) and the transformations and their states
(``_transform``).
"""
