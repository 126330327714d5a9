"""Stage 3, curvature.

The factors ``A``, ``B`` (``_factors``), their eigenbases (``_eigenbasis``) and the scalings in
it, one rule per preconditioner (``_scalings``).
"""
