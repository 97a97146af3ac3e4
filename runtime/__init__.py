"""A lightweight runtime for Ming-UniVision engines built by `python -m export.build`.

    import runtime
    rt = runtime.load("artifacts/tiny-fp8")          # checks manifest.json, then opens the engines
    out = rt.generate_image("a red bicycle", seed=3)  # PIL image in out.image
    text = rt.describe(out.image, "What is in the picture?")
    s = rt.session(); s.generate_image("a cat"); s.edit("make it black")
"""
from .api import CancelToken, ImageOutput, Progress, Runtime, Session, load
from .errors import (Cancelled, EngineError, ImageInputError, MingRuntimeError, PrecisionUnsupportedError, PromptError,
                     SessionFullError)

__all__ = ["load", "Runtime", "Session", "CancelToken", "ImageOutput", "Progress", "Cancelled", "EngineError",
           "ImageInputError", "MingRuntimeError", "PrecisionUnsupportedError", "PromptError", "SessionFullError"]
