"""Model-agnostic edits: masks, optimizer-state surgery, export."""

from growprune.surgery.masks import export_model, keep_masks, load_exported_state_dict, make_permanent, select_layers, sparsity, weight_layers
from growprune.modes import preserved_modes
from growprune.surgery.optimizer import ParameterChange, carry_optimizer_state, repair_training

__all__ = [
    "ParameterChange",
    "carry_optimizer_state",
    "export_model",
    "keep_masks",
    "load_exported_state_dict",
    "make_permanent",
    "preserved_modes",
    "repair_training",
    "select_layers",
    "sparsity",
    "weight_layers",
]
