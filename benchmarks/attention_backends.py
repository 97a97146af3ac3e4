"""benchmarks/attention_backends.py: the pixel decoder's and the encoder's attention shapes under each SDPA backend.

    python benchmarks/attention_backends.py --out OUT       # a GPU; writes OUT/attention_backends.json

The fast path keeps cuDNN out of torch's attention (models/sdpa.py: it did not repeat bit for bit on
the decode shapes). For the tokenizer's full-sequence calls (pixel decoder: 1024 tokens, bidirectional;
encoder's semantic pass: 257 tokens, causal) this times each backend alone (a CUDA graph of 20 calls: replay median / 20) and
counts how many of --repeats calls differ from the first (for contiguous q, k, v and for the strided views of
one packed projection the models pass), and how far each is from fp32 math, to see what keeping cuDNN out costs there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import capture, environment, settle, timed  # noqa: E402

SHAPES = {"pixel_decoder (1024 tokens)": (1, 16, 1024, 64, False), "encoder semantic pass (257 tokens, causal)": (1, 16, 257, 64, True)}
CALLS = 20  # per graph replay
LAYOUTS = ("contiguous", "qkv views")
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_backends.py needs a CUDA GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"env": environment(dev), "shapes": {}}
    for (shape, (b, h, n, d, causal)), layout in itertools.product(SHAPES.items(), LAYOUTS):
        if layout == "contiguous":
            q, k, v = (torch.randn(b, h, n, d, device=dev, generator=g).to(torch.bfloat16) for _ in range(3))
        else:  # as models/vit_layers.SelfAttention passes them: views of one (B, N, 3, H, d) projection
            q, k, v = torch.randn(b, n, 3, h, d, device=dev, generator=g).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
        name = f"{shape}, {layout}"
        row = res["shapes"][name] = {}
        with sdpa_kernel([SDPBackend.MATH]):  # fp32 reference of the same inputs
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        for label, backend in BACKENDS.items():
            def call(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            try:
                first = call()
            except RuntimeError as exc:  # a backend that does not take this shape here
                row[label] = {"error": str(exc).splitlines()[0][:200]}
                continue
            differing = sum(not torch.equal(call(), first) for _ in range(a.repeats))
            replay = capture(lambda call=call: [call() for _ in range(CALLS)])  # no host launch time in the number
            settle(replay, dev, 0.5)
            row[label] = {"median_us": timed(replay, dev, warmup=3, runs=20)["median_ms"] * 1e3 / CALLS,
                          "differing_of_repeats": differing, "repeats": a.repeats,
                          "max_abs_vs_fp32_math": float((first.float() - ref).abs().max())}
            print(f"{name:58s} {label:9s} {row[label]['median_us']:7.1f} us  differing {differing}/{a.repeats}  "
                  f"max abs vs fp32 {row[label]['max_abs_vs_fp32_math']:.2e}", flush=True)
    (a.out / "attention_backends.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
