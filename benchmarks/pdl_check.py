"""benchmarks/pdl_check.py: programmatic dependent launch (PDL) of the decode kernels, speed and bits.

    python benchmarks/pdl_check.py --out OUT        # GPU (SM 9.0+), full-size shapes, random weights

The full-size flow head (bf16 and FP8 weights, 2 CFG rows, 16 Euler steps) in one CUDA graph, then the
whole FP8 image-token step (runtime.fast.graph), each captured again per launch variant: without PDL
(twice: recapturing alone must not change a bit), PDL with the GEMMs letting the next kernel launch at
their start ("early") or after their main loop ("late"), and "late" with L2 prefetch of the first
weight tiles. Reports graph-replay medians and whether the outputs are bit-identical to the first
variant's (they must be: PDL moves launches in time, never the arithmetic). For the token step the
comparison is of whole images after 256 fed-back tokens, which at full size differ even between two runs
without PDL (pdl_h200.md): there `replays_identical` is the whole loop's repeatability, and the bits
PDL must not change are checked by the flow head here and by the pieces in determinism_check.py.
Writes OUT/pdl_check.json.
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

from benchmarks.speed import capture, environment, prompt, step_of, t2i_kwargs, timed
from kernels import set_pdl
from models import build, full_config
from runtime import loop
from runtime.backends.torch_eager import TorchBackend
from runtime.fast.graph import GraphImageGenerator
from runtime.fast.kernel_flow_head import KernelFlowHead

VARIANTS = {  # name: (PDL on, prefetch tiles, trigger)
    "without PDL": (False, 0, "late"),
    "without PDL, captured again": (False, 0, "late"),
    "PDL early trigger": (True, 0, "early"),
    "PDL late trigger": (True, 0, "late"),
    "PDL late trigger, prefetch 2 tiles": (True, 2, "late"),
}


def full_model_on_gpu(script: str, out: Path):
    """(device, the full-size model with seeded random weights in bf16) for the GPU-only checks."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    return dev, build(full_config(), seed=0, device=dev, dtype=torch.bfloat16)


def flow_head(model, fmt: str, runs: int, dev) -> dict:
    cfg = model.cfg
    kfh = KernelFlowHead(model, weights=fmt)
    hid, noise, sc = flow_head_inputs(model, dev)  # the other flow-head checks' inputs (before session 11: its own)
    out = torch.empty(1, cfg.mingtok.latent_dim, device=dev)
    res, first = {}, None
    for name, (on, tiles, trigger) in VARIANTS.items():
        set_pdl(on, tiles, trigger)
        replay = capture(lambda: out.copy_(kfh(hid, noise, *sc)))
        outs = []
        for _ in range(3):
            replay()
            outs.append(out.clone())
        first = outs[0] if first is None else first
        t = timed(replay, dev, 3, runs)
        res[name] = {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                     "replays_identical": all(torch.equal(o, outs[0]) for o in outs),
                     "identical_to_first_variant": bool(torch.equal(outs[0], first))}
        print(f"flow head {fmt:4s} {name:36s} {t['median_ms']:7.3f} ms  {res[name]}", flush=True)
    set_pdl(None)
    return res


def flow_head_inputs(model, dev, rows: int = 2, prompts: int = 1):
    """Seeded inputs of one flow-head call for the flow-head checks (flow_ablation, flow_chain_check,
    flow_sweep): LLM hidden (prompts, rows, H) bf16, noise (prompts, C), the guidance scales and temperature."""
    cfg = model.cfg
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(prompts, rows, cfg.llm.hidden_size, device=dev, generator=g).to(torch.bfloat16)
    noise = torch.randn(prompts, cfg.flow_head.latent_dim, device=dev, generator=g)
    return hid, noise, [torch.tensor([v], device=dev) for v in (3.0, 1.0, 1.0)]


def flow_head_bench(script: str, out: Path, rows: int = 2, prompts: int = 1):
    """What the flow-head checks (flow_ablation, flow_chain_check, flow_sweep) start from: (device, the
    full model, flow_head_inputs, a results dict with the environment and the head's shape)."""
    dev, model = full_model_on_gpu(script, out)
    res = {"env": environment(dev), "rows": rows, "prompts": prompts, "steps": model.cfg.flow_head.num_steps,
           "formats": {}}
    return dev, model, flow_head_inputs(model, dev, rows, prompts), res


def token_inputs(model, dev, prompts: int = 1):
    """Seeded prompts' prefill cache and the text-to-image arguments (2 CFG rows each)."""
    cfg = model.cfg
    backend = TorchBackend(model)
    gen = torch.Generator().manual_seed(0)
    ids = [prompt(cfg, 24, gen) for _ in range(prompts)]
    cache = loop.prefill(backend, cfg, backend.embed(torch.tensor(ids, device=dev)))
    return cache, t2i_kwargs(cfg, ids, gen, dev)


def token_step_ab(model, dev, fmt: str, variants: dict, runs: int, rounds: int) -> dict:
    """The compiled image-token step (batch 1, its 2 CFG rows) built once per variant in one process ({name: a
    callable that sets the variant up before its build}), then timed in `rounds` rounds in turn (every round's
    median kept, and the best). Each build's MoE kernels are kept alive: the next build's prepare_decode replaces
    them, and the earlier graph must still read live weights. Each variant's image from one seed is made twice
    (`repeats`); `identical`: every variant's image equals the first's."""
    from models.llm import MoE

    cache, kw = token_inputs(model, dev)
    p_len = cache.kv[0].shape[2]
    gens, res, images = {}, {}, []
    for name, setup in variants.items():
        setup()
        t0 = time.perf_counter()
        g = GraphImageGenerator(model, kernels=True, weights=fmt)
        k = g.bucket_for(1, 2, p_len)
        images.append(g.generate(cache, **kw).image)
        gens[name] = (g, k, [m.fused_decode for m in model.model.model.modules() if isinstance(m, MoE)])
        res[name] = {"setup_seconds": time.perf_counter() - t0,
                     "repeats": bool(torch.equal(images[-1], g.generate(cache, **kw).image))}
    res["identical"] = all(torch.equal(images[0], im) for im in images[1:])
    for _ in range(rounds):
        for name, (g, k, _) in gens.items():
            ms = timed(step_of(g, k, p_len), dev, 3, runs)["median_ms"]
            res[name].setdefault("round_medians_ms", []).append(ms)
            res[name]["median_ms"] = min(res[name]["round_medians_ms"])
            print(f"token step {fmt}, {name}: {ms:.3f} ms", flush=True)
    return res


def token_step(model, fmt: str, runs: int, dev, inductor_pdl: bool = False, only: tuple[str, ...] = ()) -> dict:
    """Without inductor_pdl the LLM/semantic steps compile without Inductor's PDL switch (MINGRT_INDUCTOR_PDL=0,
    the default before session 12); with it, with the switch, timing only the PDL variants. only: these
    VARIANTS alone (default: all)."""
    cache, kw = token_inputs(model, dev)
    t0 = time.perf_counter()
    was = os.environ.get("MINGRT_INDUCTOR_PDL")
    os.environ["MINGRT_INDUCTOR_PDL"] = "1" if inductor_pdl else "0"
    try:
        g = GraphImageGenerator(model, kernels=True, weights=fmt)
    finally:  # the caller's setting back
        if was is None:
            os.environ.pop("MINGRT_INDUCTOR_PDL")
        else:
            os.environ["MINGRT_INDUCTOR_PDL"] = was
    p_len = cache.kv[0].shape[2]
    res, first = {"setup_seconds": None}, None
    variants = {k: v for k, v in VARIANTS.items() if (v[0] or not inductor_pdl) and (not only or k in only)}
    for name, (on, tiles, trigger) in variants.items():
        set_pdl(on, tiles, trigger)
        g.reset_graphs()
        k = g.bucket_for(1, 2, p_len)
        res["setup_seconds"] = res["setup_seconds"] or time.perf_counter() - t0
        image = g.generate(cache, **kw).image
        again = g.generate(cache, **kw).image
        first = image if first is None else first
        t = timed(step_of(g, k, p_len), dev, 3, runs)
        res[name] = {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "replays_identical": bool(torch.equal(image, again)),
                     "identical_to_first_variant": bool(torch.equal(image, first))}
        print(f"token step {fmt:4s}{' +inductor PDL' if inductor_pdl else ''} {name:36s} {t['median_ms']:7.3f} ms  {res[name]}", flush=True)
    set_pdl(None)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--token-step-formats", default="fp8", help="comma-separated: bf16,fp8 (each compiles ~1 min)")
    p.add_argument("--inductor-pdl", action="store_true",
                   help="also the token steps compiled with Inductor's own PDL (one more compile per format)")
    p.add_argument("--skip-flow-head", action="store_true")
    p.add_argument("--variants", default="", help=f"the token step's variants to time, separated by ; (default: all of {list(VARIANTS)})")
    a = p.parse_args(argv)
    only = tuple(v for v in a.variants.split(";") if v)
    if any(v not in VARIANTS for v in only):
        p.error(f"--variants: choose from {list(VARIANTS)}")
    dev, model = full_model_on_gpu("pdl_check", a.out)
    results = {"env": environment(dev), "variants": {k: list(v) for k, v in VARIANTS.items()}}
    path = a.out / "pdl_check.json"
    with torch.no_grad():
        for fmt in () if a.skip_flow_head else ("bf16", "fp8"):
            results[f"flow_head_{fmt}"] = flow_head(model, fmt, a.runs, dev)
            path.write_text(json.dumps(results, indent=1))
        # (session 12's run 5 timed its bf16 step after the FP8 one, when prepare_decode still left the FP8
        # linears in place: a mix; a bf16 generator now puts the original linears back)
        for fmt in [f for f in a.token_step_formats.split(",") if f]:
            results[f"token_step_{fmt}"] = token_step(model, fmt, a.runs, dev, only=only)
            path.write_text(json.dumps(results, indent=1))
            if a.inductor_pdl:
                results[f"token_step_{fmt}_inductor_pdl"] = token_step(model, fmt, a.runs, dev, inductor_pdl=True, only=only)
                path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
