"""The ops layer: every kernel a forward runs, and the one place that chooses which."""
