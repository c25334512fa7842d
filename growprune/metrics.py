"""Size and cost metrics: parameters (total / nonzero), FLOPs (dense / effective), compression, latency.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one input sample, so one
multiply-accumulate counts as 2 FLOPs and only matrix products and convolutions are counted
(not activations, pooling or normalisation), as in most pruning papers that report FLOPs.
*Effective* FLOPs scale each weight layer's FLOPs by the fraction of its weights that are
nonzero: what a sparse kernel would execute. Structural pruning shows in both numbers;
unstructured masks only in the effective one.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from growprune.modes import evaluating


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of parameters that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def compression_ratio(original_params: int, nonzero_params: int) -> float:
    """Original total parameters / current nonzero parameters (ShrinkBench's definition)."""
    return float("inf") if nonzero_params == 0 else original_params / nonzero_params


def _example_input(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.zeros(batch_size, *input_shape, device=device, dtype=dtype)


def layer_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """FLOPs of one forward pass for one sample: ``{"": total, "<leaf module name>": flops, ...}``.

    Only leaf modules that performed counted operations appear besides the total (key ``""``).
    """
    with evaluating(model), FlopCounterMode(display=False) as counter:
        model(_example_input(model, input_shape))
    result = {"": int(counter.get_total_flops())}
    leaf_names = {name for name, module in model.named_modules() if next(module.children(), None) is None}
    for qualified, ops in counter.get_flop_counts().items():
        # FlopCounterMode names modules "<RootClass>.<path>"; strip the root to get named_modules() names.
        _, _, name = qualified.partition(".")
        if name in leaf_names:
            result[name] = int(sum(ops.values()))
    return result


def dense_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass for one sample, counting every weight as nonzero."""
    return layer_flops(model, input_shape)[""]


def weight_density(module: nn.Module) -> float:
    """Fraction of ``module.weight`` that is nonzero (1.0 for modules without a weight)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return 1.0
    return int(torch.count_nonzero(weight.detach())) / weight.numel()


def effective_flops(model: nn.Module, input_shape: Sequence[int], per_layer: dict[str, int] | None = None) -> float:
    """Dense FLOPs with each weight layer's share scaled by its weight density.

    Pass ``per_layer`` (from :func:`layer_flops`) to reuse an earlier count of the same architecture.
    """
    per_layer = per_layer if per_layer is not None else layer_flops(model, input_shape)
    modules = dict(model.named_modules())
    total = float(per_layer[""])
    for name, flops in per_layer.items():
        if name:
            total -= flops * (1.0 - weight_density(modules[name]))
    return total


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
) -> float:
    """Median wall-clock seconds of one eval-mode forward pass over ``repeats`` runs after ``warmup``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    example = _example_input(model, input_shape, batch_size)
    synchronize = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = []
    with evaluating(model):
        for index in range(warmup + repeats):
            synchronize()
            start = time.perf_counter()
            model(example)
            synchronize()
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


class SizeMeter:
    """Computes the size metrics of a model, recounting FLOPs only when its shapes change."""

    def __init__(self, input_shape: Sequence[int], original_params: int):
        self.input_shape = tuple(input_shape)
        self.original_params = original_params
        self._cached_signature: tuple | None = None
        self._cached_flops: dict[str, int] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        signature = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
        if signature != self._cached_signature:
            self._cached_flops = layer_flops(model, self.input_shape)
            self._cached_signature = signature
        nonzero = count_nonzero_parameters(model)
        return {
            "params/total": float(count_parameters(model)),
            "params/nonzero": float(nonzero),
            "flops/dense": float(self._cached_flops[""]),
            "flops/effective": effective_flops(model, self.input_shape, self._cached_flops),
            "compression": compression_ratio(self.original_params, nonzero),
        }
