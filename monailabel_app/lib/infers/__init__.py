from .hyperspace import SPACING_MODES, HyperSpaceSegmentation

__all__ = ["SPACING_MODES", "HyperSpaceSegmentation"]
