"""Training on Ray Train: the per-worker loop, optimiser, checkpoints, TorchTrainer."""
