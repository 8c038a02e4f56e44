"""The model, the DeepSpeed engine, the training loop, checkpoints and logging."""
