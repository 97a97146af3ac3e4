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


if triton is not None:
    F16_MAX = tl.constexpr(65504.0)  # a jit function reads only constexpr globals

    @triton.jit
    def mma(w, x, UPCAST: tl.constexpr):
        """w (BN, BK) @ x (BK, BM) with fp32 accumulation, operands chosen by the weight's dtype:
        FP8 (E4M3) weights widen to fp16 (one cvt per pair on SM 8.9+, exact: E4M3 fits in fp16),
        where widening to bf16 costs several instructions per element and made FP8 GEMMs no faster than
        bf16 ones; the rows are then rounded to fp16 too, clamped to its range. bf16/fp16 weights
        multiply bf16/fp16 rows. UPCAST (interpreter): fp32 IEEE products."""
        if UPCAST:
            out = tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        elif w.dtype == tl.float8e4nv:
            if x.dtype == tl.float16:
                xh = x
            else:
                xh = tl.minimum(tl.maximum(x.to(tl.float32), -F16_MAX), F16_MAX).to(tl.float16)
            out = tl.dot(w.to(tl.float16), xh)
        elif w.dtype == tl.float16:
            out = tl.dot(w, x.to(tl.float16))
        elif w.dtype == tl.float32:  # fp32 models (tests): exact products, slow and unused at speed
            out = tl.dot(w, x.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(w.to(tl.bfloat16), x.to(tl.bfloat16))
        return out

    @triton.jit
    def store_cast(ptr, value, mask):
        """Store fp32 `value`, clamped to fp16's range when the destination is fp16."""
        if ptr.dtype.element_ty == tl.float16:
            value = tl.minimum(tl.maximum(value, -F16_MAX), F16_MAX)
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
