"""Training: the binary's main, the stage loop, the jitted train step, losses, optimiser, checkpoints,
parameter trees, metrics, and the ahead-of-time compilation of the step for a TPU topology."""
