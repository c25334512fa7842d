"""Importance criteria: score candidates, higher = more important."""

from growprune.criteria.base import Batch, WeightCriterion
from growprune.criteria.weights import GradientCriterion, MagnitudeCriterion, RandomCriterion

__all__ = ["Batch", "GradientCriterion", "MagnitudeCriterion", "RandomCriterion", "WeightCriterion"]
