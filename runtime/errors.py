"""Every error the runtime raises on bad input is one of these; the process and sessions stay usable."""
from __future__ import annotations

from models.image_io import ImageInputError


class MingRuntimeError(Exception):
    """Base class of the runtime's own errors."""


class EngineError(MingRuntimeError):
    """An artifact folder is missing, corrupted or does not match this runtime; the message says how to rebuild."""


class PrecisionUnsupportedError(EngineError):
    """The engines' precision cannot run on this device (e.g. FP8 below compute capability 8.9)."""


class PromptError(MingRuntimeError, ValueError):
    """An empty, over-long or otherwise unusable prompt."""


class SessionFullError(MingRuntimeError):
    """A session's context would exceed its memory bound."""


class Cancelled(MingRuntimeError):
    """The caller cancelled the request (cooperatively, between two steps)."""


__all__ = ["MingRuntimeError", "EngineError", "PrecisionUnsupportedError", "PromptError", "SessionFullError",
           "Cancelled", "ImageInputError"]
