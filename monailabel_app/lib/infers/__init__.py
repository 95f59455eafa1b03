from .hyperspace import SPACING_MODES, HyperSpaceInteractive, HyperSpaceSegmentation

__all__ = ["SPACING_MODES", "HyperSpaceInteractive", "HyperSpaceSegmentation"]
