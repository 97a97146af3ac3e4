"""CUDA graphs for the one-shot pieces around the image loop: MingTok's encoders and pixel decoder.

Each runs once per request, but as a few hundred small launches (5 ms for the pixel decoder and 14 ms for
the 512 px encoder at full size on an H100, eager): replaying them from one graph per input signature
removes the launch gaps and changes no arithmetic (the same kernels run).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_map

logger = logging.getLogger(__name__)

GRAPHED_PIECES = ("encoder", "encoder_understanding", "pixel_decoder")


class GraphedCall:
    """fn(*tensors) replayed from a CUDA graph captured per input signature (shapes, dtypes, device).

    CPU inputs run fn directly. A signature whose capture fails (a host sync inside fn, say) runs eagerly
    from then on, with one warning. The outputs are fresh tensors (copies of the graph's static outputs).
    At most `max_graphs` signatures keep a graph (and its memory pool); the least recently used goes.
    One call at a time: concurrent callers are serialised (the static buffers are shared).
    """

    def __init__(self, fn, *, name: str = "", compile: bool = False, max_graphs: int = 4):
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.name = name or getattr(fn, "__name__", "fn")
        self.max_graphs = max_graphs
        self.capture_seconds: dict[tuple, float] = {}
        self._graphs: OrderedDict[tuple, tuple | None] = OrderedDict()  # None: capture failed, run eagerly
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor):
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(key, args)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            entry = self._graphs[key]
            if entry is None:
                return self.fn(*args)
            graph, static_in, static_out = entry
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            graph.replay()
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(self, key: tuple, args: tuple[torch.Tensor, ...]):
        t0 = time.perf_counter()
        static_in = tuple(a.detach().clone() for a in args)
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up off the capture: cuBLAS handles, autotuning, compilation
                    self.fn(*static_in)
            torch.cuda.current_stream(args[0].device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(*static_in)
        except RuntimeError as exc:  # e.g. "operation not permitted when stream is capturing"
            torch.cuda.synchronize(args[0].device)
            logger.warning("%s: CUDA graph capture failed for inputs %s (%s); running it eagerly",
                           self.name, [k[0] for k in key], str(exc).splitlines()[0])
            return None
        self.capture_seconds[key] = time.perf_counter() - t0
        logger.info("%s: captured a CUDA graph for inputs %s in %.2fs", self.name, [k[0] for k in key],
                    self.capture_seconds[key])
        return graph, static_in, static_out


class GraphedBackend:
    """The torch backend with its one-shot pieces (GRAPHED_PIECES) replayed from CUDA graphs; every other
    piece and attribute is the wrapped backend's."""

    def __init__(self, inner, *, compile: bool = False):
        self.inner = inner
        self._calls = {p: GraphedCall(inner.pieces[p], name=p, compile=compile) for p in GRAPHED_PIECES if p in inner.pieces}

    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = self._calls.get(piece)
        if call is None:
            return self.inner.run(piece, *inputs)
        out = call(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def __getattr__(self, name):  # name, model, cfg, pieces, device, dtype, embed, ...
        return getattr(self.inner, name)


__all__ = ["GRAPHED_PIECES", "GraphedBackend", "GraphedCall"]
