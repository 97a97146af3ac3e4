"""benchmarks/determinism_check.py: are the fast path's decode pieces bit-for-bit repeatable on this GPU?

    python benchmarks/determinism_check.py --out OUT    # GPU, full-size shapes, random weights

Each piece of the image-token step (LLM step, flow head, semantic-decoder step) is captured in its own
CUDA graph on fixed inputs (the steps write their KV caches at a fixed slot: replays are idempotent)
and replayed --replays times; any output that differs from the first replay is reported with its
largest difference. Then the whole loop: two generate() calls on the same prompt(s) (--prompts) and seed, the first
image token whose latent differs, and whether the pixel decoder alone repeats. Run for the FP8 kernels with and without torch.compile, with and without PDL, and
for the plain bf16 path (cuBLAS, gathered MoE) as the baseline. Writes OUT/determinism_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import full_model_on_gpu, token_inputs
from benchmarks.speed import capture, environment, pin_step, repeats
from kernels import set_pdl
from runtime.fast.graph import GraphImageGenerator


def repeatable(fn, out: torch.Tensor, replays: int) -> dict:
    _, differing, max_diff = repeats(capture(lambda: out.copy_(fn())), out, replays - 1)
    return {"replays": replays, "differing": differing, "max_abs_diff": max_diff}


def check(model, cache, kw, replays: int, **gen_kwargs) -> dict:
    g = GraphImageGenerator(model, **gen_kwargs)
    b, p_len = cache.kv[0].shape[0], cache.kv[0].shape[2]  # prompts, prompt length
    k = g.bucket_for(b, 2, p_len)
    g.generate(cache, **kw)  # loads the buffers with real prompts and 256 tokens of state
    pin_step(k, p_len)
    cfg = model.cfg
    dev = k.embeds.device
    hidden = torch.empty(2 * b, 1, cfg.llm.hidden_size, device=dev, dtype=g.dtype)
    res = {"llm_step": repeatable(lambda: g._llm_hidden(k), hidden, replays)}
    latent = torch.empty(b, cfg.mingtok.latent_dim, device=dev)
    res["flow_head"] = repeatable(lambda: g.flow(hidden.view(b, 2, -1), k.noise[3], *k.scalars), latent, replays)
    feats = torch.empty(b, 1, cfg.mingtok.semantic_dim, device=dev, dtype=g.dtype)
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
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    b = g.generate(cache, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
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
            "pixel_decoder_repeats": bool(torch.equal(d1, d2)),
            "second_loop_seconds": round(seconds, 3)}  # one image, wall clock (a rough figure; speed.py times)


def two_eager_loops(model, cache, kw, calls: list) -> tuple[list, list]:
    """Two text-to-image loops on one seed, ops launched one by one (no graph, no kernels), with a recorder
    appending to `calls`: what it recorded in the first loop and in the second."""
    g = GraphImageGenerator(model, kernels=False, compile=False, use_graph=False)
    g.generate(cache, **kw)
    a, calls[:] = list(calls), []
    g.generate(cache, **kw)
    return a, list(calls)


def first_divergence(model, cache, kw) -> dict:
    """Two eager loops (no graph) with every Linear, norm, router and MoE call recorded: the first call whose
    output differs between them, and whether its inputs were the same. Inputs equal and output different
    names the op that does not repeat; inputs already different means the difference came from before."""
    from torch import nn

    from models.llm import MoE, RMSNorm, Router

    kinds = (nn.Linear, nn.LayerNorm, RMSNorm, Router, MoE)
    calls: list = []

    def tensors(v):
        v = v if isinstance(v, (tuple, list)) else (v,)
        return [t.detach().clone() for t in v if isinstance(t, torch.Tensor)]

    hooks = [mod.register_forward_hook(lambda m, i, o, name=name: calls.append((name, tensors(i), tensors(o))))
             for name, mod in model.named_modules() if isinstance(mod, kinds)]
    try:
        a, b = two_eager_loops(model, cache, kw, calls)
    finally:
        for h in hooks:
            h.remove()

    def same(x, y):
        return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))

    # pair the k-th call of each module in the two runs (the first run also makes per-image caches, e.g.
    # the timestep embeddings of the schedule, so the two sequences need not line up call for call)
    by_name: dict = {}
    for name, i, o in b:
        by_name.setdefault(name, []).append((i, o))
    seen: dict = {}
    res = {"calls": [len(a), len(b)], "first_output_differs": None}
    for j, (name, ia, oa) in enumerate(a):
        k = seen[name] = seen.get(name, -1) + 1
        if k >= len(by_name.get(name, ())):
            continue
        ib, ob = by_name[name][k]
        if not same(oa, ob):
            res["first_output_differs"] = {
                "call": j, "module": name, "call_of_this_module": k, "inputs_identical": same(ia, ib),
                "max_abs_diff": [float((p.float() - q.float()).abs().max()) if p.dtype.is_floating_point
                                 else int((p != q).sum()) for p, q in zip(oa, ob)]}
            break
    return res


def attention_repeats(model, cache, kw, replays: int = 200) -> dict:
    """Every scaled_dot_product_attention call of two eager loops recorded: the first whose output differs
    between the runs, whether its inputs were identical, and then that call replayed `replays` times on
    its recorded inputs under each SDPA backend and two explicit forms (how many replays differ from the
    recorded output of the first run)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    calls: list = []

    def recording(q, k, v, attn_mask=None, **kwargs):
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None:  # the LLM's and the semantic decoder's static steps (the rest take no mask)
            calls.append(([t.clone() for t in (q, k, v, attn_mask)], kwargs, out.clone()))
        return out

    F.scaled_dot_product_attention = recording
    try:
        a, b = two_eager_loops(model, cache, kw, calls)
    finally:
        F.scaled_dot_product_attention = real
    return compare_attention_calls(a, b, real, model.cfg, replays)


def call_label(calls: list, j: int, cfg) -> dict:
    """Which piece, step and layer made attention call j: the LLM's calls have its head size, the rest are
    the semantic decoder's (one call per layer and step in both)."""
    llm = calls[j][0][0].shape[-1] == cfg.llm.head_dim
    same = sum(1 for c in calls[:j] if (c[0][0].shape[-1] == cfg.llm.head_dim) == llm)
    depth = cfg.llm.num_layers if llm else cfg.mingtok.semantic_depth
    return {"piece": "llm" if llm else "semantic decoder", "step": same // depth, "layer": same % depth}


def compare_attention_calls(a: list, b: list, real, cfg, replays: int) -> dict:
    """The first call of `a` whose output differs in `b`, and its inputs replayed per form: as the models
    ran it (models.sdpa's backends), torch's default dispatch, each backend forced, an explicit fp32 form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.sdpa import REPEATABLE_BACKENDS

    res = {"calls": [len(a), len(b)], "first_output_differs": None}
    for j, ((ia, kwa, oa), (ib, _, ob)) in enumerate(zip(a, b)):
        if torch.equal(oa, ob):
            continue
        res["first_output_differs"] = {"call": j, **call_label(a, j, cfg),
                                       "inputs_identical": all(torch.equal(x, y) for x, y in zip(ia, ib)),
                                       "max_abs_diff": float((oa.float() - ob.float()).abs().max())}
        (q, k, v, mask), kwargs = ia, kwa

        def explicit_fp32():
            rep = q.shape[1] // k.shape[1]
            kk, vv = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
            s = (q.float() @ kk.transpose(-1, -2)) * kwargs["scale"]
            return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv).to(q.dtype)

        def under(backends):
            def run():
                with sdpa_kernel(backends):
                    return real(q, k, v, attn_mask=mask, **kwargs)
            return run

        # (since models.sdpa repeats the KV heads of masked GQA on a GPU, the recorded call is no longer
        # the GQA call that session 6 found cuDNN to miss on: these replays are of the call as recorded)
        forms = {"as recorded (models.sdpa)": under(REPEATABLE_BACKENDS),
                 "torch default (cuDNN allowed)": lambda: real(q, k, v, attn_mask=mask, **kwargs),
                 "explicit fp32": explicit_fp32,
                 **{b.name: under(b) for b in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)}}
        res["replays"] = {}
        for name, fn in forms.items():
            try:
                outs = [fn() for _ in range(replays)]
            except Exception as exc:  # a backend that does not take these inputs
                res["replays"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            res["replays"][name] = {"equal_to_run_a": torch.equal(outs[0], oa), "equal_to_run_b": torch.equal(outs[0], ob),
                                    "replays_differing_from_first": sum(not torch.equal(o, outs[0]) for o in outs)}
        break
    # how often a recorded call does not repeat when run again as the models ran it
    with sdpa_kernel(REPEATABLE_BACKENDS):
        again = sum(not torch.equal(real(q, k, v, attn_mask=m, **kw_), out) for (q, k, v, m), kw_, out in a)
    res["calls_of_run_a_not_repeating"] = again
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--cases", default="", help="comma-separated case numbers to run (default: all)")
    p.add_argument("--prompts", type=int, default=1, help="a batch of this many prompts (8: the MoE's grouped kernels)")
    p.add_argument("--first-divergence", action="store_true",
                   help="only: two eager loops with every Linear/norm/router/MoE call recorded; the first that differs")
    p.add_argument("--attention", action="store_true",
                   help="only: record every attention call of two eager loops, replay the first that differs per backend")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): deterministic kernels where torch has a choice, and "
                        "fresh allocations filled with NaN (uninitialised reads show); run with CUBLAS_WORKSPACE_CONFIG=:4096:8")
    a = p.parse_args(argv)
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev, model = full_model_on_gpu("determinism_check", a.out)
    cache, kw = token_inputs(model, dev, a.prompts)
    results = {"env": environment(dev), "prompts": a.prompts, "deterministic_algorithms": a.deterministic,
               "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    path = a.out / "determinism_check.json"
    cases = {"bf16, no kernels, no compile (cuBLAS, gathered MoE)": dict(kernels=False, compile=False),
             "fp8 kernels, no compile, no PDL": dict(kernels=True, weights="fp8", compile=False, pdl=False),
             "fp8 kernels, no compile, PDL": dict(kernels=True, weights="fp8", compile=False, pdl=True),
             "fp8 kernels, torch.compile, PDL": dict(kernels=True, weights="fp8", compile=True, pdl=True),
             "fp8 kernels, torch.compile, no PDL": dict(kernels=True, weights="fp8", compile=True, pdl=False),
             # no CUDA graph: every step's ops launched one by one (tells graph replay from the ops themselves)
             "bf16, no kernels, no compile, no graph": dict(kernels=False, compile=False, use_graph=False)}
    if a.first_divergence or a.attention:
        with torch.no_grad():
            if a.first_divergence:
                results["first_divergence"] = first_divergence(model, cache, kw)
                print(results["first_divergence"], flush=True)
            if a.attention:
                results["attention"] = attention_repeats(model, cache, kw)
                print(results["attention"], flush=True)
        path.write_text(json.dumps(results, indent=1))
        return 0
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
