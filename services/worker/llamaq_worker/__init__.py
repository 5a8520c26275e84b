"""llamaq GPU worker: loads the model once and runs many queued jobs at a time (continuous batching)."""
