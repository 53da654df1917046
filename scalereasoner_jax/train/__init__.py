"""Training infrastructure: checkpoints (Orbax), preemption handling and the training loops."""
