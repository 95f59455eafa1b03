from .hyperspace import HyperSpaceConfig, discover_bundles

__all__ = ["HyperSpaceConfig", "discover_bundles"]
