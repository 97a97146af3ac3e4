"""The GPU fast path: exact-algebra rewrites of the hot pieces and one CUDA graph per image token."""
