"""benchmarks/fp8_widen.py: how the FP8 decode kernels widen their weights, and what each way costs.

    python benchmarks/fp8_widen.py --out OUT                      # a GPU (SM 8.9+)
    python benchmarks/fp8_widen.py --out OUT --sweep w12,w3        # also sweep those GEMMs' tiles per way

The FP8 GEMMs run at 2.3-3.0 TB/s where the same kernel with bf16 weights reaches 3-4 TB/s
(benchmarks/results/kernels_h200.md). At 2 rows each weight element costs one MMA lane and one
widening to fp16; in the 32-row tiles the tables pick, two warps share each weight row, so each
element is widened twice, on the conversion pipe (a quarter of the integer pipe's rate, from the
CUDA guide's throughput table; an inference, not a measurement here). This script measures three ways
(kernels/_triton.py FP8_WIDEN_MODES: the hardware convert, moving bits with integer instructions,
half each) and 2 or 4 warps:

1. exactness: every one of the 256 E4M3 bytes, at each of the four byte positions of a register,
   widened by each way on the GPU, against torch's float8 -> float32 (NaN bytes excepted: the weights
   hold none);
2. every FP8 decode GEMM of the full-size model at its tabled launch config (kernels/configs/), each way
   x warps, and each result compared bit for bit with the hardware convert's at the same config;
3. the fused MoE layer at 2 rows (grouped and per-slot kernels), each way;
4. --sweep: those GEMMs' candidate tiles for each way and warp count.
Writes OUT/fp8_widen.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import graph_time_us, moe_weights, shapes, skinny_case, time_configs  # noqa: E402
from benchmarks.speed import environment  # noqa: E402
from kernels._triton import FP8_WIDEN_MODES, require, set_fp8_widen  # noqa: E402
from kernels.moe import moe_decode  # noqa: E402
from kernels.skinny import candidate_configs, pick_config, skinny_gemm  # noqa: E402
from models import full_config  # noqa: E402

SHORT = {"w12": "flow w12 + SwiGLU", "w3": "flow w3 gated residual", "adaln": "flow adaLN"}


def widen_probe():
    """A one-program kernel: dst[i] = widen_e4m3(src[i]) (made on first use: it needs triton)."""
    require()
    from kernels._triton import tl, triton, widen_e4m3

    @triton.jit
    def probe(src_ptr, dst_ptr, N: tl.constexpr, WIDEN: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(dst_ptr + r, widen_e4m3(tl.load(src_ptr + r), WIDEN))
    return probe


def exactness(dev) -> dict:
    """Each way against torch for all 256 bytes at each byte position of a 32-bit register."""
    probe = widen_probe()
    codes = torch.arange(256, dtype=torch.uint8, device=dev)
    want = codes.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(want)
    out = {}
    for mode, widen in FP8_WIDEN_MODES.items():
        bad = 0
        for shift in range(4):  # rotate so each byte visits each position of its 4-byte group
            src = torch.roll(codes, shift).contiguous()
            dst = torch.empty(256, dtype=torch.float16, device=dev)
            # one warp: 8 consecutive bytes per thread, so the inline asm sees all four positions of a register
            probe[(1,)](src.view(torch.float8_e4m3fn), dst, N=256, WIDEN=widen, num_warps=1)
            got = dst.float() * (1.0 if widen == 0 else 256.0)
            ref = torch.roll(want, shift)
            ok = torch.roll(finite, shift)
            bad += int(((got != ref) & ok).sum())
        out[mode] = {"mismatches": bad, "checked": 4 * int(finite.sum())}
        print(f"exactness {mode:6s}: {bad} of {4 * int(finite.sum())} finite bytes differ", flush=True)
    return out


def gemm_case(name, m, n, k, epi, dev):
    """One FP8 GEMM of shapes() with its operands (benchmarks/kernels.skinny_case)."""
    c = skinny_case(m, n, k, epi, "fp8", dev)
    return dict(c, name=name, m=m, n=n, k=k, epi=epi, mb=c["nbytes"] / 1e6)


def run_gemm(c, config, widen_mode, reps):
    """(us per launch, one launch's output on a fresh output buffer) for one way of widening."""
    set_fp8_widen(widen_mode)
    out = torch.zeros(c["m"], c["n"], device=c["x"].device)
    kw = dict(c["kw"], config=config)
    skinny_gemm(c["x"], c["ws"][0], out, **kw)
    ref = out.clone()
    us = graph_time_us(lambda i: skinny_gemm(c["x"], c["ws"][i], out, **kw), c["copies"], reps)
    return us, ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--modes", default=",".join(FP8_WIDEN_MODES))
    p.add_argument("--warps", default="4,2")
    p.add_argument("--sweep", default="", help=f"GEMMs whose candidate tiles to sweep per way ({','.join(SHORT)})")
    p.add_argument("--no-moe", action="store_true")
    a = p.parse_args(argv)
    modes = a.modes.split(",")
    warps = [int(w) for w in a.warps.split(",")]
    for m in modes:
        if m not in FP8_WIDEN_MODES:
            p.error(f"--modes: unknown {m!r}; choose from {sorted(FP8_WIDEN_MODES)}")
    if not torch.cuda.is_available():
        raise SystemExit("fp8_widen.py needs a CUDA GPU")
    dev = torch.device("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"env": environment(dev), "exactness": exactness(dev), "gemms": [], "moe": [], "sweeps": {}}
    save = lambda: (a.out / "fp8_widen.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    save()
    cfg = full_config()
    cases = [gemm_case(name, m, n, k, epi, dev) for name, m, n, k, epi, formats in shapes(cfg) if "fp8" in formats]
    for c in cases:
        base = pick_config(c["m"], c["n"], c["k"], True, c["epi"], dev)
        ref = None
        for nw in warps:
            config = dict(base, num_warps=nw)
            for mode in modes:
                try:
                    us, y = run_gemm(c, config, mode, a.reps)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"  {c['name']} {mode} {nw} warps: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                if ref is None:
                    ref = y
                same = bool(torch.equal(y, ref))  # against the first way and warp count at this tile
                row = {"name": c["name"], "rows": c["m"], "N": c["n"], "K": c["k"], "weight_mb": c["mb"], "config": config,
                       "mode": mode, "us": us, "tbps": c["mb"] / us, "bitwise_equal_to_first": same}
                res["gemms"].append(row)
                print(f"{c['name']:40s} {nw} warps {mode:6s} {us:8.2f} us {row['tbps']:5.2f} TB/s  same bits {same}",
                      flush=True)
                save()
    if not a.no_moe:  # one MoE layer at 2 rows that chose the same experts (a prompt's CFG rows)
        llm = cfg.llm
        e, k = llm.num_experts, llm.num_experts_per_tok
        ws, scales = moe_weights(llm, "fp8")
        g = torch.Generator().manual_seed(1)
        id_sets = [torch.randperm(e, generator=g)[:k].repeat(2, 1).to(dev) for _ in range(12)]  # rotate past L2
        x = torch.randn(2, llm.hidden_size, device=dev, dtype=torch.float16)  # as the runtime hands FP8 kernels rows
        topw = torch.rand(2, k, device=dev)
        out = torch.empty(2, llm.hidden_size, device=dev)
        for grouped in (True, False):
            ref = None
            for mode in modes:
                set_fp8_widen(mode)
                call = lambda j: moe_decode(x, id_sets[j], topw, *ws, scales, out=out, grouped=grouped)  # noqa: E731
                y = call(0).clone()
                ref = y if ref is None else ref
                us = graph_time_us(call, len(id_sets), a.reps)
                row = {"grouped": grouped, "mode": mode, "us": us, "bitwise_equal_to_first": bool(torch.equal(y, ref))}
                res["moe"].append(row)
                print(f"moe 2 rows (cfg pair) {'grouped' if grouped else 'per-slot':9s} {mode:6s} {us:8.2f} us  "
                      f"same bits {row['bitwise_equal_to_first']}", flush=True)
                save()
    for short in [s for s in a.sweep.split(",") if s]:
        c = next(c for c in cases if c["name"].startswith(SHORT[short]))
        res["sweeps"][short] = {}
        for mode in modes:
            cands = candidate_configs(c["n"], c["k"], True, warps=tuple(warps))
            tried = time_configs(cands, lambda config: run_gemm(c, config, mode, a.reps)[0])
            ok = sorted((r for r in tried if "us" in r), key=lambda r: r["us"])
            res["sweeps"][short][mode] = tried
            print(f"sweep {short} {mode}: best " + "; ".join(f"{r['us']:.2f} us {r['config']}" for r in ok[:3]), flush=True)
            save()
    set_fp8_widen(None)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
