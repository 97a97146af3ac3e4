"""FP8 (E4M3) and INT8 post-training quantization: calibration, layer policy, Q/DQ insertion, reports."""
from .policy import KEEP_HIGH_PRECISION, LayerPolicy

__all__ = ["KEEP_HIGH_PRECISION", "LayerPolicy"]
