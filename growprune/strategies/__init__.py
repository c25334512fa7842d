"""Strategies: Lightning callbacks that grow or prune the network on a schedule."""

from growprune.strategies.base import Strategy
from growprune.strategies.growth import ChannelGrowth
from growprune.strategies.layers import CellGrowth, CellPruning, LayerGrowth, LayerPruning
from growprune.strategies.nnrelief import NNReliefPruning
from growprune.strategies.regrowth import Regrowth
from growprune.strategies.regularizers import NetworkSlimming, PolarizationPruning
from growprune.strategies.structured import StructuredPruning
from growprune.strategies.unstructured import UnstructuredPruning

__all__ = [
    "CellGrowth",
    "CellPruning",
    "ChannelGrowth",
    "LayerGrowth",
    "LayerPruning",
    "NNReliefPruning",
    "NetworkSlimming",
    "PolarizationPruning",
    "Regrowth",
    "Strategy",
    "StructuredPruning",
    "UnstructuredPruning",
]
