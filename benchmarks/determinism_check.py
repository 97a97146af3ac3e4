"""benchmarks/determinism_check.py: are the fast path's decode pieces bit-for-bit repeatable on this GPU?

    python benchmarks/determinism_check.py --out OUT    # GPU, full-size shapes, random weights

Each piece of the image-token step (LLM step, flow head, semantic-decoder step) is captured in its own
CUDA graph on fixed inputs (the steps write their KV caches at a fixed slot: replays are idempotent)
and replayed --replays times; any output that differs from the first replay is reported with its
largest difference. Then the whole loop: two generate() calls on the same prompt and seed, the first
image token whose latent differs, and whether the pixel decoder alone repeats. Run for the FP8 kernels with and without torch.compile, with and without PDL, and
for the plain bf16 path (cuBLAS, gathered MoE) as the baseline. Writes OUT/determinism_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import full_model_on_gpu, token_inputs
from benchmarks.speed import capture, environment
from kernels import set_pdl
from runtime.fast.graph import GraphImageGenerator


def repeatable(fn, out: torch.Tensor, replays: int) -> dict:
    replay = capture(lambda: out.copy_(fn()))
    replay()
    first = out.clone()
    diffs = []
    for _ in range(replays - 1):
        replay()
        if not torch.equal(out, first):
            diffs.append(float((out.float() - first.float()).abs().max()))
    return {"replays": replays, "differing": len(diffs), "max_abs_diff": max(diffs, default=0.0)}


def check(model, cache, kw, replays: int, **gen_kwargs) -> dict:
    g = GraphImageGenerator(model, **gen_kwargs)
    p_len = cache.kv[0].shape[2]
    k = g.bucket_for(1, 2, p_len)
    g.generate(cache, **kw)  # loads the buffers with a real prompt and 256 tokens of state
    k.cache_pos.fill_(p_len + 8)
    k.sem_pos.fill_(8)
    cfg = model.cfg
    dev = k.embeds.device
    hidden = torch.empty(2, 1, cfg.llm.hidden_size, device=dev, dtype=g.dtype)
    res = {"llm_step": repeatable(lambda: g._llm_hidden(k), hidden, replays)}
    latent = torch.empty(1, cfg.mingtok.latent_dim, device=dev)
    res["flow_head"] = repeatable(lambda: g.flow(hidden.view(1, 2, -1), k.noise[3], *k.scalars), latent, replays)
    feats = torch.empty(1, 1, cfg.mingtok.semantic_dim, device=dev, dtype=g.dtype)
    z = latent[:, None].to(g.dtype)
    res["semantic_step"] = repeatable(lambda: g._sem_step(z, k.sem_pos, *k.sem_caches)[0], feats, replays)
    res["loop"] = loop_repeats(g, model, cache, kw)
    return res


def first_difference(a: torch.Tensor, b: torch.Tensor, dim: int):
    """Index along `dim` of the first slice where a and b differ (None: bit-identical)."""
    differs = (a != b).transpose(0, dim).reshape(a.shape[dim], -1).any(-1).nonzero()
    return int(differs[0]) if len(differs) else None


def loop_repeats(g, model, cache, kw) -> dict:
    """Two whole text-to-image loops: where do they part (latents (B, N, C), features (B, N, D))?"""
    k = next(iter(g._buckets.values()))  # check() made the one bucket these prompts use
    a = g.generate(cache, **kw)
    kv_a = [t.clone() for t in k.llm_caches]  # every CFG row (LoopImage.cache keeps the cond rows only)
    b = g.generate(cache, **kw)
    d1, d2 = model.vision.decode_pixels(a.features), model.vision.decode_pixels(a.features)
    prompt_len = cache.kv[0].shape[2]
    # the LLM caches after the image: the first LLM step whose K/V differs in any row (step i writes slot
    # prompt_len + i, from token i-1's features; step 0 from <image_start>), and which tensor
    differing = [(q, i) for i, (x, y) in enumerate(zip(kv_a, k.llm_caches)) if (q := first_difference(x, y, 2)) is not None]
    kv = min(differing, default=None)
    return {"images_identical": bool(torch.equal(a.image, b.image)),
            "first_token_latent_differs": first_difference(a.latents, b.latents, 1),
            "first_token_features_differ": first_difference(a.features, b.features, 1),
            "first_llm_step_kv_differs": None if kv is None else kv[0] - prompt_len,
            "first_kv_tensor_differing": None if kv is None else kv[1],  # 2 * layer (+1: values)
            "pixel_decoder_repeats": bool(torch.equal(d1, d2))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--cases", default="", help="comma-separated case numbers to run (default: all)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): deterministic kernels where torch has a choice, and "
                        "fresh allocations filled with NaN (uninitialised reads show); run with CUBLAS_WORKSPACE_CONFIG=:4096:8")
    a = p.parse_args(argv)
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev, model = full_model_on_gpu("determinism_check", a.out)
    cache, kw = token_inputs(model, dev)
    results = {"env": environment(dev), "deterministic_algorithms": a.deterministic,
               "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    path = a.out / "determinism_check.json"
    cases = {"bf16, no kernels, no compile (cuBLAS, gathered MoE)": dict(kernels=False, compile=False),
             "fp8 kernels, no compile, no PDL": dict(kernels=True, weights="fp8", compile=False, pdl=False),
             "fp8 kernels, no compile, PDL": dict(kernels=True, weights="fp8", compile=False, pdl=True),
             "fp8 kernels, torch.compile, PDL": dict(kernels=True, weights="fp8", compile=True, pdl=True),
             "fp8 kernels, torch.compile, no PDL": dict(kernels=True, weights="fp8", compile=True, pdl=False),
             # no CUDA graph: every step's ops launched one by one (tells graph replay from the ops themselves)
             "bf16, no kernels, no compile, no graph": dict(kernels=False, compile=False, use_graph=False)}
    with torch.no_grad():
        pick = {int(c) for c in a.cases.split(",") if c}
        for i, (name, kwargs) in enumerate(cases.items()):
            if pick and i not in pick:
                continue
            set_pdl(kwargs.pop("pdl", None))
            results[name] = check(model, cache, kw, a.replays, **kwargs)
            print(name, results[name], flush=True)
            path.write_text(json.dumps(results, indent=1))
    set_pdl(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
