"""lmmlab: per-layer pruning + KV-cache quantization for multimodal models, searched with TPE."""

__version__ = "0.1.0"
