"""benchmarks/tokenizer_modes.py: MingTok's encoder and pixel decoder at 512 px under each way of running them.

    python benchmarks/tokenizer_modes.py --out OUT [--modes graph,compile,autotune]    # a GPU

Full-size MingTok (random weights of the released shapes, bf16), batch 1: the encoder (low-level encoder
+ the semantic decoder's causal pass, 257 tokens: latents and semantic features, as understanding and
editing need them), the low-level encoder alone ("encoder_latents": image -> latents, what an SD-VAE encode
gives) and the pixel decoder (1024 tokens) from a CUDA graph
(runtime/fast/graphed.py's capture), with the modules as they are ("graph"), torch.compile'd ("compile"),
or compiled with max-autotune's GEMM search ("autotune", no compiler graphs: ours wraps it). Median of
--runs replays after 2 s of warm-up, plus the ten kernels that take the most time in the "graph" form
(torch.profiler). Issue 5's targets on an H100: encode 0.7 ms, pixel decode 1.5 ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import full_model_on_gpu  # noqa: E402
from benchmarks.profile_step import profile  # noqa: E402
from benchmarks.speed import environment, settle, timed  # noqa: E402
from runtime.fast.graphed import capture_graph  # noqa: E402

COMPILE = {"graph": None, "compile": {}, "autotune": {"mode": "max-autotune-no-cudagraphs"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--modes", default="graph,compile,autotune")
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args(argv)
    for m in a.modes.split(","):
        if m not in COMPILE:
            p.error(f"--modes: unknown {m!r}; choose from {sorted(COMPILE)}")
    dev, model = full_model_on_gpu("tokenizer_modes.py", a.out)
    mt = model.cfg.mingtok
    g = torch.Generator(device=dev).manual_seed(0)
    img = (torch.rand(1, 3, mt.image_size, mt.image_size, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
    feats = torch.randn(1, mt.num_tokens, mt.semantic_dim, device=dev, generator=g).to(torch.bfloat16)
    pieces = {"encoder": (model.vision.encode, img), "encoder_latents": (model.vision.encode_latents, img),
              "pixel_decoder": (model.vision.decode_pixels, feats)}
    res = {"env": environment(dev), "image_size": mt.image_size, "pieces": {}}
    with torch.no_grad():
        for piece, (fn, x) in pieces.items():
            row = res["pieces"][piece] = {}
            for mode in a.modes.split(","):
                opts = COMPILE[mode]
                f = fn if opts is None else torch.compile(fn, dynamic=False, **opts)
                t = time.perf_counter()
                graph, _ = capture_graph(lambda f=f: f(x), dev)  # warm-up runs compile first
                setup = time.perf_counter() - t
                settle(graph.replay, dev, 1.0)
                ms = timed(graph.replay, dev, warmup=3, runs=a.runs)["median_ms"]
                row[mode] = {"median_ms": ms, "setup_seconds": setup}
                if mode == "graph":
                    row["top_kernels"] = profile(graph.replay, 5, True)["rows"][:10]
                print(f"{piece:14s} {mode:9s} {ms:7.3f} ms (setup {setup:.1f} s)", flush=True)
                (a.out / "tokenizer_modes.json").write_text(json.dumps(res, indent=1))
                del graph
    for piece, row in res["pieces"].items():
        for r in row.get("top_kernels", []):
            print(f"  {piece:14s} {r['count']:4.0f} x {r['mean_us']:7.2f} us  {r['share']:4.0%}  {r['kernel'][:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
