"""ekfac_optax: EKFAC, EKFAC-ra and KFAC as optax gradient transformations.

George, Laurent, Bouthillier, Ballas, Vincent. Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis. NeurIPS 2018.
"""

from ekfac_optax._alias import ekfac, kfac
from ekfac_optax._capture import LayerStats, value_grad_and_stats
from ekfac_optax._checkpoint import restore_state, save_state
from ekfac_optax._layers import find_blocks, summarize
from ekfac_optax._transform import BlockState, ScaleByEkfacState, scale_by_ekfac, scale_by_kfac

__all__ = [
    "BlockState",
    "LayerStats",
    "ScaleByEkfacState",
    "ekfac",
    "find_blocks",
    "kfac",
    "restore_state",
    "save_state",
    "scale_by_ekfac",
    "scale_by_kfac",
    "summarize",
    "value_grad_and_stats",
]
