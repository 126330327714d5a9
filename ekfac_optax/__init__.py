"""ekfac_optax: EKFAC, EKFAC-ra, KFAC and KFE-Adam as optax gradient transformations.

George, Laurent, Bouthillier, Ballas, Vincent. Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis. NeurIPS 2018.
"""

from ekfac_optax._accumulate import MultiStepsState, multi_steps
from ekfac_optax._alias import ekfac, grafted_ekfac, kfac, kfe_adam, kfe_adamw
from ekfac_optax._checkpoint import restore_state, save_state
from ekfac_optax._fit import fit_curvature
from ekfac_optax._graft import GraftState, graft
from ekfac_optax._influence import influence, per_example_grads, self_influence
from ekfac_optax._loss_check import check_loss
from ekfac_optax._norm_constraint import ClipByFisherNormState, clip_by_fisher_norm
from ekfac_optax._operator import BlockCurvature, Curvature, curvature
from ekfac_optax._summary import ParameterRow, Summary, summarize, summary
from ekfac_optax._train_state import TrainState
from ekfac_optax.capture._capture import find_blocks, value_grad_and_stats
from ekfac_optax.capture._fisher import TrueFisher
from ekfac_optax.capture._stats import LayerStats
from ekfac_optax.curvature._scalings import AdamSlot
from ekfac_optax.kinds._blocks import Blocks, BlockSpec, block_labels
from ekfac_optax.update._state import BlockState, DiagonalState, EmbedState, ScaleByEkfacState
from ekfac_optax.update._transform import scale_by_ekfac, scale_by_kfac, scale_by_kfe_adam

__all__ = [
    "AdamSlot",
    "BlockCurvature",
    "Blocks",
    "BlockSpec",
    "BlockState",
    "ClipByFisherNormState",
    "DiagonalState",
    "EmbedState",
    "GraftState",
    "LayerStats",
    "MultiStepsState",
    "ParameterRow",
    "ScaleByEkfacState",
    "Summary",
    "TrainState",
    "TrueFisher",
    "block_labels",
    "check_loss",
    "clip_by_fisher_norm",
    "Curvature",
    "curvature",
    "ekfac",
    "find_blocks",
    "fit_curvature",
    "graft",
    "grafted_ekfac",
    "influence",
    "kfac",
    "kfe_adam",
    "kfe_adamw",
    "multi_steps",
    "per_example_grads",
    "restore_state",
    "save_state",
    "scale_by_ekfac",
    "scale_by_kfac",
    "scale_by_kfe_adam",
    "self_influence",
    "summarize",
    "summary",
    "value_grad_and_stats",
]
