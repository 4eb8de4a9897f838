"""Training: the stage plan, the explicit Accelerate loop (build, steps, finish), the launcher's settings,
metrics, progress and stop signals. The run directory itself belongs to llmcl.rundir."""
