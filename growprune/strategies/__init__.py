"""Strategies: Lightning callbacks that grow or prune the network on a schedule."""

from growprune.strategies.base import Strategy
from growprune.strategies.nnrelief import NNReliefPruning
from growprune.strategies.regularizers import NetworkSlimming, PolarizationPruning
from growprune.strategies.structured import StructuredPruning
from growprune.strategies.unstructured import UnstructuredPruning

__all__ = ["NNReliefPruning", "NetworkSlimming", "PolarizationPruning", "Strategy", "StructuredPruning", "UnstructuredPruning"]
