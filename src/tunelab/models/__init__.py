"""Models and tokenizers: loading from folders, GGUF files, hub ids and the built-in catalog."""
