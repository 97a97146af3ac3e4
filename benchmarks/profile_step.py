"""benchmarks/profile_step.py: every kernel of one image-token step, by part, with its GPU time.

    python benchmarks/profile_step.py --out OUT [--weights fp8] [--prompts 8]   # a GPU: full shapes, random weights
    python benchmarks/profile_step.py --out OUT --smoke             # the tiny model on the CPU (ops, no graph)

The step's three parts (speed.token_parts: LLM step, flow head, semantic-decoder step + connector) are each
captured in a CUDA graph on the fast path's buffers, as speed.py's breakdown does, and replayed --replays times under
torch.profiler. For each part: the kernels of one replay grouped by name (count, total and mean time,
share of the part), the kernel count, and the gaps (the part's span minus its kernels' busy time: launch
latency and dependency stalls). This is where a part's time beyond its weights' HBM floor goes, and
what fewer or longer launches would win. Writes OUT/profile_step.json (with an environment block) and
OUT/profile_step.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pdl_check import token_inputs  # noqa: E402
from benchmarks.speed import capture, environment, pin_step, token_parts  # noqa: E402
from models import build, full_config, tiny_config  # noqa: E402
from runtime.fast.graph import GraphImageGenerator  # noqa: E402


def kernel_table(events, replays: int, cuda: bool) -> dict:
    """The kernel events of `replays` replays (on the CPU: the top-level ops) -> per-name totals of one
    replay (times in us)."""
    by_name: dict = defaultdict(lambda: {"count": 0, "us": 0.0})
    spans = []
    for e in events:
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (e.device_type != torch.autograd.DeviceType.CPU or e.cpu_parent is not None):
            continue
        row = by_name[e.name]
        row["count"] += 1
        row["us"] += e.time_range.elapsed_us()
        spans.append((e.time_range.start, e.time_range.end))
    rows = sorted(({"kernel": n[:120], "count": v["count"] / replays, "us": v["us"] / replays} for n, v in by_name.items()),
                  key=lambda r: -r["us"])
    busy = sum(r["us"] for r in rows)
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / replays if spans else 0.0
    for r in rows:
        r["mean_us"] = r["us"] / r["count"] if r["count"] else 0.0
        r["share"] = r["us"] / busy if busy else 0.0
    return {"kernels_per_replay": sum(r["count"] for r in rows), "busy_us": busy, "span_us": span,
            "gap_us": max(0.0, span - busy), "rows": rows}


def profile(fn, replays: int, cuda: bool) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm
    with torch_profile(activities=acts) as prof:
        for _ in range(replays):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return kernel_table(prof.events(), replays, cuda)


def markdown(res: dict, top: int) -> str:
    batch = f", {res['prompts']} prompts" if res.get("prompts", 1) > 1 else ""
    lines = [f"# Kernels of one image-token step ({res['weights']} weights{batch}, "
             f"{res['env'].get('gpu', res['env'].get('device'))})", ""]
    for part, t in res["parts"].items():
        lines += [f"## {part}: {t['kernels_per_replay']:.0f} kernels, {t['busy_us']:.0f} us busy, "
                  f"{t['span_us']:.0f} us span, {t['gap_us']:.0f} us between kernels", "",
                  "| kernel | per step | us | mean us | share |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['kernel'][:70]}` | {r['count']:.0f} | {r['us']:.1f} | {r['mean_us']:.2f} | {r['share']:.0%} |"
                  for r in t["rows"][:top]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--weights", choices=("bf16", "fp8"), default="fp8")
    p.add_argument("--replays", type=int, default=5)
    p.add_argument("--prompts", type=int, default=1, help="prompts in the batch (2 CFG rows each): where batch 8 "
                                                          "spends its time beyond batch 1's")
    p.add_argument("--top", type=int, default=25, help="kernels per part in the markdown table")
    p.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, eager ops (CI)")
    a = p.parse_args(argv)
    if a.prompts < 1:
        p.error("--prompts must be at least 1")
    smoke = a.smoke or not torch.cuda.is_available()
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU (or --smoke)")
    dev = torch.device("cpu" if smoke else "cuda")
    model = build(tiny_config() if smoke else full_config(), seed=0, device=dev,
                  dtype=torch.float32 if smoke else torch.bfloat16)
    cache, kw = token_inputs(model, dev, prompts=a.prompts)
    with torch.no_grad():
        gen = GraphImageGenerator(model, use_graph=not smoke, kernels=not smoke, weights="bf16" if smoke else a.weights)
        k = gen.bucket_for(a.prompts, 2, cache.kv[0].shape[2])  # captures the token graph on a GPU
        gen.generate(cache, **kw)  # real state in the buffers
        pin_step(k, cache.kv[0].shape[2])
        res = {"env": environment(dev), "weights": a.weights if not smoke else "fp32 (smoke)", "replays": a.replays,
               "prompts": a.prompts, "parts": {}}
        for name, fn in token_parts(gen, k).items():
            res["parts"][name] = profile(fn if smoke else capture(fn), a.replays, cuda=not smoke)
            t = res["parts"][name]
            print(f"{name:36s} {t['kernels_per_replay']:6.0f} kernels  busy {t['busy_us']:8.1f} us  "
                  f"span {t['span_us']:8.1f} us", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile_step.json").write_text(json.dumps(res, indent=1))
    (a.out / "profile_step.md").write_text(markdown(res, a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
