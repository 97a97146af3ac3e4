"""The torch backend: the reference pieces run eagerly (the baseline, and the judge of every engine)."""
from __future__ import annotations

import torch

from models.pieces import build_pieces
from models.univision import MingUniVision


class TorchBackend:
    name = "torch"

    def __init__(self, model: MingUniVision):
        self.model = model.eval()
        self.cfg = model.cfg
        self.pieces = build_pieces(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.pieces[piece](*inputs)
        return out if isinstance(out, tuple) else (out,)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids.to(self.device)).to(self.dtype)


class RecordingBackend:
    """Wraps a backend and keeps (up to `limit` per piece) the inputs each piece was called with."""

    def __init__(self, inner, limit: int = 64):
        self.inner, self.limit = inner, limit
        self.device, self.dtype, self.cfg = inner.device, inner.dtype, inner.cfg
        self.calls: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def run(self, piece: str, *inputs):
        seen = self.calls.setdefault(piece, [])
        if len(seen) < self.limit:
            seen.append(tuple(t.detach().clone() for t in inputs))
        return self.inner.run(piece, *inputs)

    def embed(self, input_ids):
        return self.inner.embed(input_ids)
