"""Stage 2, kinds.

The layer-kind table (``_kinds``), convolution patches (``_patches``) and block specs
(``_blocks``): how a layer becomes a block.
"""
