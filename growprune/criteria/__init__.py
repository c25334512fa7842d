"""Importance criteria: score candidates, higher = more important.

Weight criteria score single weights (unstructured pruning); channel criteria score the channels
of a channel group (structured pruning).
"""

from growprune.criteria.base import Batch, WeightCriterion
from growprune.criteria.channels import (
    ActivityCriterion,
    BNScaleCriterion,
    ChannelCriterion,
    FilterNormCriterion,
    RandomChannelCriterion,
    TaylorCriterion,
)
from growprune.criteria.nnrelief import NNReliefCriterion, cumulative_keep_mask
from growprune.criteria.weights import GradientCriterion, MagnitudeCriterion, RandomCriterion

__all__ = [
    "ActivityCriterion",
    "BNScaleCriterion",
    "Batch",
    "ChannelCriterion",
    "FilterNormCriterion",
    "GradientCriterion",
    "MagnitudeCriterion",
    "NNReliefCriterion",
    "RandomChannelCriterion",
    "RandomCriterion",
    "TaylorCriterion",
    "WeightCriterion",
    "cumulative_keep_mask",
]
