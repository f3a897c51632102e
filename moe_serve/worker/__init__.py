"""The expert worker: holds a slice of the experts and runs batched forward passes."""
