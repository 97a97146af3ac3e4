"""CUDA graphs for the one-shot pieces around the image loop: MingTok's encoders and pixel decoder.

Each runs once per request, but as a few hundred small launches (5 ms for the pixel decoder and 14 ms for
the 512 px encoder at full size on an H100, eager): replaying them from one graph per input signature
removes the launch gaps and changes no arithmetic (the same kernels run).

Captures happen at the first call of each signature, while other threads may be serving requests: they
take one process-wide lock (CAPTURE_LOCK, also taken by the token graph's capture) and capture in
thread-local mode, so another thread's allocations cannot invalidate them.
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
CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process


def capture_graph(fn, device: torch.device):
    """(graph, output) of fn() captured on `device` (current device or not), after two warm-up runs on a
    side stream (cuBLAS handles, autotuning, compilation). fn must not sync with the host."""
    with CAPTURE_LOCK, torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        prev = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                out = fn()
        except BaseException:
            # a failed capture leaves its stream current (torch.cuda.graph's exit raised before restoring
            # it) and the allocator in a state later captures cannot trust: put the stream back and fail loudly
            torch.cuda.set_stream(prev)
            raise
        return graph, out


class GraphedCall:
    """fn(*tensors) replayed from a CUDA graph captured per input signature (shapes, dtypes, device).

    CPU inputs run fn directly. fn must be capturable (no host syncs: the GPU tests check our pieces). The
    outputs are fresh tensors (copies of the graph's static outputs). At most `max_graphs` signatures keep a
    graph (and its memory pool); the least recently used goes. One call at a time, on whichever stream:
    callers are serialised on the host, and each call's stream waits for the previous call's copies.
    """

    def __init__(self, fn, *, name: str = "", compile: bool = False, max_graphs: int = 8):
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.name = name or getattr(fn, "__name__", "fn")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None  # recorded after the last call's output copies

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor):
        if not args or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        with self._lock:
            if self._done is not None:  # the static buffers are free once the last call's copies ran
                torch.cuda.current_stream(args[0].device).wait_event(self._done)
            if key not in self._graphs:
                self._graphs[key] = self._capture(key, args)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            graph, static_in, static_out = self._graphs[key]
            for dst, src in zip(static_in, args):
                dst.copy_(src)
            graph.replay()
            out = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(args[0].device))
            return out

    def _capture(self, key: tuple, args: tuple[torch.Tensor, ...]):
        t0 = time.perf_counter()
        static_in = tuple(a.detach().clone() for a in args)
        graph, static_out = capture_graph(lambda: self.fn(*static_in), args[0].device)
        logger.info("%s: captured a CUDA graph for inputs %s in %.2fs", self.name, [k[0] for k in key],
                    time.perf_counter() - t0)
        return graph, static_in, static_out


class GraphedBackend:
    """The torch backend with its one-shot pieces (GRAPHED_PIECES) replayed from CUDA graphs; every other
    piece and attribute is the wrapped backend's."""

    def __init__(self, inner, *, compile: bool = False, max_graphs: int = 8):
        self.inner = inner
        self._calls = {p: GraphedCall(inner.pieces[p], name=p, compile=compile, max_graphs=max_graphs)
                       for p in GRAPHED_PIECES if p in inner.pieces}

    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = self._calls.get(piece)
        if call is None:
            return self.inner.run(piece, *inputs)
        out = call(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def __getattr__(self, name):  # name, model, cfg, pieces, device, dtype, embed, ...
        if name == "inner" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


__all__ = ["CAPTURE_LOCK", "GRAPHED_PIECES", "GraphedBackend", "GraphedCall", "capture_graph"]
