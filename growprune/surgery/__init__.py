"""Model-agnostic edits of networks.

* :mod:`~growprune.surgery.handlers`: per-layer-type channel surgery (remove AND add), one registry;
* :mod:`~growprune.surgery.changes`: :class:`ParameterChange`, how a changed tensor's entries moved;
* :mod:`~growprune.surgery.channels`: :class:`ChannelGraph`, channel groups (DepGraph) and their surgery;
* :mod:`~growprune.surgery.layers`: layer and cell insertion and removal;
* :mod:`~growprune.surgery.discovery`: every permissible element (channel groups, layers, cells, insertion points);
* :mod:`~growprune.surgery.units`: the unit-level graph (which layer consumes which units);
* :mod:`~growprune.surgery.edits`: the typed edit log and its replay;
* :mod:`~growprune.surgery.masks`, :mod:`~growprune.surgery.optimizer`, :mod:`~growprune.surgery.resize`:
  unstructured masks and export, optimizer repair, resizing to stored shapes.
"""

from growprune.modes import preserved_modes
from growprune.surgery.changes import NEW, ParameterChange
from growprune.surgery.channels import ChannelGraph, ChannelGroup
from growprune.surgery.discovery import PermissibleElements, permissible_elements
from growprune.surgery.edits import (
    AddChannels,
    Edit,
    EditContext,
    EditResult,
    InsertCell,
    InsertLayer,
    MaskWeights,
    RemoveCell,
    RemoveChannels,
    RemoveLayer,
    edit_from_dict,
    register_edit,
    replay,
    replay_log,
)
from growprune.surgery.handlers import LayerHandler, handler_for, register_layer_handler
from growprune.surgery.masks import export_model, keep_masks, load_exported_state_dict, make_permanent, select_layers, sparsity, weight_layers
from growprune.surgery.optimizer import carry_optimizer_state, repair_training

__all__ = [
    "NEW",
    "AddChannels",
    "ChannelGraph",
    "ChannelGroup",
    "Edit",
    "EditContext",
    "EditResult",
    "InsertCell",
    "InsertLayer",
    "LayerHandler",
    "MaskWeights",
    "ParameterChange",
    "PermissibleElements",
    "RemoveCell",
    "RemoveChannels",
    "RemoveLayer",
    "carry_optimizer_state",
    "edit_from_dict",
    "export_model",
    "handler_for",
    "keep_masks",
    "load_exported_state_dict",
    "make_permanent",
    "permissible_elements",
    "preserved_modes",
    "register_edit",
    "register_layer_handler",
    "repair_training",
    "replay",
    "replay_log",
    "select_layers",
    "sparsity",
    "weight_layers",
]
