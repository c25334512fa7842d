"""growprune: grow and prune neural networks during training, with PyTorch Lightning."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["GrowPruneModule", "__version__"]


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import; evaluation workers of `growprune qd` (spawned processes,
    # Ray tasks) that roll out control policies need none of it.
    if name == "GrowPruneModule":
        from growprune.module import GrowPruneModule

        return GrowPruneModule
    raise AttributeError(f"module 'growprune' has no attribute {name!r}")
