"""Checkpoint formats as tensors: the one weight table, Meta .pth, safetensors, GGUF."""
