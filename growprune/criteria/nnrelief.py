"""NNrelief importance scores (Dekhovich et al., "Neural network relief", arXiv 2109.10795).

A connection is as important as the share of the signal it carries into its neuron on a pruning
set of N samples. For a linear layer with PyTorch weight ``W`` of shape ``(out, in)``, neuron
``j`` and input ``i``::

    s_ji      = mean_n |W_ji x_ni| / S_j       (= |W_ji| mean_n |x_ni| / S_j)
    s_bias_j  = |b_j| / S_j
    S_j       = sum_k mean_n |W_jk x_nk| + |b_j|

For a convolution the unit is one input-channel kernel ``K_ji`` (output filter ``j``, input
channel ``i``); its contribution is ``mean_n || conv(|x_ni|, |K_ji|) ||_F`` (the 2-D map that
the kernel adds to filter ``j``'s output, with the layer's stride, padding and dilation),
normalised per filter ``j`` the same way, with ``|b_j|`` as the bias's contribution. All
``(j, i)`` maps come from one grouped convolution of ``|x|`` by ``|W|`` rearranged to
``(C_in * C_out/groups, 1, kh, kw)`` with ``groups=C_in``, chunked over samples and input channels
so at most ``max_elements`` output values exist at once. Grouped and depthwise convolutions
(``groups > 1``) are handled: kernel ``(j, i)`` then reads input channel
``group(j) * C_in/groups + i``. Conv1d and Conv3d work the same way; transposed convolutions and
other weight layers (embeddings, ...) raise ``ValueError`` naming the layer.

Scores are computed on the network as it is: masked weights are zero and score zero. The
selection rule of NNrelief (per unit, keep the smallest set of largest scores whose cumulative
share reaches ``alpha``) is :func:`cumulative_keep_mask`; the full method (layers pruned one
after another from input to output, each scored on the already-pruned network, dead-unit
removal) is :class:`growprune.strategies.NNReliefPruning`.

Used as a plain criterion (``UnstructuredPruning(criterion=NNReliefCriterion(), ...)``) all layers
are scored from one pass over the batches: with nothing pruned between layers this is the same as
scoring them one after another. Each weight of a conv kernel gets the kernel's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from growprune.criteria.base import Batch, WeightCriterion
from growprune.modes import evaluating

#: Default bound on the number of values one chunk of the conv score computation may hold
#: (2**24 float32 values = 64 MiB).
DEFAULT_MAX_ELEMENTS = 2**24

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ------------------------------------------------------------------------------ layer types
def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear)


def is_conv(layer: nn.Module) -> bool:
    """A forward (not transposed) Conv1d/2d/3d."""
    return isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed and layer.weight.dim() - 2 in _CONV_FUNCTIONS


def check_supported(name: str, layer: nn.Module) -> None:
    """Raise ``ValueError`` naming the layer unless NNrelief can score it (Linear or Conv1d/2d/3d)."""
    if not (is_linear(layer) or is_conv(layer)):
        raise ValueError(
            f"NNrelief scores nn.Linear and nn.Conv1d/2d/3d layers only; layer {name!r} is a "
            f"{type(layer).__name__}: leave it out with skip=[{name!r}] (or layers=[...])"
        )


# --------------------------------------------------------------------------- the statistics
@dataclass
class LayerStatistics:
    """What NNrelief needs from one layer's inputs on the pruning set.

    Attributes:
        samples: number of samples seen (for linear layers on inputs with extra dimensions,
            every position counts as a sample).
        input_activity: mean ``|x|`` per input feature (linear) or per input channel, over samples
            and positions (conv); exactly zero for an input that is never active.
        kernel_norms: conv only: ``(C_out, C_in/groups)`` mean over samples of the Frobenius norm
            of ``conv(|x_ni|, |K_ji|)``; ``None`` for linear layers or when not requested.
    """

    samples: int
    input_activity: torch.Tensor
    kernel_norms: torch.Tensor | None = None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the statistics it needs are collected."""


class _Accumulator:
    def __init__(self, layer: nn.Module, kernel_norms: bool, max_elements: int, stop: bool):
        self.layer = layer
        self.want_kernel_norms = kernel_norms and is_conv(layer)
        self.max_elements = max_elements
        self.stop = stop
        self.samples = 0
        self.activity_sum: torch.Tensor | None = None
        self.norm_sum: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        self.calls += 1
        if is_linear(module):
            flat = x.reshape(-1, x.shape[-1]).abs()
            activity, samples = flat.sum(dim=0, dtype=torch.float64), flat.shape[0]
        else:
            spatial = tuple(range(2, x.dim()))
            activity = x.abs().sum(dim=(0, *spatial), dtype=torch.float64) / max(1, _numel(x.shape[2:]))
            samples = x.shape[0]
            if self.want_kernel_norms:
                norms = kernel_norm_sums(module, x, self.max_elements)
                self.norm_sum = norms if self.norm_sum is None else self.norm_sum + norms
        self.activity_sum = activity if self.activity_sum is None else self.activity_sum + activity
        self.samples += samples
        if self.stop:
            raise _StopForward

    def result(self) -> LayerStatistics:
        samples = max(self.samples, 1)
        kernel_norms = self.norm_sum / samples if self.norm_sum is not None else None
        return LayerStatistics(self.samples, self.activity_sum / samples, kernel_norms)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def kernel_norm_sums(layer: nn.Module, x: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Sum over the batch of ``|| conv(|x_ni|, |K_ji|) ||_F`` for every kernel: ``(C_out, C_in/groups)``.

    One grouped convolution of ``|x|`` (``groups=C_in``) by ``|W|`` rearranged so each input
    channel meets the kernels that read it; chunked over input channels and samples so no chunk
    holds more than ``max_elements`` output values (at least one channel of one sample).
    """
    weight = layer.weight.detach().abs()
    dims = weight.dim() - 2
    conv = _CONV_FUNCTIONS[dims]
    groups = layer.groups
    c_out, c_in_group = weight.shape[0], weight.shape[1]
    c_in = c_in_group * groups
    c_out_group = c_out // groups
    if x.shape[1] != c_in:
        raise ValueError(f"conv layer expects {c_in} input channels, got input of shape {tuple(x.shape)}")
    x = x.abs().to(weight.dtype)
    padding = layer.padding
    if layer.padding_mode != "zeros":
        # |pad(x)| == pad(|x|) for reflect / replicate / circular padding
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    kernel = weight.shape[2:]
    # input channel c = g * c_in_group + i reads kernels W[g * c_out_group + j, i] for j < c_out_group
    rearranged = (
        weight.reshape(groups, c_out_group, c_in_group, *kernel)
        .transpose(1, 2)
        .reshape(c_in * c_out_group, 1, *kernel)
    )
    # output size of one channel of one sample, from the layer's own arithmetic (a 1-sample probe)
    with torch.no_grad():
        probe = conv(x[:1, :1], rearranged[:1], None, layer.stride, padding, layer.dilation, 1)
    per_map = _numel(probe.shape[2:])
    per_channel = c_out_group * per_map  # values per input channel per sample
    channels_per_chunk = max(1, min(c_in, max_elements // max(per_channel, 1)))
    samples_per_chunk = max(1, min(x.shape[0], max_elements // max(per_channel * channels_per_chunk, 1)))
    sums = torch.zeros(c_in, c_out_group, dtype=torch.float64, device=weight.device)
    with torch.no_grad():
        for start in range(0, c_in, channels_per_chunk):
            stop = min(c_in, start + channels_per_chunk)
            chunk_weight = rearranged[start * c_out_group : stop * c_out_group]
            for first in range(0, x.shape[0], samples_per_chunk):
                chunk = x[first : first + samples_per_chunk, start:stop]
                maps = conv(chunk, chunk_weight, None, layer.stride, padding, layer.dilation, stop - start)
                maps = maps.reshape(chunk.shape[0], stop - start, c_out_group, per_map)
                sums[start:stop] += torch.linalg.vector_norm(maps, dim=3).sum(dim=0, dtype=torch.float64)
    # (c_in, c_out_group) -> (groups, c_in_group, c_out_group) -> (groups, c_out_group, c_in_group)
    return sums.reshape(groups, c_in_group, c_out_group).transpose(1, 2).reshape(c_out, c_in_group)


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[Batch],
    kernel_norms: bool = True,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    stop_early: bool = False,
) -> dict[str, LayerStatistics]:
    """Run ``model`` over ``batches`` (eval mode, no gradients) and record each layer's input statistics.

    ``stop_early``: end every forward pass as soon as the (single) layer in ``layers`` has been
    seen; only valid when that layer runs once per forward pass and nothing after it is needed.
    Modules' train/eval modes are restored afterwards. A layer never called raises ``ValueError``.
    """
    if not batches:
        raise ValueError("NNrelief needs a pruning set: got no batches")
    if stop_early and len(layers) != 1:
        raise ValueError("stop_early needs exactly one layer")
    for name, layer in layers.items():
        check_supported(name, layer)
    accumulators = {name: _Accumulator(layer, kernel_norms, max_elements, stop_early) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(accumulators[name]) for name, layer in layers.items()]
    try:
        with evaluating(model):
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                try:
                    model(inputs)
                except _StopForward:
                    pass  # the accumulator has what it needs; the rest of the forward is skipped
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, accumulator in accumulators.items() if accumulator.calls == 0]
    if missing:
        raise ValueError(
            f"layer(s) {', '.join(map(repr, missing))} never ran in the model's forward pass, so NNrelief "
            "cannot score them: leave them out with skip=[...]"
        )
    return {name: accumulator.result() for name, accumulator in accumulators.items()}


# ------------------------------------------------------------------------------------ scores
def weight_contributions(layer: nn.Module, statistics: LayerStatistics) -> torch.Tensor:
    """Unnormalised contributions ``mean_n |W_ji x_ni|`` (linear, ``(out, in)``) or kernel norms
    (conv, ``(C_out, C_in/groups)``), in float64."""
    if is_linear(layer):
        return layer.weight.detach().abs().to(torch.float64) * statistics.input_activity.to(layer.weight.device)[None, :]
    if statistics.kernel_norms is None:
        raise ValueError("conv contributions need kernel norms: collect statistics with kernel_norms=True")
    return statistics.kernel_norms.to(layer.weight.device)


def bias_contributions(layer: nn.Module) -> torch.Tensor:
    """``|b_j|`` per output unit (zeros when the layer has no bias), in float64."""
    out = layer.weight.shape[0]
    bias = getattr(layer, "bias", None)
    if bias is None:
        return torch.zeros(out, dtype=torch.float64, device=layer.weight.device)
    return bias.detach().abs().to(torch.float64)


def relief_scores(layer: nn.Module, statistics: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised NNrelief scores of one layer: ``(unit scores, bias scores)``.

    Unit scores have shape ``(out, in)`` for linear layers and ``(C_out, C_in/groups)`` (one per
    kernel) for conv layers; bias scores ``(out,)``. Each unit's scores and its bias score sum to 1
    (to 0 for a unit whose inputs and bias carry nothing). float64.
    """
    weights = weight_contributions(layer, statistics)
    bias = bias_contributions(layer)
    total = weights.sum(dim=1) + bias
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return weights / safe[:, None], bias / safe


def expand_unit_tensor(layer: nn.Module, unit_tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-unit tensor (``(out, in)`` or per-kernel) to the shape of ``layer.weight``."""
    weight = layer.weight
    extra = weight.dim() - 2
    return unit_tensor.reshape(*unit_tensor.shape, *([1] * extra)).expand(weight.shape)


def cumulative_keep_mask(scores_2d: torch.Tensor, alpha: float) -> torch.Tensor:
    """NNrelief's selection: per row, keep the smallest set of largest scores whose share of the
    row's total reaches ``alpha``; return a 0/1 mask (float, shape of ``scores_2d``).

    Rows need not be normalised (shares are taken of each row's sum). Entries scoring zero are
    never kept (they carry nothing), so a row of zeros keeps nothing and ``alpha=1`` keeps exactly
    the nonzero entries. Ties are broken by position (stable), so every rank picks the same entries.

    >>> cumulative_keep_mask(torch.tensor([[0.5, 0.125, 0.25, 0.125]]), 0.75)
    tensor([[1., 0., 1., 0.]])
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if scores_2d.dim() != 2:
        raise ValueError(f"scores_2d must be 2-D (units x candidates), got shape {tuple(scores_2d.shape)}")
    scores = scores_2d.detach().to(torch.float64)
    if torch.any(scores < 0) or not torch.all(torch.isfinite(scores)):
        raise ValueError("NNrelief scores must be finite and >= 0")
    ordered, order = torch.sort(scores, dim=1, descending=True, stable=True)
    cumulative = torch.cumsum(ordered, dim=1)
    total = cumulative[:, -1:]
    # number of entries before the running share reaches alpha, plus the one that reaches it
    keep_count = (cumulative < alpha * total).sum(dim=1, keepdim=True) + 1
    positions = torch.arange(scores.shape[1], device=scores.device)[None, :]
    keep_sorted = (positions < keep_count) & (ordered > 0)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, keep_sorted)
    return mask.to(scores_2d.dtype if scores_2d.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------------- criterion
class NNReliefCriterion(WeightCriterion):
    """NNrelief connection importance: each weight's share of the signal its neuron receives.

    ``score_weights`` (after ``prepare(model, batches)``) returns the normalised ``s_ji`` for every weight (conv: the kernel's score on each
    of its ``kh x kw`` entries), computed from one pass over ``batches`` on the network as it is
    (masked weights are zero and score zero). Use it with any weight-pruning strategy, e.g.
    ``UnstructuredPruning(schedule, criterion=NNReliefCriterion())``, or take the full method
    (per-neuron cumulative ``alpha`` selection, layer by layer, dead-unit removal) from
    :class:`growprune.strategies.NNReliefPruning`.

    Args:
        max_elements: bound on the values one chunk of the conv score computation holds
            (memory of about 4 bytes each); lower it for very large feature maps.
    """

    requires_data = True

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS):
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.max_elements = int(max_elements)

    def statistics(self, model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch] | None) -> dict[str, LayerStatistics]:
        if not batches:
            raise ValueError("NNReliefCriterion needs training batches to score weights, got none")
        return collect_statistics(model, layers, batches, kernel_norms=True, max_elements=self.max_elements)

    def unit_scores(
        self, model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(unit scores (out, in) or per kernel, bias scores (out,))``; see :func:`relief_scores`."""
        statistics = self.statistics(model, layers, batches)
        return {name: relief_scores(layer, statistics[name]) for name, layer in layers.items()}

    def prepare(self, model: nn.Module, batches: Sequence[Batch] | None) -> None:
        super().prepare(model, batches)
        self._batches = list(batches or [])

    def score_weights(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        batches, self._batches = getattr(self, "_batches", None), []  # not kept beyond this action
        scores = self.unit_scores(model, layers, batches)
        return {
            name: expand_unit_tensor(layer, scores[name][0]).to(layer.weight.dtype).clone()
            for name, layer in layers.items()
        }

    def bias_scores(self, model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch] | None = None) -> dict[str, torch.Tensor]:
        """Normalised ``s_bias_j`` per layer, shape ``(out,)`` (zeros for a layer without bias)."""
        scores = self.unit_scores(model, layers, batches)
        return {name: scores[name][1].to(layer.weight.dtype) for name, layer in layers.items()}
