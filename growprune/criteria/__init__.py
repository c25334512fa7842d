"""Importance criteria: score candidates, higher = more important.

One interface (:class:`Criterion`, see :mod:`growprune.criteria.base`): ``prepare(model, batches)``
once per action, then ``score_weights`` (single weights, unstructured pruning) or
``score_channels`` (channels of channel groups, structured pruning and growth).
"""

from growprune.criteria.base import Batch, Criterion, WeightCriterion
from growprune.criteria.channels import (
    ActivityCriterion,
    BNScaleCriterion,
    ChannelCriterion,
    FilterNormCriterion,
    RandomChannelCriterion,
    TaylorCriterion,
)
from growprune.criteria.layers import BlockInfluenceCriterion, LayerCriterion, LayerWeightCriterion
from growprune.criteria.nnrelief import NNReliefCriterion, cumulative_keep_mask
from growprune.criteria.weights import GradientCriterion, MagnitudeCriterion, RandomCriterion

__all__ = [
    "ActivityCriterion",
    "BNScaleCriterion",
    "Batch",
    "BlockInfluenceCriterion",
    "ChannelCriterion",
    "Criterion",
    "FilterNormCriterion",
    "GradientCriterion",
    "LayerCriterion",
    "LayerWeightCriterion",
    "MagnitudeCriterion",
    "NNReliefCriterion",
    "RandomChannelCriterion",
    "RandomCriterion",
    "TaylorCriterion",
    "WeightCriterion",
    "cumulative_keep_mask",
]
