"""Checkpoints: atomic save, prune and find in a run folder (manager), and the state an exact
resume needs besides the weights (state)."""
