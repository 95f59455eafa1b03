from .hyperspace import SPACING_POLICIES, HyperSpaceInteractive, HyperSpaceSegmentation

__all__ = ["SPACING_POLICIES", "HyperSpaceInteractive", "HyperSpaceSegmentation"]
