"""The training loop, losses, optimizer and schedule."""
