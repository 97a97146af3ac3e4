"""Shared Triton plumbing: the lazy import, the interpreter switch, launch configs.

Triton's CPU interpreter (TRITON_INTERPRET=1, read when a kernel is decorated) runs the same kernels
on CPU tensors, which is how CI checks them without a GPU. Its bf16/fp8 tensor-core dot is wrong in
triton 3.9 (it treats the 16-bit payload as a number), so in that mode the kernels upcast both dot
operands to fp32 (`UPCAST`); on a GPU they multiply in bf16 with fp32 accumulation.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """True when the kernels can run: triton imports and there is a GPU or the interpreter is on."""
    if triton is None:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def require() -> None:
    if triton is None:
        raise ImportError("the custom kernels need triton: install the 'kernels' extra "
                          f"(pip install -e '.[kernels]'); import failed with: {IMPORT_ERROR}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
