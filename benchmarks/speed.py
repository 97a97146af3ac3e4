"""benchmarks/speed.py: latency of Ming-UniVision's pieces and pipelines, eager vs the fast path, vs SD-VAE.

    python benchmarks/speed.py                      # GPU, full-size shapes, random weights (minutes)
    python benchmarks/speed.py --smoke              # CPU smoke test on the tiny model (seconds)

Every number is the median (and p90) over --runs runs after --warmup runs, timed with CUDA events on a
GPU; graph capture time is reported separately; peak memory is the max allocated. Results go to
<out>/speed.json (with an environment block), <out>/speed.md, and <out>/speed.png when matplotlib exists.
The end-to-end eager baseline is slow (tens of seconds per image), so it gets --e2e-runs runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import available as kernels_available
from models import build, full_config, tiny_config
from models.flow_head import draw_noise
from models.pieces import FlowHeadPiece, LLMPiece, SemanticDecoderPiece, SemanticDecoderStatic
from models.prompting import cfg_masks
from runtime import loop
from runtime.backends.torch_eager import TorchBackend
from runtime.fast.flow_head import FastFlowHead
from runtime.fast.graph import GraphImageGenerator

# HBM peak by GPU name (the floor below is bytes / this); the targets are for the H100 SXM
HBM_TBPS = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100-SXM4-80GB": 2.04,
            "A100 80GB PCIe": 1.94}


def hbm_tbps(device, override: float | None = None) -> float:
    """Peak HBM bandwidth of `device` in TB/s (--hbm-tbps overrides; unknown GPUs must pass it)."""
    if override:
        return override
    if device.type != "cuda":
        return HBM_TBPS["H100 80GB HBM3"]  # the smoke run's arithmetic only
    name = torch.cuda.get_device_name(device)
    for key, tbps in HBM_TBPS.items():
        if key in name:
            return tbps
    raise SystemExit(f"unknown HBM bandwidth for {name}: pass --hbm-tbps")


def timed(fn, device, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_ms": times[0], "runs": runs}


def settle(fn, device, seconds: float = 2.0) -> None:
    """Run fn for `seconds` before timing: an idle GPU needs a moment to reach its clocks. (It does not
    cure everything: on the H200 the first flow-head graph timed in a process still read ~10% slow after
    it, benchmarks/results/flow_ablation_h200_s8.json; time such series in rounds.)"""
    if device.type != "cuda":
        return
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        torch.cuda.synchronize()


def environment(device) -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), sm="".join(map(str, torch.cuda.get_device_capability())))
        try:
            import triton

            env["triton"] = triton.__version__
            from kernels import pdl_enabled

            env["pdl"] = pdl_enabled(device)  # programmatic dependent launch of the decode kernels
            from kernels.moe import GROUPED_MIN_ROWS, GROUPED_MIN_ROWS_FP8

            # MINGRT_MOE_GROUPED_MIN_ROWS may move them
            env["moe_grouped_min_rows"] = {"bf16": GROUPED_MIN_ROWS, "fp8": GROUPED_MIN_ROWS_FP8}
            from kernels.skinny import launch_table_path

            # the launch-config table the kernels read (gpu_run.sh may install a freshly swept one over the committed)
            table = launch_table_path()
            env["launch_table"] = ({"file": table.name, "sha256": hashlib.sha256(table.read_bytes()).hexdigest()[:16]}
                                   if table.exists() else None)
        except ImportError:
            pass
    try:
        import subprocess

        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        env["git_sha"] = proc.stdout.strip() if proc.returncode == 0 else None  # None: not a git checkout
        if os.environ.get("MINGRT_GIT_SHA"):  # a copied tree whose .git is not the one measured
            env["git_sha"] = os.environ["MINGRT_GIT_SHA"]
    except Exception:
        pass
    return env


def token_bytes(model, rows: int, el: int | None = None, experts: float | None = None) -> dict:
    """Weight bytes one image token must stream (the HBM floor), per component; el: bytes per weight
    (default: the model's dtype; 1 for FP8 weight streaming); experts: distinct routed experts one MoE
    layer reads (default the worst case, every row picking its own: min(E, k * rows); a measured
    count comes from benchmarks/routing_census.py)."""
    cfg = model.cfg
    el = el or next(model.parameters()).element_size()
    llm = cfg.llm
    if experts is None:
        experts = min(llm.num_experts, llm.num_experts_per_tok * rows)
    per_layer_active = ((llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim * llm.hidden_size  # qkv (config shapes:
                        + llm.num_heads * llm.head_dim * llm.hidden_size  # FP8 streaming swaps these modules) and dense
                        + 3 * llm.moe_intermediate_size * llm.hidden_size * experts
                        + 3 * llm.moe_intermediate_size * llm.num_shared_experts * llm.hidden_size
                        + llm.num_experts * llm.hidden_size)
    net = model.flow_head.net
    per_step = sum(p.numel() for n, p in net.named_parameters() if "adaLN" not in n and "time_embed" not in n and "cond_embed" not in n)
    once = sum(p.numel() for n, p in net.named_parameters() if "adaLN" in n or "cond_embed" in n) + sum(
        p.numel() for p in model.model.vis_head.parameters())
    sem = sum(p.numel() for p in model.vision.semantic_decoder.parameters()) + sum(p.numel() for p in model.linear_proj.parameters())
    out = {"llm": int(per_layer_active * llm.num_layers * el), "flow_head": (per_step * cfg.flow_head.num_steps + once) * el,
           "semantic_decoder": sem * el}
    out["total"] = sum(out.values())
    return out


def t2i_kwargs(cfg, prompts: list[list[int]], gen: torch.Generator, device) -> dict:
    """generate() arguments for a batch of prompts: their CFG masks, seeded noise, the guidance scales used
    throughout the benchmarks (the same for every script)."""
    t = cfg.tokens
    masks = [cfg_masks(q, t.user_prefix, t.assistant_prefix, [t.image_start, t.image_patch, t.image_end]) for q in prompts]
    return dict(noise=draw_noise(gen, len(prompts), cfg.num_image_tokens, cfg.mingtok.latent_dim).to(device),
                text_cfg=3.0, image_cfg=1.1, temperature=1.0,
                uncond_mask=torch.tensor([m[0] for m in masks], device=device),
                text_uncond_mask=torch.tensor([m[1] for m in masks], device=device))


def pin_step(k, p_len: int, token: int = 8) -> None:
    """Put bucket `k` at a fixed image token (`p_len`: the prompt's length): steps replayed from there write
    the same cache slots every time, so timing or repeating them is idempotent."""
    k.cache_pos.fill_(p_len + token)
    k.step.fill_(token)
    k.sem_pos.fill_(token)


def token_parts(gen, k) -> dict:
    """The image-token step's three parts as callables on bucket `k`'s static buffers."""
    hidden = torch.zeros(k.b * k.r, 1, gen.cfg.llm.hidden_size, device=k.embeds.device, dtype=gen.dtype)
    latent = torch.zeros(k.b, 1, gen.cfg.mingtok.latent_dim, device=k.embeds.device, dtype=gen.dtype)
    return {"LLM step": lambda: hidden.copy_(gen._llm_hidden(k)),
            "flow head": lambda: gen.flow(hidden.view(k.b, k.r, -1), k.noise[0], *k.scalars),
            "semantic decoder step + connector": lambda: gen._sem_step(latent, k.sem_pos, *k.sem_caches)}


def step_of(g, k, p_len: int):
    """One image-token step of generator `g` on bucket `k` (its graph, or its ops eagerly), at a fixed
    position 8 tokens into the image, so repeated calls are idempotent."""
    def step():
        pin_step(k, p_len)
        if k.graph is not None:
            k.graph.replay()
        else:
            g._step(k)
    return step


def prompt(cfg, n_text: int, gen: torch.Generator):
    t = cfg.tokens
    special = {t.image_start, t.image_patch, t.image_end, t.eos, t.pad, *t.user_prefix, *t.assistant_prefix}
    ids = [int(i) for i in torch.randint(0, cfg.llm.vocab_size, (4 * n_text,), generator=gen) if int(i) not in special][:n_text]
    return [*t.user_prefix, *ids, *t.assistant_prefix]


# result labels that the markdown reads back (eager_ratios, sdvae_table, batch_floor): written and read from here
EAGER_STEP = "image-token step: static caches, eager"
EAGER_T2I = "text-to-image, eager pieces (baseline)"


def t2i_label(how: str, batch: int = 1) -> str:
    return f"text-to-image, {how} (batch {batch})"


def tokenizer_label(who: str, what: str, size: int, how: str) -> str:
    """who: "SD-VAE" (fp16) or "MingTok" (bf16); how: "eager", "torch.compile" or "CUDA graph"."""
    return f"{who} {what} {size}px {'fp16' if who == 'SD-VAE' else 'bf16'} {how}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python benchmarks/speed.py", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few runs (CI)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--e2e-runs", type=int, default=5, help="runs of the fast end-to-end text-to-image")
    p.add_argument("--eager-e2e-runs", type=int, default=1, help="runs of the (slow) eager end-to-end baseline")
    p.add_argument("--batch", type=int, default=8, help="prompts in the batched text-to-image run (1: none)")
    p.add_argument("--skip-eager-e2e", action="store_true")
    p.add_argument("--skip-sdvae", action="store_true")
    p.add_argument("--compile-tokenizer", action="store_true",
                   help="also time MingTok's encoder and pixel decoder torch.compile'd inside their CUDA graphs")
    p.add_argument("--compile-sdvae", action=argparse.BooleanOptionalAction, default=True,
                   help="time torch.compile'd SD-VAE encode and decode at both sizes too, as users run it (default; "
                        "about 20 s of compile each on an H200; --no-compile-sdvae: eager only)")
    p.add_argument("--only", default="", help="comma-separated subset: pieces,e2e,batch,eager-e2e,sdvae,sdvae-ar,fp8,engines "
                                               "(default: all; the FP8 SD-VAE-latent pipeline needs sdvae-ar and fp8)")
    p.add_argument("--no-kernels", action="store_true", help="skip the Triton-kernel variants")
    p.add_argument("--flow-chain", action="store_true",
                   help="also time the FP8 token graph with the experimental one-launch flow-head Euler step "
                        "(kernels/flow_chain.py), last")
    p.add_argument("--no-pdl-ab", action="store_true", help="skip re-timing the kernel token graphs without PDL and "
                                                            "with its other settings (four recaptures per format)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--hbm-tbps", type=float, help="peak HBM bandwidth for the floor (default: by GPU name)")
    p.add_argument("--engines", type=Path, help="an export.build folder: also time its onnxruntime/TensorRT engines "
                                               "(per piece and end to end) where they run here")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only write the markdown table and plot of a saved results JSON (next to it), then exit")
    a = p.parse_args(argv)
    if a.render is not None:
        r = json.loads(a.render.read_text())
        a.render.with_suffix(".md").write_text(markdown(r))
        plot(r, a.render.with_suffix(".png"))
        print(f"wrote {a.render.with_suffix('.md')}")
        return 0
    only = {x for x in a.only.split(",") if x}
    want = lambda part: not only or part in only
    smoke = a.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    runs, warmup = (3, 1) if smoke else (a.runs, a.warmup)
    cfg = tiny_config() if smoke else full_config()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(cfg, seed=0, device=device, dtype=dtype)
    results = {"env": environment(device), "config": cfg.name, "dtype": str(dtype), "build_seconds": time.perf_counter() - t0,
               "pieces": {}, "pipelines": {}, "breakdown": {}, "sdvae": {}, "engines": {}}
    print(f"model built in {results['build_seconds']:.1f}s on {device} ({dtype})", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows, n = 2, cfg.num_image_tokens
    h, lat = cfg.llm.hidden_size, cfg.mingtok.latent_dim
    backend = TorchBackend(model)

    a.out.mkdir(parents=True, exist_ok=True)
    name = "speed_smoke" if smoke else "speed"

    def save():  # after every measurement: a run cut short keeps what it measured
        (a.out / f"{name}.json").write_text(json.dumps(results, indent=1))
        (a.out / f"{name}.md").write_text(markdown(results))

    def rec(group, label, fn, r=runs, w=None):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = timed(fn, device, warmup if w is None else w, r)
        if device.type == "cuda":
            res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results[group][label] = res
        print(f"{group:10s} {label:40s} median {res['median_ms']:9.2f} ms  p90 {res['p90_ms']:9.2f} ms", flush=True)
        save()
        return res

    with torch.no_grad():
        ids = prompt(cfg, 24, gen)
        cache = loop.prefill(backend, cfg, backend.embed(torch.tensor([ids], device=device)))
        # --- pieces -------------------------------------------------------------------------------
        # one set of piece inputs, shared by the timings and the single-step accuracy checks
        past = cache.kv[0].shape[2] + n // 2
        kv = tuple(torch.randn(rows, t.shape[1], past, t.shape[3], device=device, dtype=dtype) for t in cache.kv)
        x = torch.randn(rows, 1, h, device=device, dtype=dtype)
        mask = torch.ones(rows, past + 1, dtype=torch.long, device=device)
        pos = torch.full((rows, 1), past, device=device)
        no_img = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        hid = torch.randn(1, rows, h, device=device, dtype=dtype)
        noise1 = torch.randn(1, lat, device=device)
        sc = [torch.tensor([v], device=device) for v in (3.0, 1.1, 1.0)]
        mt = cfg.mingtok
        skv = tuple(torch.randn(1, mt.semantic_dim // mt.head_dim, n // 2, mt.head_dim, device=device, dtype=dtype)
                    for _ in range(2 * mt.semantic_depth))
        zlat = torch.randn(1, 1, lat, device=device, dtype=dtype)

        def semantic_static_step():
            """The semantic step as the fast path runs it: static caches holding skv, the decode-attention kernel."""
            caches = [torch.zeros(*t.shape[:2], t.shape[2] + 1, t.shape[3], device=device, dtype=dtype) for t in skv]
            for c, t in zip(caches, skv):
                c[:, :, :t.shape[2]] = t
            at = torch.tensor([skv[0].shape[2]], device=device)
            return SemanticDecoderStatic(model, fused=True)(zlat, at, *caches)[0]

        def piece_outputs(moe_mode, flow_module):
            """One step of each decode piece on the inputs above (no autoregressive feedback); moe_mode
            "fused" (the kernels) takes the semantic step's static form, as the fast path does."""
            sem = semantic_static_step() if moe_mode == "fused" else SemanticDecoderPiece(model)(zlat, *skv)[0]
            return {"llm_hidden": LLMPiece(model, moe_mode)(x, mask, pos, no_img, *kv)[0].float(),
                    "flow_latent": flow_module(hid, noise1, *sc).float(),
                    "semantic_features": sem.float()}

        reference_outputs = piece_outputs("gather", FlowHeadPiece(model))
        step_accuracy = results.setdefault("single_step_accuracy", {})
        # the reference against itself with another summation order (per-expert MoE loop, hoisted flow
        # head): how far bf16 rounding alone moves each piece with these random weights
        step_accuracy["reference_reordered"] = rel_errors(piece_outputs("loop", FastFlowHead(model)), reference_outputs)
        if want("pieces"):
            llm_step = LLMPiece(model, "gather")
            rec("pieces", "llm_step (2 rows, gather MoE) eager", lambda: llm_step(x, mask, pos, no_img, *kv))
            flow, fast = FlowHeadPiece(model), FastFlowHead(model)
            rec("pieces", "flow_head (2 rows, 16 steps) eager", lambda: flow(hid, noise1, *sc))
            rec("pieces", "flow_head hoisted invariants", lambda: fast(hid, noise1, *sc))
            if device.type == "cuda" and kernels_available() and not a.no_kernels:
                from runtime.fast.kernel_flow_head import KernelFlowHead

                for fmt in ("bf16", "fp8"):  # launch-bound outside a graph: the token step below is the real number
                    kfh = KernelFlowHead(model, weights=fmt)
                    rec("pieces", f"flow_head kernels {fmt} (eager launches)", lambda: kfh(hid, noise1, *sc))
                    del kfh
            sem = SemanticDecoderPiece(model)
            rec("pieces", "semantic_decoder step eager", lambda: sem(zlat, *skv))
            feats = torch.randn(1, n, mt.semantic_dim, device=device, dtype=dtype)
            rec("pieces", f"pixel_decoder {mt.image_size}px", lambda: model.vision.decode_pixels(feats))
            img = torch.rand(1, 3, mt.image_size, mt.image_size, device=device, dtype=dtype) * 2 - 1
            rec("pieces", f"encoder {mt.image_size}px", lambda: model.vision.encode(img))
            # the latents alone (image -> tokens, as an SD-VAE encode): `encode` adds the semantic features
            rec("pieces", f"encoder to latents {mt.image_size}px", lambda: model.vision.encode_latents(img))
            if device.type == "cuda":  # as the runtime runs them on a GPU (runtime/fast/graphed.py)
                from runtime.fast.graphed import GraphedCall

                for compiled in (False, True) if a.compile_tokenizer else (False,):
                    how = "CUDA graph" + (" + torch.compile" if compiled else "")
                    gdec = GraphedCall(model.vision.decode_pixels, name="pixel_decoder", compile=compiled)
                    genc = GraphedCall(model.vision.encode, name="encoder", compile=compiled)
                    glat = GraphedCall(model.vision.encode_latents, name="encoder_latents", compile=compiled)
                    t = time.perf_counter()
                    gdec(feats), genc(img), glat(img)  # capture (and compile)
                    results[f"tokenizer_capture_seconds_{'compiled' if compiled else 'graph'}"] = time.perf_counter() - t
                    rec("pieces", f"pixel_decoder {mt.image_size}px, {how}", lambda: gdec(feats))
                    rec("pieces", f"encoder {mt.image_size}px, {how}", lambda: genc(img))
                    rec("pieces", f"encoder to latents {mt.image_size}px, {how}", lambda: glat(img))
                    del gdec, genc, glat


        # --- token step and text-to-image ---------------------------------------------------------
        kw = t2i_kwargs(cfg, [ids], gen, device)
        eager_gen = GraphImageGenerator(model, use_graph=False, kernels=False)
        graph_gen = GraphImageGenerator(model, kernels=False)
        t = time.perf_counter()
        p_len = cache.kv[0].shape[2]
        bucket = graph_gen.bucket_for(1, rows, p_len)
        results["graph_capture_seconds"] = time.perf_counter() - t if device.type == "cuda" else 0.0
        eb = eager_gen.bucket_for(1, rows, p_len)
        graph_gen.generate(cache, **kw)  # loads the buffers; then time replays of the token graph alone
        eager_gen.generate(cache, **kw)

        rec("pipelines", EAGER_STEP, step_of(eager_gen, eb, p_len))
        step = rec("pipelines", "image-token step: one CUDA graph", step_of(graph_gen, bucket, p_len))  # always: the floor needs it
        # --- the HBM floor (weights one token must stream) --------------------------------------------------------------------------
        tb = token_bytes(model, rows)
        peak = hbm_tbps(device, a.hbm_tbps)
        floor_ms = tb["total"] / (peak * 1e12) * 1e3
        tb8 = token_bytes(model, rows, el=1)
        results["floor"] = {"bytes_per_token": tb, "hbm_tbps": peak, "token_floor_ms": floor_ms,
                            "image_floor_s": floor_ms * n / 1e3,
                            "token_step_fraction_of_floor": floor_ms / step["median_ms"],
                            "fp8_bytes_per_token": tb8, "fp8_token_floor_ms": tb8["total"] / (peak * 1e12) * 1e3}
        print(f"floor: {tb['total'] / 1e9:.2f} GB per token -> {floor_ms:.2f} ms; graph step reaches "
              f"{results['floor']['token_step_fraction_of_floor']:.0%} of it", flush=True)
        save()

        def kernel_variant(fmt: str):
            """Generator on the kernels with `fmt` weights: setup time, token step, accuracy, breakdown."""
            t = time.perf_counter()
            g = GraphImageGenerator(model, kernels=True, weights=fmt)
            k = g.bucket_for(1, rows, p_len)  # captures (and compiles) here
            results[f"kernel_graph_setup_seconds_{fmt}"] = time.perf_counter() - t
            g.generate(cache, **kw)
            res = rec("pipelines", f"image-token step: CUDA graph + kernels ({fmt})", step_of(g, k, p_len))
            step_accuracy[f"kernels_{fmt}"] = rel_errors(piece_outputs("fused", g.flow), reference_outputs)
            breakdown(g, k, fmt, rec)
            if g.pdl and not a.no_pdl_ab:
                pdl_ab(g, fmt)
            if a.flow_chain and fmt == "fp8":
                chain_ab(g, fmt)
            return g, res

        def recaptured(g, fmt: str, variant: str):
            """After a change to how `g` launches: capture its token graph again, run a request, time the step."""
            g.reset_graphs()
            kk = g.bucket_for(1, rows, p_len)
            g.generate(cache, **kw)
            return kk, rec("pipelines", f"image-token step: CUDA graph + kernels ({fmt}), {variant}", step_of(g, kk, p_len))

        def chain_ab(g, fmt: str):
            """The same token graph with the flow head's Euler steps as one persistent launch each."""
            g.flow.set_chain(True)
            kk, r = recaptured(g, fmt, "flow chain")
            results["flow_chain"] = {"median_ms": r["median_ms"], "barrier_timed_out": g.flow.chains()[0].failed()}
            rec("breakdown", f"flow head, CUDA graph + kernels ({fmt}), flow chain", capture(token_parts(g, kk)["flow head"]))
            g.flow.set_chain(False)
            g.reset_graphs()
            g.bucket_for(1, rows, p_len)

        def pdl_ab(g, fmt: str):
            """The same token graph launched without PDL, with the GEMMs triggering the next launch early,
            and with L2 prefetch. (That PDL changes no bit is checked on fixed inputs by
            benchmarks/pdl_check.py and the GPU tests: whole images are not repeatable at full size yet.)"""
            from kernels import set_pdl
            from kernels._triton import PDL_PREFETCH_TILES, PDL_TRIGGER

            ab = results.setdefault("pdl", {"default_prefetch_tiles": PDL_PREFETCH_TILES, "default_trigger": PDL_TRIGGER})
            variants = [("without PDL", False, None, None), ("PDL, early trigger", True, None, "early"),
                        ("PDL, prefetch 2 tiles", True, 2, None)]
            for label, on, tiles, trigger in variants:
                set_pdl(on, tiles, trigger)
                _, r = recaptured(g, fmt, label)
                ab[f"{fmt}: {label}"] = {"median_ms": r["median_ms"]}
            set_pdl(None)
            g.reset_graphs()
            g.bucket_for(1, rows, p_len)

        use_kernels = device.type == "cuda" and kernels_available() and not a.no_kernels
        if use_kernels:  # bf16 kernels: the MoE reads its stacked weights in place, the flow head packs a copy
            kern_gen, ks = kernel_variant("bf16")
            results["floor"]["kernel_bf16_fraction_of_floor"] = floor_ms / ks["median_ms"]
        fast_gen = kern_gen if use_kernels else graph_gen
        images = {}
        if want("e2e"):
            rec("pipelines", t2i_label("CUDA graph per token"), lambda: graph_gen.generate(cache, **kw),
                r=a.e2e_runs, w=1)
            if use_kernels:
                rec("pipelines", t2i_label("CUDA graph + kernels bf16"), lambda: kern_gen.generate(cache, **kw),
                    r=a.e2e_runs, w=1)
            images["fast"] = fast_gen.generate(cache, **kw).image.float()
            images["graph"] = graph_gen.generate(cache, **kw).image.float()
        bcache = None
        if want("batch") and a.batch > 1:  # (the smoke run takes 2 prompts)
            bsz = min(a.batch, 2) if smoke else a.batch
            pids = [prompt(cfg, 24, gen) for _ in range(bsz)]
            bcache = loop.prefill(backend, cfg, backend.embed(torch.tensor(pids, device=device)))
            bkw = t2i_kwargs(cfg, pids, gen, device)
            pb = bcache.kv[0].shape[2]

            def time_batch(g, fmt: str, step_label: str, e2e_label: str, floor: dict):
                """Batch text-to-image, its token step and parts on generator g, and their ratios to batch 1."""
                g.generate(bcache, **bkw)
                rec("pipelines", t2i_label(e2e_label, bsz), lambda: g.generate(bcache, **bkw),
                    r=a.e2e_runs, w=0)
                bk = g.bucket_for(bsz, rows, pb)
                rec("pipelines", f"image-token step: {step_label}, batch {bsz}", step_of(g, bk, pb))
                if g.kernels:
                    breakdown(g, bk, fmt, rec, f", batch {bsz}")
                batch_floor(results, floor, bsz, fmt, step_label, e2e_label)
                save()

            experts = {1: routed_experts(model, cache, kw, rows), bsz: routed_experts(model, bcache, bkw, rows)}
            results["batch"] = {"prompts": bsz, "distinct_experts_per_layer": {str(b): e for b, e in experts.items()},
                                "formats": {}}
            # floors with the measured experts, now: FP8 streaming later swaps the modules these bytes are counted from
            floors = {fmt: {b: token_bytes(model, rows * b, el=el, experts=e)["total"] / (peak * 1e12) * 1e3
                            for b, e in experts.items()} for fmt, el in (("model", None), ("fp8", 1))}
            if use_kernels:
                time_batch(fast_gen, "bf16", "CUDA graph + kernels (bf16)", "CUDA graph + kernels bf16", floors["model"])
            else:
                time_batch(fast_gen, str(dtype).split(".")[-1], "one CUDA graph", "CUDA graph per token", floors["model"])
        if want("eager-e2e") and not a.skip_eager_e2e:
            out = {}
            rec("pipelines", EAGER_T2I,
                lambda: out.update(img=loop.generate_image(backend, cfg, cache, **kw).image), r=a.eager_e2e_runs, w=0)
            images["eager"] = out["img"].float()

        # --- SD-VAE (diffusers AutoencoderKL, SD config, random weights) ----------------------------
        if want("sdvae") and not a.skip_sdvae and not smoke:
            sdvae(results, device, runs, warmup, rec, model, a.compile_sdvae)

        # --- the same LLM + flow head generating SD-VAE latents (1024 tokens) -----------------------
        if want("sdvae-ar") and not smoke and not a.skip_sdvae:
            sdvae_ar(results, rec, model, cache, kw, gen, use_kernels, a.e2e_runs)

        # --- FP8 weight streaming last: it swaps the decode linears for FP8 ones in place ----------
        if use_kernels and want("fp8"):
            fp8_gen, fs = kernel_variant("fp8")
            results["floor"]["kernel_fp8_fraction_of_fp8_floor"] = results["floor"]["fp8_token_floor_ms"] / fs["median_ms"]
            rec("pipelines", t2i_label("CUDA graph + kernels fp8"), lambda: fp8_gen.generate(cache, **kw),
                r=a.e2e_runs, w=1)
            images["fast_fp8"] = fp8_gen.generate(cache, **kw).image.float()
            if bcache is not None:  # the same batch with FP8 weights
                time_batch(fp8_gen, "fp8", "CUDA graph + kernels (fp8)", "CUDA graph + kernels fp8", floors["fp8"])
            if want("sdvae-ar") and not a.skip_sdvae:  # the SD-VAE-latent pipeline on the same FP8 weights
                sdvae_ar(results, rec, model, cache, kw, gen, use_kernels, a.e2e_runs, weights="fp8")
        results["accuracy"] = accuracy(images, "fp32" if dtype == torch.float32 else "bf16")
        print("image accuracy:", results["accuracy"], flush=True)
        print("single-step accuracy (relative L2 vs the eager reference):", step_accuracy, flush=True)

    if a.engines is not None and want("engines"):  # last: the engines' own models are loaded next to ours
        from benchmarks.engine_backends import time_engines

        time_engines(results, rec, a.engines, device, runs, 1 if smoke else a.e2e_runs)
    save()
    plot(results, a.out / f"{name}.png")
    print(f"wrote {a.out / name}.json/.md")
    return 0


def sdvae_ar(results, rec, model, cache, kw, gen, use_kernels: bool, runs: int, weights: str = "bf16"):
    """The same LLM + flow head generating SD-VAE latents (1024 tokens for 512 px) and decoding them with the
    SD-VAE, on the fast path with `weights` (benchmarks/sdvae_ar.py)."""
    _sdvae_ar_timed(results, rec, model, cache, kw, gen, use_kernels, runs, weights)
    torch.cuda.empty_cache()  # the generator's graphs and caches and the VAE went with the call: later runs get them


def _sdvae_ar_timed(results, rec, model, cache, kw, gen, use_kernels: bool, runs: int, weights: str):
    try:
        from benchmarks.sdvae_ar import SDVAELatentGenerator, sd_vae
        vae = sd_vae(next(model.parameters()).device)
    except ImportError:
        results["sdvae"]["note_ar"] = "diffusers is not installed: pip install diffusers"
        return
    sd_gen = SDVAELatentGenerator(model, vae, kernels=use_kernels, **({"weights": weights} if use_kernels else {}))
    n = sd_gen.cfg.num_image_tokens
    skw = dict(kw, noise=draw_noise(gen, 1, n, model.cfg.mingtok.latent_dim).to(kw["noise"].device))
    image = sd_gen.generate(cache, **skw).image  # captures the graph
    results["sdvae"]["ar_image_shape"] = list(image.shape)
    label = f"CUDA graph + kernels {weights}" if use_kernels else "CUDA graph"
    rec("pipelines", f"text-to-image via SD-VAE latents ({n} tokens) + SD-VAE decode, {label}",
        lambda: sd_gen.generate(cache, **skw), r=runs, w=0)


def rel_errors(got: dict, ref: dict) -> dict:
    from export.verify import metrics

    return {k: metrics(got[k], ref[k])["rel_l2"] for k in ref}


def capture(fn):
    """fn captured in a CUDA graph (after warm-ups on a side stream, runtime.fast.graphed.capture_graph);
    returns the replay."""
    from runtime.fast.graphed import capture_graph

    return capture_graph(fn, torch.device("cuda", torch.cuda.current_device()))[0].replay


def repeats(replay, out: torch.Tensor, replays: int) -> tuple[torch.Tensor, int, float]:
    """Replay a graph that writes `out` once, then `replays` more times: (the first output, how many of
    the others differ from it, the largest difference)."""
    replay()
    first = out.clone()
    diffs = []
    for _ in range(replays):
        replay()
        if not torch.equal(out, first):
            diffs.append(float((out.float() - first.float()).abs().max()))
    return first, len(diffs), max(diffs, default=0.0)


def breakdown(gen, k, fmt: str, rec, suffix: str = ""):
    """The token step's three parts, each in its own CUDA graph, on the generator's static buffers."""
    for name, fn in token_parts(gen, k).items():
        rec("breakdown", f"{name}, CUDA graph + kernels ({fmt}){suffix}", capture(fn) if k.graph is not None else fn)


def routed_experts(model, cache, kw: dict, rows: int) -> float:
    """Distinct routed experts an MoE layer reads per image token in a whole text-to-image run of this
    cache's prompts, averaged over layers and tokens (benchmarks/routing_census.py; a cuBLAS graph of
    its own, so the timed graphs carry no counting ops)."""
    from benchmarks.routing_census import RoutingCensus

    census = RoutingCensus(model)
    g = GraphImageGenerator(model, kernels=False)
    with census.counting():
        g.bucket_for(cache.kv[0].shape[0], rows, cache.kv[0].shape[2])  # the capture records the counting
        census.reset()  # its warm-up steps counted too
        g.generate(cache, **kw)
        per_layer = census.mean_distinct()
    del g
    return statistics.fmean(per_layer)


def batch_floor(results: dict, floor: dict, bsz: int, fmt: str, step_label: str, e2e_label: str) -> None:
    """results["batch"]["formats"][fmt]: the HBM floors (ms) of a batch-1 and a batch-`bsz` token with the
    measured routed experts (`floor`, by batch size), their ratio (what batching must cost at least), and
    the measured ratios (pipelines "image-token step: {step_label}[, batch N]" and "text-to-image,
    {e2e_label} (batch N)")."""
    step = results["pipelines"]
    one = step[f"image-token step: {step_label}"]
    many = step[f"image-token step: {step_label}, batch {bsz}"]
    out = {"floor_ms": {str(b): f for b, f in floor.items()}, "floor_ratio": floor[bsz] / floor[1],
           "step_ms": {"1": one["median_ms"], str(bsz): many["median_ms"]},
           "step_ratio": many["median_ms"] / one["median_ms"],
           "fraction_of_floor": {"1": floor[1] / one["median_ms"], str(bsz): floor[bsz] / many["median_ms"]}}
    e2e = {b: step.get(t2i_label(e2e_label, b)) for b in (1, bsz)}
    if all(e2e.values()):
        out["text_to_image_ratio"] = e2e[bsz]["median_ms"] / e2e[1]["median_ms"]
    results["batch"]["formats"][fmt] = out
    print(f"batch {bsz} ({fmt}): step {out['step_ratio']:.2f}x batch 1, HBM floor {out['floor_ratio']:.2f}x "
          f"({results['batch']['distinct_experts_per_layer']} distinct experts per MoE layer)", flush=True)


def accuracy(images: dict, model_precision: str) -> dict:
    """PSNR (dB, images in [-1, 1]) of the fast paths' images against the eager reference (same seed),
    with the build's floor for that precision (export/verify.py). With random weights the 256-token
    feedback loop amplifies any rounding difference, so 'graph' (the same ops as the reference, only
    fused differently by cuBLAS) is the baseline to read the others against; the single-step
    accuracy (results["single_step_accuracy"]) measures each piece without that feedback."""
    from export.verify import IMAGE_PSNR_FLOOR, psnr

    out = {}
    ref = images.get("eager")
    for key, fmt in (("graph", model_precision), ("fast", model_precision), ("fast_fp8", "fp8")):
        if ref is not None and key in images:
            out[f"{key}_psnr_db"] = psnr(images[key], ref)
            out[f"{key}_floor_db"] = IMAGE_PSNR_FLOOR[fmt]
    return out


def sdvae(results, device, runs, warmup, rec, model, compile_vae: bool, sizes=(512, 1024)):
    """SD-VAE (diffusers AutoencoderKL, SD config, random weights) encode and decode at 512 and 1024 px as users
    run it (fp16 eager, and torch.compile'd unless --no-compile-sdvae), against MingTok's encoder (to latents, and with
    the semantic features), and pixel decoder at the same sizes, eager and in the runtime's CUDA graphs."""
    try:
        from benchmarks.sdvae_ar import SD_LATENT_CHANNELS, sd_vae
        vae = sd_vae(device)
    except ImportError:
        results["sdvae"]["note"] = "diffusers is not installed: pip install diffusers"
        return
    from runtime.fast.graphed import GraphedCall

    mt, vdt = model.cfg.mingtok, next(vae.parameters()).dtype  # fp16, as users run it
    enc, dec = (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample)
    # one compiled callable per direction; dynamic=False: each size compiles once, as a service warms up
    cenc, cdec = (torch.compile(enc, dynamic=False), torch.compile(dec, dynamic=False)) if compile_vae else (None, None)
    g_lat = GraphedCall(model.vision.encode_latents, name="encoder_latents")
    g_enc = GraphedCall(model.vision.encode, name="encoder")
    g_dec = GraphedCall(model.vision.decode_pixels, name="pixel_decoder")
    compile_s = results["sdvae"].setdefault("compile_seconds", {})
    for size in sizes:
        x = torch.randn(1, 3, size, size, device=device, dtype=vdt)
        z = torch.randn(1, SD_LATENT_CHANNELS, size // 8, size // 8, device=device, dtype=vdt)
        rec("sdvae", tokenizer_label("SD-VAE", "encode", size, "eager"), lambda: enc(x))
        rec("sdvae", tokenizer_label("SD-VAE", "decode", size, "eager"), lambda: dec(z))
        if compile_vae:
            for name, fn, arg in (("encode", cenc, x), ("decode", cdec, z)):
                t = time.perf_counter()
                try:
                    fn(arg)
                    torch.cuda.synchronize(device)
                except Exception as exc:  # report, don't hide
                    results["sdvae"][f"compile_error_{name}_{size}"] = repr(exc)[:300]
                    continue
                compile_s[f"{name} {size}px"] = time.perf_counter() - t
                rec("sdvae", tokenizer_label("SD-VAE", name, size, "torch.compile"), lambda fn=fn, arg=arg: fn(arg))
        g = size // mt.patch_size  # encoder patch grid
        img = torch.rand(1, 3, size, size, device=device, dtype=torch.bfloat16) * 2 - 1
        pos = () if g == mt.grid else (model.vision.low_level_encoder.position_embedding(g, g).detach(),)
        feats = torch.randn(1, g * g, mt.semantic_dim, device=device, dtype=torch.bfloat16)  # one per encoder patch
        for label, fn, graphed, args in (("encode to latents", model.vision.encode_latents, g_lat, (img, *pos)),
                                          ("encode (latents + semantic features)", model.vision.encode, g_enc, (img, *pos)),
                                          ("pixel decoder", model.vision.decode_pixels, g_dec, (feats,))):
            rec("sdvae", tokenizer_label("MingTok", label, size, "eager"), lambda fn=fn, args=args: fn(*args))
            rec("sdvae", tokenizer_label("MingTok", label, size, "CUDA graph"),
                lambda graphed=graphed, args=args: graphed(*args))


def markdown(r: dict) -> str:
    env = r.get("env", {})
    lines = [f"# Speed ({r.get('config', '?')} shapes, {r.get('dtype', '?')}, {env.get('gpu', env.get('device', '?'))})", "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, git {(env.get('git_sha') or 'unknown')[:10]}", "",
             "| group | what | median ms | p90 ms | peak GiB |", "| --- | --- | ---: | ---: | ---: |"]
    for group in ("pieces", "pipelines", "breakdown", "sdvae", "engines"):
        for name, v in r.get(group, {}).items():
            if isinstance(v, dict) and "median_ms" in v:
                lines.append(f"| {group} | {name} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} | {v.get('peak_mem_gib', 0):.1f} |")
    for backend, why in r.get("engines_skipped", {}).items():
        lines.append(f"| engines | {backend}: not run here ({why}) | - | - | - |")
    f = r.get("floor")
    if f:
        lines += ["", f"HBM floor: {f['bytes_per_token']['total'] / 1e9:.2f} GB streamed per image token -> "
                      f"{f['token_floor_ms']:.2f} ms at {f['hbm_tbps']} TB/s ({f['image_floor_s']:.2f} s per image); "
                      f"the graph step reaches {f['token_step_fraction_of_floor']:.0%} of it.",
                  f"Graph capture: {r.get('graph_capture_seconds', 0):.2f} s (once per shape bucket)."]
        if "kernel_bf16_fraction_of_floor" in f:
            lines.append(f"With the Triton kernels the bf16 step reaches {f['kernel_bf16_fraction_of_floor']:.0%} of the bf16 floor.")
        if "kernel_fp8_fraction_of_fp8_floor" in f:
            lines.append(f"FP8 weight streaming: floor {f['fp8_token_floor_ms']:.2f} ms per token; the FP8 step reaches "
                         f"{f['kernel_fp8_fraction_of_fp8_floor']:.0%} of it.")
    b = r.get("batch")
    if b:
        e = b["distinct_experts_per_layer"]
        lines += ["", f"Batch of {b['prompts']} prompts: an MoE layer reads {e['1']:.1f} distinct routed experts per token at "
                      f"batch 1 and {e[str(b['prompts'])]:.1f} at batch {b['prompts']} (measured over whole runs), so the "
                      "batch's HBM floor is higher:"]
        for fmt, v in b["formats"].items():
            t2i = f", text-to-image {v['text_to_image_ratio']:.2f}x" if "text_to_image_ratio" in v else ""
            lines.append(f"- {fmt}: token step {v['step_ratio']:.2f}x batch 1{t2i}; floor {v['floor_ratio']:.2f}x "
                         f"({v['floor_ms']['1']:.2f} -> {v['floor_ms'][str(b['prompts'])]:.2f} ms); the batch step reaches "
                         f"{v['fraction_of_floor'][str(b['prompts'])]:.0%} of its floor.")
    pdl = {k: v for k, v in (r.get("pdl") or {}).items() if isinstance(v, dict)}
    if pdl:
        trigger = r["pdl"].get("default_trigger", "early")  # runs before the trigger was recorded used "early"
        lines += ["", f"Programmatic dependent launch (default: on, {trigger} trigger, "
                      f"{r['pdl']['default_prefetch_tiles']} weight tiles prefetched into L2 per program before the wait), "
                      "the same token graph recaptured: " + "; ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in pdl.items())]
    lines += eager_ratios(r)
    lines += sdvae_table(r)
    acc = r.get("single_step_accuracy") or {}
    if acc:
        lines += ["", "Single-step accuracy (relative L2 against the eager bf16 reference, same inputs, no feedback):", "",
                  "| path | " + " | ".join(next(iter(acc.values()))) + " |", "| --- |" + " ---: |" * len(next(iter(acc.values())))]
        for path, errs in acc.items():
            lines.append(f"| {path} | " + " | ".join(f"{v:.2e}" for v in errs.values()) + " |")
    img = r.get("accuracy") or {}
    if img:
        lines += ["", "Image PSNR against the eager reference after 256 autoregressive tokens (dB; random weights amplify "
                      "any rounding difference through the feedback loop, so read 'graph' as the baseline): "
                  + ", ".join(f"{k.replace('_psnr_db', '')} {v:.1f}" for k, v in img.items() if k.endswith("psnr_db"))]
    return "\n".join(lines) + "\n"


def eager_ratios(r: dict) -> list[str]:
    """Markdown lines: each batch-1 token step and MingTok text-to-image against the eager reference of the same run
    (eager median / its median), as issue 5 asks every number to be reported. Only the pipelines themselves: not the
    recaptured A/B variants ("..., without PDL"), the batches, or the SD-VAE-latent pipeline (another token count)."""
    pipe = r.get("pipelines", {})
    forms = ((EAGER_STEP, re.compile(r"^image-token step: [^,]+$")),
             (EAGER_T2I, re.compile(r"^text-to-image, [^,]+ \(batch 1\)$")))
    out = []
    for base, form in forms:
        ref = pipe.get(base)
        if not isinstance(ref, dict) or not ref.get("median_ms"):
            continue
        out += [f"- {label}: {ref['median_ms'] / v['median_ms']:.1f}x" for label, v in pipe.items()
                if label != base and form.match(label) and isinstance(v, dict) and v.get("median_ms")]
    if not out:
        return []
    return ["", "Against the eager reference of the same run (eager median / median; batch 1):", *out]


def sdvae_table(r: dict) -> list[str]:
    """Markdown lines: SD-VAE against MingTok side by side per image size (medians, ms; '-' where not timed), and
    the two text-to-image pipelines (s) for each weight format timed."""
    sd, pipe = r.get("sdvae", {}), r.get("pipelines", {})
    sizes = sorted({int(w[:-2]) for k in sd for w in k.split() if w.endswith("px") and w[:-2].isdigit()})
    if not sizes:
        return []

    def t(group: dict, label: str, scale: float = 1.0) -> str:
        v = group.get(label)
        return f"{v['median_ms'] / scale:.2f}" if isinstance(v, dict) and "median_ms" in v else "-"

    mt = lambda what, s: (f"{t(sd, tokenizer_label('MingTok', what, s, 'CUDA graph'))} "
                          f"({t(sd, tokenizer_label('MingTok', what, s, 'eager'))})")
    vae = lambda what, s: (f"{t(sd, tokenizer_label('SD-VAE', what, s, 'eager'))} / "
                           f"{t(sd, tokenizer_label('SD-VAE', what, s, 'torch.compile'))}")
    rows = [("SD-VAE encode, fp16 eager / torch.compile", lambda s: vae("encode", s)),
            ("MingTok encoder to latents, bf16 CUDA graph (eager)", lambda s: mt("encode to latents", s)),
            ("MingTok encoder with semantic features, bf16 CUDA graph (eager)",
             lambda s: mt("encode (latents + semantic features)", s)),
            ("SD-VAE decode, fp16 eager / torch.compile", lambda s: vae("decode", s)),
            ("MingTok pixel decoder, bf16 CUDA graph (eager)", lambda s: mt("pixel decoder", s))]
    lines = ["", "SD-VAE against MingTok (median ms):", "", "| | " + " | ".join(f"{s} px" for s in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]
    lines += [f"| {name} | " + " | ".join(cell(s) for s in sizes) + " |" for name, cell in rows]
    for label in sorted(k for k in pipe if k.startswith("text-to-image via SD-VAE latents")):
        kern = re.search(r"kernels (\w+)$", label)  # the fast path's weights; else the cuBLAS graph (--no-kernels)
        how, mingtok = ((kern.group(1), t2i_label(f"CUDA graph + kernels {kern.group(1)}")) if kern
                        else ("CUDA graph", t2i_label("CUDA graph per token")))
        tokens = re.search(r"\((\d+ tokens)\)", label)
        lines.append(f"| text-to-image {how} (s): MingTok 256 tokens / SD-VAE latents "
                     f"{tokens.group(1) if tokens else ''} + SD-VAE decode | {t(pipe, mingtok, 1e3)} / {t(pipe, label, 1e3)} |"
                     + " |" * (len(sizes) - 1))
    return lines


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    items = [(f"{g}: {k}", v["median_ms"]) for g in ("pieces", "pipelines", "sdvae", "engines") for k, v in r.get(g, {}).items()
             if isinstance(v, dict) and "median_ms" in v]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(items) + 1))
    ax.barh([i[0] for i in items], [i[1] for i in items])
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
