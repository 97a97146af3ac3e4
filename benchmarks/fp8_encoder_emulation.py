"""FP8 (E4M3) error of the full-size MingTok encoder, emulated in PyTorch on the CPU.

    python benchmarks/fp8_encoder_emulation.py --out DIR      # ~10 GB RAM, a few minutes on 2 cores

The same quantization as quant/qdq.py (per-output-channel weight scales, one static per-tensor
activation scale per linear from max calibration), applied to the eager modules with float8 casts:
calibrated on one random image, measured on another, per layer type. The ONNX build measured rel L2
0.64 for this piece on an H100 (benchmarks/results/export_full_h100.md); if this emulation stays far
below that, the difference lies in the ONNX path, not in FP8 itself.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.fp8 import E4M3_MAX, dequantize_rows_fp8, quantize_rows_fp8  # noqa: E402
from models.config import full_config  # noqa: E402
from models.mingtok import MingTok  # noqa: E402
from quant.policy import LayerPolicy  # noqa: E402


def linears(model):
    """The linears the build quantizes in the encoder piece (MingTok's encoder and semantic decoder)."""
    policy = LayerPolicy()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("pixel_decoder")
            and policy.quantizable(f"vision.{n}")}


def input_amax(model, enc, image) -> dict[str, float]:
    amax, hooks = {}, []
    for n, m in linears(enc).items():
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: amax.__setitem__(n, inp[0].abs().max().item())))
    with torch.no_grad():
        model.encode(image)
    for h in hooks:
        h.remove()
    return amax


def quantized_error(model, enc, image, ref, amax, which) -> dict[str, float]:
    saved, hooks = {}, []
    for n, m in linears(enc).items():
        if n not in amax or not which(n):  # amax holds the linears encode() runs
            continue
        saved[n] = m.weight.data
        m.weight.data = dequantize_rows_fp8(*quantize_rows_fp8(m.weight.data))
        s = amax[n] / E4M3_MAX
        hooks.append(m.register_forward_pre_hook(
            lambda mod, inp, s=s: ((inp[0] / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s,)))
    with torch.no_grad():
        out = model.encode(image)
    for h in hooks:
        h.remove()
    for n, w in saved.items():
        enc.get_submodule(n).weight.data = w
    return {k: ((out[k] - v).norm() / v.norm()).item() for k, v in ref.items() if torch.is_tensor(v) and v.is_floating_point()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = full_config().mingtok
    model = MingTok(cfg).eval()
    enc = model
    calib, fresh = (torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1 for _ in range(2))
    amax = input_amax(model, enc, calib)
    with torch.no_grad():
        ref = model.encode(fresh)
    result = {"note": "rel L2 vs fp32 eager on a fresh image; activation scales calibrated on another image",
              "all_linears": quantized_error(model, enc, fresh, ref, amax, lambda n: True)}
    result["encoder_only"] = quantized_error(model, enc, fresh, ref, amax, lambda n: n.startswith("low_level_encoder"))
    result["semantic_decoder_only"] = quantized_error(model, enc, fresh, ref, amax, lambda n: n.startswith("semantic_decoder"))
    for kind in ("qkv", "proj", "w12", "w3"):
        result[f"only_{kind}"] = quantized_error(model, enc, fresh, ref, amax, lambda n, k=kind: n.endswith(k))
    print(json.dumps(result, indent=1))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fp8_encoder_emulation.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
