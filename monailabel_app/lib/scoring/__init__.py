from .spacing_disagreement import META_KEY, SCORE_KEY, SpacingDisagreementScoring

__all__ = ["META_KEY", "SCORE_KEY", "SpacingDisagreementScoring"]
