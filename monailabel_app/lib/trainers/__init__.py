from .hyperspace import HyperSpaceTrain

__all__ = ["HyperSpaceTrain"]
