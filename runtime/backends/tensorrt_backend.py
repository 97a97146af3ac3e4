"""TensorRT backend: one engine per piece, one execution context per thread (contexts are not thread-safe).

Written against TensorRT's documented 10.x/11.x Python API; TensorRT cannot be installed on our
development or CI machines, so this path has not been run (the README says so).
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, folder: str | Path, cfg, pieces: dict[str, str], embeddings: torch.Tensor,
                 device: torch.device, dtype: torch.dtype):
        from .tensorrt_engine import TensorRTEngine  # imports tensorrt; the caller checked it exists

        self.folder, self.cfg, self.device, self.dtype = Path(folder), cfg, device, dtype
        self.table = embeddings.to(device, dtype)
        self.engines = {p: TensorRTEngine(self.folder / f, device.index or 0) for p, f in pieces.items()}
        self._local = threading.local()

    def _context(self, piece: str):
        contexts = self._local.__dict__.setdefault("contexts", {})
        if piece not in contexts:
            contexts[piece] = self.engines[piece].new_context()
        return contexts[piece]

    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        engine = self.engines[piece]
        stream = torch.cuda.current_stream(self.device)
        outs = engine.infer(self._context(piece), dict(zip(engine.input_names, inputs)), stream)
        return tuple(outs[name] for name in engine.output_names)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids.to(self.device).clamp(0, self.table.shape[0] - 1)]
