"""tunelab: fine-tune language models, with the workflow around training."""

__version__ = "0.1.0"
