"""Self-supervised pre-training methods: each file is one method (config dataclass + nn.Module)."""
