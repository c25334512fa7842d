"""Strategies: Lightning callbacks that grow or prune the network on a schedule."""

from growprune.strategies.base import Strategy
from growprune.strategies.unstructured import UnstructuredPruning

__all__ = ["Strategy", "UnstructuredPruning"]
