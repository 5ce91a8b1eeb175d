"""The run engine: context building, local training, evaluation, checkpoints and the round loop."""
