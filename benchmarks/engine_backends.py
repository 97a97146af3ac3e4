"""The exported engines in benchmarks/speed.py: onnxruntime and TensorRT, where they run on this machine.

`python benchmarks/speed.py --engines DIR` loads an artifact folder of `python -m export.build` through
the runtime with each backend, records the piece calls of one text-to-image, then times every piece on
its last recorded call (a decode step for the LLM and the semantic decoder) and the whole text-to-image.
A backend that cannot run here (TensorRT not installed, no CUDA provider in onnxruntime) is listed with
the reason instead of a number.
"""
from __future__ import annotations

import json
from pathlib import Path

BACKENDS = ("onnxruntime", "tensorrt")
PROMPT = "a red bicycle"


class LastCalls:
    """Wraps a runtime backend and keeps each piece's most recent inputs (references: the loop makes
    new tensors each step, so nothing is copied even for full-size caches)."""

    def __init__(self, inner):
        self.inner, self.last = inner, {}

    def run(self, piece: str, *inputs):
        self.last[piece] = inputs
        return self.inner.run(piece, *inputs)

    def __getattr__(self, name):  # device, dtype, cfg, embed, ...
        return getattr(self.inner, name)


def time_engines(results: dict, rec, folder: Path, device, runs: int, e2e_runs: int) -> None:
    import runtime

    precision = json.loads((Path(folder) / "manifest.json").read_text())["precision"]
    skipped = results.setdefault("engines_skipped", {})
    for name in BACKENDS:
        try:
            rt = runtime.load(folder, backend=name, device=device)
        except Exception as exc:  # a missing library or provider is a result here, not a failure
            skipped[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"engines    {name}: not run ({skipped[name]})", flush=True)
            continue
        tag = f"{name}-{rt.device.type} {precision}"
        inner = rt.backend
        rt.backend = recorder = LastCalls(inner)
        rt.generate_image(PROMPT, seed=0)  # one generation: the last call of every piece it ran
        rt.backend = inner
        for piece, call in recorder.last.items():
            rec("engines", f"{piece} ({tag})", lambda piece=piece, call=call: inner.run(piece, *call), r=runs)
        rec("engines", f"text-to-image ({tag})", lambda rt=rt: rt.generate_image(PROMPT, seed=0), r=e2e_runs, w=1)


__all__ = ["BACKENDS", "LastCalls", "time_engines"]
