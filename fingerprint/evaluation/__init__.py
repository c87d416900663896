"""How well a detector does: metrics, thresholds, the benchmark harness, pictures."""
