"""Unstructured surgery: which layers can be masked, which weights to keep, and export.

Masks live on :class:`growprune.GrowPruneModule` (``module.masks``, keyed by parameter name), which
re-applies them after every optimizer step and stores them in checkpoints.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

SCOPES = ("layer", "global")


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a ``weight`` parameter of 2 or more dimensions (linear and conv layers), by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() >= 2
    }


def select_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    skip_first_and_last: bool = False,
) -> dict[str, nn.Module]:
    """The prunable layers of ``model``: all weight layers, or those matching ``layers`` (shell-style
    patterns of module names), minus those matching ``skip``; optionally minus the first and last.

    A pattern that matches no weight layer raises ``ValueError`` listing the valid names.
    """
    candidates = weight_layers(model)
    if not candidates:
        raise ValueError("the model has no linear or convolution layers to prune")
    for pattern in list(layers or []) + list(skip):
        if not fnmatch.filter(candidates, pattern):
            raise ValueError(f"no prunable layer matches {pattern!r}; layers: {', '.join(candidates)}")
    names = [name for name in candidates if layers is None or any(fnmatch.fnmatch(name, p) for p in layers)]
    if skip_first_and_last:
        all_names = list(candidates)
        names = [name for name in names if name not in (all_names[0], all_names[-1])]
    names = [name for name in names if not any(fnmatch.fnmatch(name, pattern) for pattern in skip)]
    if not names:
        raise ValueError("every prunable layer is skipped: nothing left to prune")
    return {name: candidates[name] for name in names}


def keep_masks(
    scores: dict[str, torch.Tensor],
    keep: dict[str, int] | int,
    current: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """0/1 masks that keep the highest-scoring weights.

    ``keep`` is either a count per layer (layer-wise ranking) or one total count (global ranking
    across all layers). Weights already masked out in ``current`` stay out: pruning is monotone.
    """
    current = current or {}
    ranked = {}
    for name, score in scores.items():
        score = score.detach().float()
        if name in current:
            score = score.masked_fill(current[name] == 0, -math.inf)
        ranked[name] = score
    if isinstance(keep, dict):
        return {name: _top_k_mask(score, keep[name]) for name, score in ranked.items()}
    flat = torch.cat([score.flatten() for score in ranked.values()])
    mask = _top_k_mask(flat, keep)
    masks, offset = {}, 0
    for name, score in ranked.items():
        masks[name] = mask[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    k = max(0, min(int(k), scores.numel()))
    if k:
        # ties broken by position (stable), so every rank and rerun picks the same weights
        indices = torch.topk(scores.flatten(), k, sorted=False).indices
        mask.view(-1)[indices] = 1.0
    # never keep a weight that was already gone, even if k asks for more than survive
    return mask * torch.isfinite(scores).to(mask.dtype)


def sparsity(tensor: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return 1.0 - int(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)


def make_permanent(module: Any) -> None:
    """Drop the masks of a :class:`~growprune.GrowPruneModule`: the zeros stay, nothing re-applies them."""
    module.apply_masks()
    module.masks = {}


def export_model(module: Any, path: str | Path, sparse: bool = False, overwrite: bool = False) -> Path:
    """Save the plain ``nn.Module`` (masks applied) for use without growprune's training machinery.

    With ``sparse=True`` masked weight tensors are stored in sparse COO form, which saves space when
    most weights are zero; :func:`load_exported_state_dict` turns them back into dense tensors.
    An existing file is never replaced unless ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    module.apply_masks()
    state = {}
    for name, tensor in module.model.state_dict().items():
        state[name] = tensor.detach().cpu().to_sparse() if sparse and name in module.masks else tensor.detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "arch": module.hparams.get("arch"), "edit_log": list(module.edit_log)}, path)
    return path


def load_exported_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a file written by :func:`export_model` (loads with ``weights_only=True``)."""
    payload = torch.load(path, weights_only=True, map_location="cpu")
    return {name: tensor.to_dense() if tensor.is_sparse else tensor for name, tensor in payload["state_dict"].items()}
