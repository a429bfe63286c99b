"""BetterBot's shared package: the contracts (models, stream names) and the plumbing every service uses."""
