from .hyperspace import INTERACTIVE_SUFFIX, HyperSpaceConfig, bundle_variants, discover_bundles, has_interactive_variant

__all__ = ["INTERACTIVE_SUFFIX", "HyperSpaceConfig", "bundle_variants", "discover_bundles", "has_interactive_variant"]
