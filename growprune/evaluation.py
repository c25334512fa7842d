"""Evaluate a network, or a masked version of it, without a Trainer.

The evolutionary loop scores thousands of candidate masks of one network. Copying the network
per candidate, or writing each mask into its weights and restoring them, costs more than the
forward pass of a small model. :func:`evaluate` runs the model with masked weights passed in
through :func:`torch.func.functional_call`: the model's own parameters are never touched, so
candidates can be evaluated one after another (or from several threads) on one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from growprune.modes import evaluating


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and mean cross-entropy loss over ``samples`` samples."""

    accuracy: float
    loss: float
    samples: int


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Evaluation:
    """Accuracy and loss of ``model`` on ``batches`` (eval mode, no gradients), optionally masked.

    Args:
        model: the network; it is not modified (its modes are restored afterwards).
        batches: ``(inputs, targets)`` pairs, e.g. a DataLoader or a list of tensors.
        masks: parameter name -> 0/1 tensor of the parameter's shape; the model is evaluated as if
            those parameters were multiplied by their masks. ``None``: the model as it is.

    Raises:
        ValueError: a mask names no parameter of the model or has the wrong shape; no samples.
    """
    parameters = dict(model.named_parameters())
    masked: dict[str, torch.Tensor] = {}
    for name, mask in (masks or {}).items():
        if name not in parameters:
            raise ValueError(f"mask for {name!r}: the model has no such parameter")
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(parameters[name].shape)}")
        masked[name] = parameters[name].detach() * mask.to(parameters[name].device, parameters[name].dtype)
    correct, loss_sum, count = 0, 0.0, 0
    with evaluating(model):
        for inputs, targets in batches:
            logits = functional_call(model, masked, (inputs,)) if masked else model(inputs)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=1) == targets).sum())
            count += int(targets.shape[0])
    if count == 0:
        raise ValueError("evaluate needs at least one sample")
    return Evaluation(accuracy=correct / count, loss=loss_sum / count, samples=count)
