"""Reference PyTorch implementations of Ming-UniVision's pieces, numerically equivalent to upstream."""
from .config import ModelConfig, get_config, full_config, tiny_config
from .univision import MingUniVision, build, build_meta, load_checkpoint, load_parts
from .pipeline import ReferencePipeline
from .checkpoint import CheckpointError

__all__ = ["ModelConfig", "get_config", "full_config", "tiny_config", "MingUniVision", "build", "build_meta",
           "load_checkpoint", "load_parts", "ReferencePipeline", "CheckpointError"]
