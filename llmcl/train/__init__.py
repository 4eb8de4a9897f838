"""Training: the explicit Accelerate loop, LR schedules, checkpoints and the run ledger, progress and metrics."""
