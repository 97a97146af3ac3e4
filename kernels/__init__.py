"""Custom GPU kernels (Triton) for the fast path.

None are here yet: the FP8/bf16 skinny-GEMM kernels for the flow head and the fused MoE decode kernel
are the next step of the GPU issue (benchmarks/results/speed_h100.md shows where the time goes).
"""
