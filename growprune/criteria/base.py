"""The criterion interface: a criterion scores candidates, higher = more important (kept longer).

Subclass :class:`WeightCriterion` and implement :meth:`WeightCriterion.score_layer` (or
:meth:`WeightCriterion.score` for criteria that look at all layers at once) to add a method;
name the class in a YAML config with ``class_path`` to use it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

Batch = tuple[torch.Tensor, torch.Tensor]


class WeightCriterion:
    """Scores every weight of the given layers (one score tensor per layer, of the weight's shape).

    Attributes:
        requires_data: the criterion needs training batches (the strategy collects them).
    """

    requires_data: bool = False

    def score(self, model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch] | None = None) -> dict[str, torch.Tensor]:
        """Scores for the ``weight`` of each layer in ``layers`` (name -> module)."""
        if self.requires_data and not batches:
            raise ValueError(f"{type(self).__name__} needs training batches to score weights, got none")
        return {name: self.score_layer(name, layer) for name, layer in layers.items()}

    def score_layer(self, name: str, layer: nn.Module) -> torch.Tensor:
        """Score one layer's weights; override this for data-free criteria."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_layer() or score()")

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({arguments})"
