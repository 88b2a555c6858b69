"""tunelab serve: one base model and many LoRA adapters behind an OpenAI-compatible API."""
