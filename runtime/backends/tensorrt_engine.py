"""One deserialized TensorRT engine with torch tensors as its I/O buffers.

Written against the documented TensorRT 10.x/11.x Python API (set_input_shape, set_tensor_address,
execute_async_v3); not run on our machines, where TensorRT cannot be installed.
Execution contexts are not thread-safe: make one per thread or stream (`new_context`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from export.tensorrt_build import _logger, import_trt


def _torch_dtypes(trt) -> dict:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, dt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("fp8", torch.float8_e4m3fn)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = dt
    return table


class TensorRTEngine:
    def __init__(self, plan_path: str | Path, device_index: int = 0):
        trt = import_trt()
        self.trt, self.device = trt, torch.device("cuda", device_index)
        self.runtime = trt.Runtime(_logger(trt, False))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or for "
                               "another GPU?); rebuild with python -m export.build --targets tensorrt")
        dtypes = _torch_dtypes(trt)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    @property
    def memory_bytes(self) -> int:
        e = self.engine
        return e.device_memory_size_v2 if hasattr(e, "device_memory_size_v2") else e.device_memory_size

    def new_context(self):
        return self.engine.create_execution_context()

    def infer(self, context, feeds: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        """Enqueue one run on `stream`; the outputs are valid once the stream reaches this point (no sync here)."""
        stream = stream or torch.cuda.current_stream(self.device)
        keep = []
        for name in self.input_names:
            t = feeds[name]
            want = self.dtypes[name]
            if t.dtype != want:
                if not (t.is_floating_point() and want.is_floating_point):
                    raise TypeError(f"{name}: engine wants {want}, got {t.dtype}")
                t = t.to(want)  # neighbours of another float type (an fp8 build's bf16 LLM next to fp32 pieces)
            t = t.to(self.device).contiguous()
            if t.numel() == 0:  # an empty past still needs a valid address
                t = torch.empty(1, dtype=t.dtype, device=self.device)[:0].view(t.shape)
            keep.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, outs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outs
