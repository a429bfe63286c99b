"""BetterBot's shared package: the contracts (models, stream names) and common plumbing."""
