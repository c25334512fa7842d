"""Leave a model as it was found: train/eval modes and ``requires_grad`` flags.

Scoring, FLOP counting, shape checks and surgery tools run forward passes in eval mode (batch-norm
statistics must not move) and some tools flip flags (Torch-Pruning leaves eval mode on and unfreezes
parameters). Everything that touches a model outside training goes through these two helpers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn


class preserved_modes:
    """Context manager: restore every module's train/eval mode and every parameter's
    ``requires_grad`` on exit (by name, so it also holds when surgery replaced the objects)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> "preserved_modes":
        self.modes = {name: module.training for name, module in self.model.named_modules()}
        self.flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, module in self.model.named_modules():
            if name in self.modes:
                module.training = self.modes[name]
        for name, parameter in self.model.named_parameters():
            if name in self.flags:
                parameter.requires_grad_(self.flags[name])


@contextlib.contextmanager
def evaluating(model: nn.Module, gradients: bool = False) -> Iterator[nn.Module]:
    """Eval mode (and no gradients unless ``gradients=True``) inside; the model's modes and flags after."""
    with preserved_modes(model), torch.set_grad_enabled(gradients):
        model.eval()
        yield model


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside (nothing when ``None``); the previous count afterwards."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
