"""onnxruntime backend: one InferenceSession per piece, torch tensors in and out.

On CUDA, inputs and outputs are bound as device buffers (IOBinding): nothing crosses to the host.
If the CUDA provider was asked for but the session fell back to the CPU, loading fails loudly.
`InferenceSession.run` is thread-safe; IOBinding objects are not, so each call makes its own.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(int64)": torch.int64, "tensor(bool)": torch.bool}


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("onnxruntime is not installed: pip install 'mingrt[cpu]' (or 'mingrt[gpu]' for CUDA; "
                          "never both)") from exc
    return ort


class OrtPiece:
    def __init__(self, path: str | Path, device: str = "cpu", device_id: int = 0, threads: int | None = None):
        ort = import_ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("the CUDA provider is not available in this onnxruntime build: "
                                   "pip uninstall onnxruntime && pip install 'mingrt[gpu]'")
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:
            # Some onnxruntime releases fuse float8 Q/DQ + MatMul into an integer-only kernel and then
            # reject their own graph; the basic optimisation level keeps the Q/DQ as they are.
            if "float8" not in str(exc):
                raise
            logger.warning("%s: onnxruntime's Q/DQ fusion rejected the float8 graph (%s); using basic graph "
                           "optimisation", Path(path).name, str(exc).splitlines()[0][:120])
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"{path}: onnxruntime fell back to {self.session.get_providers()} instead of CUDA")
        self.device = torch.device(device, device_id) if device == "cuda" else torch.device("cpu")
        self.inputs = [(i.name, _ORT_TO_TORCH.get(i.type)) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs ({[n for n, _ in self.inputs]}), got {len(tensors)}")
        if self.device.type == "cuda":
            return self._run_bound(tensors)
        feeds = {}
        for (name, dt), t in zip(self.inputs, tensors):
            t = t.detach().to("cpu", dt or t.dtype).contiguous()
            feeds[name] = t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, feeds))

    def _run_bound(self, tensors):
        binding = self.session.io_binding()
        keep = []
        for (name, dt), t in zip(self.inputs, tensors):
            t = t.detach().to(self.device, dt or t.dtype).contiguous()
            if t.numel() == 0:  # an empty past: ORT wants a valid pointer even for zero elements
                t = torch.empty(1, dtype=t.dtype, device=self.device)[:0].view(t.shape)
            keep.append(t)
            binding.bind_input(name, "cuda", self.device.index or 0, _NP.get(t.dtype, np.float32), tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return tuple(torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy()).to(self.device)
                     for o in outs)


class OrtBackend:
    """The pieces of an artifact folder as onnxruntime sessions (created lazily, on first use)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, cfg, pieces: dict[str, str], embeddings: torch.Tensor,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = None):
        self.folder, self.cfg, self.files = Path(folder), cfg, pieces
        self.device = torch.device(device)
        self.dtype = dtype
        self.threads = threads
        self.table = embeddings.to(self.device, dtype)
        self._sessions: dict[str, OrtPiece] = {}

    def session(self, piece: str) -> OrtPiece:
        if piece not in self._sessions:
            if piece not in self.files:
                raise KeyError(f"piece {piece!r} was not built into {self.folder}; rebuild with "
                               f"python -m export.build --pieces {piece}")
            self._sessions[piece] = OrtPiece(self.folder / self.files[piece], self.device.type,
                                             self.device.index or 0, self.threads)
        return self._sessions[piece]

    def run(self, piece: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session(piece)(*inputs)
        return tuple(o.to(self.device) for o in outs)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device).clamp(0, self.table.shape[0] - 1)
        return self.table[ids]
