"""Ahead-of-time (AOTInductor) vs run-time (torch.compile) steps of the fast path, full size, on a GPU.

For each weight format: the JIT generator's set-up (compile + capture) and token step; then the AOT
packages' build (export + compile, what `export.build --targets aoti` spends), their set-up in a
fresh generator (load + capture, what a service pays at start) and token step; and the packages'
verification against the eager modules. Random weights of the released shapes.

    python benchmarks/compiled_steps.py --out DIR [--formats bf16,fp8] [--model full]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import environment, prompt, t2i_kwargs, timed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser("benchmarks/compiled_steps.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "full"], default="full")
    p.add_argument("--formats", default="bf16,fp8", help="decode weight formats, in this order (fp8 converts in place)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    from export.compiled_steps import compile_steps, verify_steps
    from models import build, get_config
    from runtime import loop
    from runtime.backends.torch_eager import TorchBackend
    from runtime.fast.compiled_steps import MAX_ROWS, load_compiled_steps
    from runtime.fast.graph import GraphImageGenerator

    dev = torch.device("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"environment": environment(dev), "command": " ".join(sys.argv), "formats": {}}
    path = a.out / f"compiled_steps_{a.model}.json"

    def save():
        path.write_text(json.dumps(res, indent=1, default=str))

    cfg = get_config(a.model)
    t = time.perf_counter()
    model = build(cfg, seed=0, device=dev, dtype=torch.bfloat16).eval()
    res["model_build_s"] = time.perf_counter() - t
    gen_t = torch.Generator().manual_seed(0)
    ids = prompt(cfg, 24, gen_t)
    backend = TorchBackend(model)
    cache = loop.prefill(backend, cfg, backend.embed(torch.tensor([ids], device=dev)))
    kw = t2i_kwargs(cfg, [ids], gen_t, dev)
    p_len = cache.kv[0].shape[2]

    def setup_and_step(g) -> tuple[float, dict, torch.Tensor]:
        t = time.perf_counter()
        k = g.bucket_for(1, 2, p_len)  # compile (JIT) + capture
        torch.cuda.synchronize()
        setup = time.perf_counter() - t
        out = g.generate(cache, **kw)  # loads the buffers

        def step():
            k.cache_pos.fill_(p_len + 8)
            k.step.fill_(8)
            k.sem_pos.fill_(8)
            k.graph.replay()
        return setup, timed(step, dev, 5, a.runs), out.latents.float()

    for fmt in [f for f in a.formats.split(",") if f]:
        r = res["formats"].setdefault(fmt, {})
        g = GraphImageGenerator(model, kernels=True, weights=fmt)
        r["jit_setup_s"], r["jit_step"], jit_latents = setup_and_step(g)
        print(f"{fmt}: jit set-up {r['jit_setup_s']:.1f}s, step {r['jit_step']['median_ms']:.2f} ms", flush=True)
        del g
        gc.collect()
        save()
        g = GraphImageGenerator(model, kernels=True, weights=fmt, compile=False)
        folder = a.out / f"aoti_{fmt}"
        folder.mkdir(exist_ok=True)
        t = time.perf_counter()
        entries, steps = compile_steps(g, folder, max_sequence=4096)
        r["aot_build_s"] = time.perf_counter() - t
        r["packages"] = {n: {"bytes": e["bytes"], "seconds": e["seconds"], "constants": len(e["constants"])}
                         for n, e in entries.items()}
        errors = {e["load_error"] for e in entries.values() if e.get("load_error")}
        if errors:  # written, but AOTInductor's loader cannot run here (runtime/fast/compiled_steps.probe_load)
            r["aot_load_error"] = errors.pop()
            print(f"{fmt}: aot build {r['aot_build_s']:.1f}s; not loadable here: {r['aot_load_error']}", flush=True)
            save()
            continue
        r["verification"] = verify_steps(g, steps, torch.bfloat16)
        tight = {n: (s["tightest"]["output"], round(s["tightest"]["rel_l2"], 4), round(s["tightest"]["allowed"], 4))
                 for n, s in r["verification"]["steps"].items()}
        print(f"{fmt}: aot build {r['aot_build_s']:.1f}s, verification {r['verification']['passed']} "
              f"(nearest its allowance, per step: output, rel L2, allowed: {tight})", flush=True)
        del steps
        save()
        g = GraphImageGenerator(model, kernels=True, weights=fmt, compile=False)
        t = time.perf_counter()
        entry = {"steps": entries}
        g.use_compiled_steps(load_compiled_steps(folder, entry, g))
        r["aot_load_s"] = time.perf_counter() - t
        setup, r["aot_step"], aot_latents = setup_and_step(g)
        r["aot_setup_s"] = r["aot_load_s"] + setup
        from export.verify import metrics

        # a whole loop compounds each step's rounding over its tokens: at full size with random weights any two
        # compilations part (benchmarks/results/h200_session19.md); the verification above is the accuracy check
        r["image_latents_aot_vs_jit"] = metrics(aot_latents, jit_latents)
        print(f"{fmt}: aot set-up {r['aot_setup_s']:.1f}s (load {r['aot_load_s']:.1f}s), step "
              f"{r['aot_step']['median_ms']:.2f} ms; latents vs jit rel L2 "
              f"{r['image_latents_aot_vs_jit']['rel_l2']:.3g}", flush=True)
        del g
        gc.collect()
        save()
    res["max_rows"] = MAX_ROWS
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
