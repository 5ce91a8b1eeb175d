"""Run orchestration: building a run's context, the round loop, checkpoints, metrics, comparisons, plan tables."""
