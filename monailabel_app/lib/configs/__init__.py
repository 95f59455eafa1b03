from .hyperspace import INTERACTIVE_SUFFIX, HyperSpaceConfig, discover_bundles, has_interactive_variant

__all__ = ["INTERACTIVE_SUFFIX", "HyperSpaceConfig", "discover_bundles", "has_interactive_variant"]
