"""The bottom layer: errors, registries, derived seeds, atomic file writes, progress display."""
