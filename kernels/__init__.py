"""Custom Triton kernels for the decode hot path (see each module's docstring for the why).

  skinny.py    skinny GEMM (<= 64 rows) with bf16 or FP8-E4M3 weights, deterministic split-K, fused
               SwiGLU / gated-residual epilogues (the flow head's blocks)
  layernorm.py LayerNorm + adaLN modulation of a few rows (the flow head's block input)
  moe.py       fused MoE decode reading only the routed experts from the stacked weights
  attention.py one-query decode attention over the static KV cache (grouped heads, key mask, fixed order)
  rope.py      RoPE of a decode token's query and key and its KV-cache write, from the qkv projection
  routing.py   MoE routing of the decode rows (softmax, top-k, router choice, shared-expert slots)
  guidance.py  CFG combination + Euler update in one launch
  fp8.py       per-output-channel E4M3 weight quantization
  _triton.py   the interpreter switch, the MMA helper, programmatic dependent launch (PDL)

Triton is optional (the `kernels` extra). On a machine without a GPU the same kernels run in Triton's
interpreter (TRITON_INTERPRET=1), which is how CI tests them.
"""
from ._triton import available, interpreting, pdl_enabled, require, set_pdl

__all__ = ["available", "interpreting", "pdl_enabled", "require", "set_pdl"]
