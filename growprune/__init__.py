"""growprune: grow and prune neural networks during training, with PyTorch Lightning."""

from growprune.module import GrowPruneModule

__version__ = "0.1.0"
__all__ = ["GrowPruneModule", "__version__"]
