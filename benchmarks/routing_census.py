"""How many distinct routed experts each LLM layer reads per image token, counted inside a CUDA graph.

The HBM floor of a token step depends on routing: one MoE layer must stream every expert that at least
one row picked. With 2 CFG rows that is at most 12 of 64 experts; with 8 prompts (16 rows) it is up to
all 64, so the batch's floor is not the batch-1 floor. `token_bytes(..., experts=)` in speed.py takes the
count measured here instead of the worst case.

Usage (with any generator that captures its token graph while the census counts):

    census = RoutingCensus(model)
    with census.counting():
        gen.bucket_for(b, r, p_len)  # the graph records the counting ops
    census.reset()                   # the capture's warm-up steps counted too
    gen.generate(cache, **kw)
    census.mean_distinct()           # per MoE layer, averaged over the steps
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class RoutingCensus:
    def __init__(self, model):
        self.moes = [layer.mlp for layer in model.llm.layers if layer.is_moe]
        if not self.moes:
            raise ValueError("the model's LLM has no MoE layer")
        dev = next(model.parameters()).device
        self.num_experts = self.moes[0].num_experts
        self.distinct = torch.zeros(len(self.moes), dtype=torch.float32, device=dev)  # summed over calls
        self.calls = torch.zeros(len(self.moes), dtype=torch.float32, device=dev)

    def _counting_route(self, i: int, route):
        top_k = self.moes[i].gate.top_k

        def counted(x, image_mask, fused: bool = False, want_logits: bool = True):
            idx, w, logits = route(x, image_mask, fused, want_logits)
            used = torch.zeros(self.num_experts, dtype=torch.float32, device=idx.device)
            # every row of the call: the routed experts one launch must read (a fused route may append the
            # shared experts' slots, ids past the routed ones: not counted here)
            used.index_fill_(0, idx[:, :top_k].reshape(-1), 1.0)
            self.distinct[i:i + 1].add_(used.sum())
            self.calls[i:i + 1].add_(1.0)
            return idx, w, logits
        return counted

    @contextmanager
    def counting(self):
        """Count every MoE routing call made (or captured) inside the block."""
        for i, moe in enumerate(self.moes):
            moe.route = self._counting_route(i, moe.route)  # an instance attribute shadows the method
        try:
            yield self
        finally:
            for moe in self.moes:
                del moe.route

    def reset(self) -> None:
        self.distinct.zero_()
        self.calls.zero_()

    def mean_distinct(self) -> list[float]:
        """Distinct experts per routing call, for each MoE layer (NaN for a layer never called)."""
        return (self.distinct / self.calls).tolist()
