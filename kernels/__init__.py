"""Custom Triton kernels for the decode hot path (see each module's docstring for the why).

  skinny.py    skinny GEMM (<= 64 rows) with bf16 or FP8-E4M3 weights, deterministic split-K, fused
               LayerNorm/adaLN prologue and SwiGLU / gated-residual epilogues (the flow head's blocks)
  moe.py       fused MoE decode reading only the routed experts from the stacked weights
  guidance.py  CFG combination + Euler update in one launch
  fp8.py       per-output-channel E4M3 weight quantization

Triton is optional (the `kernels` extra). On a machine without a GPU the same kernels run in Triton's
interpreter (TRITON_INTERPRET=1), which is how CI tests them.
"""
from ._triton import available, interpreting, require

__all__ = ["available", "interpreting", "require"]
