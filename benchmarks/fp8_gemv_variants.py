"""benchmarks/fp8_gemv_variants.py: where a skinny FP8 GEMM's time goes, by elimination.

    python benchmarks/fp8_gemv_variants.py --out OUT      # a GPU; writes OUT/fp8_gemv_variants.json
    python benchmarks/fp8_gemv_variants.py --out OUT --variants stream,dot,dot-swept,dot-tma,dot-pretiled --rows 16 --tag _m16

The production kernel (kernels/skinny.py, tensor-core dot on weights widened to fp16) streams FP8 at
2.2-3.0 TB/s where bf16 reaches 3.0-4.0 (benchmarks/results/kernels_h200.md), although its K loop is
software-pipelined (benchmarks/kernel_ir_check.py). This times, at the released shapes (2 rows):

* stream    - a flat read of the same bytes (sum of 16-byte words): what HBM gives at this size;
* tiles     - the production tiling and loads, but the tile is summed as integers, no convert, no MMA;
* dot       - the production kernel (its measured config, split K included);
* fma       - no tensor cores: widen to fp32 and multiply-add per element into a (rows, BN, BK)
              accumulator, reduced once after the loop (a CUDA-core GEMV);
* dot-prmt  - the production dot, widened by byte permutes and masks (inline PTX, 4 weights per
              call) instead of cvt.rn.f16x2.e4m3x2: E4M3's bits moved into fp16's place are the value
              / 2**8, folded into the channel scale.
* dot-tma   - the production dot with the weight tiles brought by the Hopper tensor memory accelerator
              (a host-made TensorDescriptor; cp.async.bulk.tensor into shared memory) instead of
              per-thread pointer loads; the rows stay pointer loads (a few KB, L2-resident).
* dot-pretiled - the production dot on a copy of the weights laid out tile by tile, (N/BN, K/BK, BN, BK), so each
              program's K step reads one contiguous BN*BK-byte block instead of BN rows K bytes apart.
* dot-swept - the control for those two: the same kernel with plain pointer loads of the row-major weights, swept
              over the same configs (split K by atomics too), so a gain of dot-tma or dot-pretiled over it is the
              load path's or the layout's, not the sweep's. The three are one kernel, `_dot_loads_kernel`, whose
              LOAD picks the weights' path. (Session 20 ran dot-tma and dot-pretiled without the control, as two
              kernels with this one's arithmetic: the JSON of runs 3 and 9.)

Besides the released GEMMs (`shapes`), "moe gate_up, 36 experts flat" is the batch-8 MoE's gate/up weights
(the ~36 experts 16 rows choose, gate and up, contiguous): what the grouped kernel streams, without its gather;
"moe down, 36 experts flat" their down weights as one (36 * H, I) matrix: the down kernel's bytes and its short
K (1408), without its per-slot partials, tickets and merges.

An experiment: nothing in the runtime uses the variants. Each is checked against torch before timing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.kernels import graph_time_us  # noqa: E402
from benchmarks.speed import environment  # noqa: E402
from kernels.fp8 import quantize_rows_fp8  # noqa: E402
from kernels.skinny import STORE, Workspace, pick_config, skinny_gemm  # noqa: E402
from models import full_config  # noqa: E402


@triton.jit
def _stream_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        off = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + off, mask=off < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _tiles_kernel(w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        acc += tl.load(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0).to(tl.int32)
    tl.store(out_ptr + rn, tl.sum(acc, 1), mask=rn < N)


@triton.jit
def _k_share(K, SPLIT_K: tl.constexpr):
    """[lo, hi) of K for this program's split (program_id 1)."""
    span = K // SPLIT_K
    lo = tl.program_id(1) * span
    return lo, lo + span


@triton.jit
def _fma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    lo, hi = _k_share(K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, 2) * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]  # (BM, BN)
    _store_split(y_ptr + rm[:, None] * N + rn[None, :], y, (rm < M)[:, None] & (rn < N)[None, :], SPLIT_K)


@triton.jit
def _store_split(ptr, y, ok, SPLIT_K: tl.constexpr):
    if SPLIT_K == 1:
        tl.store(ptr, y, mask=ok)
    else:  # timing only: the order of the atomic adds is not fixed
        tl.atomic_add(ptr, y, mask=ok, sem="relaxed")


@triton.jit
def _e4m3_to_f16_times_2m8(w):
    """uint8 E4M3 bits -> fp16 of value / 256, four per call: each byte moved to the top of a 16-bit half
    (prmt), its sign kept there, exponent and mantissa shifted one bit down under fp16's (bias 15 vs 7:
    a factor 2**-8 that is exact, subnormals included)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 a, b, sa, sb, ta, tb;
        prmt.b32 a, $2, 0, 0x1404;
        prmt.b32 b, $2, 0, 0x3424;
        shr.b32 sa, a, 1;
        shr.b32 sb, b, 1;
        and.b32 ta, a, 0x80008000;
        and.b32 tb, b, 0x80008000;
        lop3.b32 $0, sa, 0x3F803F80, ta, 0xEA;
        lop3.b32 $1, sb, 0x3F803F80, tb, 0xEA;
        }""",
        "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _dot_prmt_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    lo, hi = _k_share(K, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0)
        x = tl.load(x_ptr + rm[None, :] * K + (k0 + rk)[:, None], mask=(rm < M)[None, :], other=0.0)
        acc += tl.dot(_e4m3_to_f16_times_2m8(w), x)
    y = acc * (tl.load(s_ptr + rn, mask=rn < N, other=0.0) * 256.0)[:, None]  # (BN, BM)
    _store_split(y_ptr + rm[None, :] * N + rn[:, None], y, (rn < N)[:, None] & (rm < M)[None, :], SPLIT_K)


# _dot_loads_kernel's LOAD: how the weight tiles arrive (the rest of the kernel is the same for all three)
POINTER, TMA, PRETILED = 0, 1, 2
LOADS = {"dot-swept": POINTER, "dot-tma": TMA, "dot-pretiled": PRETILED}


@triton.jit
def _dot_loads_kernel(x_ptr, w, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, LOAD: tl.constexpr):
    """The production dot's arithmetic (E4M3 widened to fp16, fp32 sums, channel scale after) with the weight
    tiles from `w`: POINTER - row-major (N, K) weights, masked pointer loads; TMA - a TensorDescriptor of them
    (rows past N come back as zeros); PRETILED - the (N/BN, K/BK, BN, BK) copy of `pretile`, one contiguous block
    per K step. A split of K adds its share with atomics (timing only)."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    lo, hi = _k_share(K, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        if LOAD == 1:
            wt = w.load([pid_n * BLOCK_N, k0])
        elif LOAD == 2:
            tile = (pid_n * (K // BLOCK_K) + k0 // BLOCK_K).to(tl.int64) * (BLOCK_N * BLOCK_K)
            wt = tl.load(w + tile + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + rk[None, :])
        else:
            wt = tl.load(w + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :], mask=(rn < N)[:, None], other=0.0)
        x = tl.load(x_ptr + rm[None, :] * K + (k0 + rk)[:, None], mask=(rm < M)[None, :], other=0.0)  # (BK, BM)
        acc += tl.dot(wt.to(tl.float16), x)
    y = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[:, None]  # (BN, BM)
    _store_split(y_ptr + rm[None, :] * N + rn[:, None], y, (rn < N)[:, None] & (rm < M)[None, :], SPLIT_K)


def pretile(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """(N, K) -> (N/bn, K/bk, bn, bk) contiguous: tile (i, j) is rows i*bn.., columns j*bk.., in one block."""
    n, k = w.shape
    return w.view(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3).contiguous()


def tma_configs() -> list[dict]:
    """TMA boxes are at most 256 elements a side, so BLOCK_K stops at 256."""
    out = []
    for bn in (32, 64, 128):
        for bk in (128, 256):
            for split in (1, 2, 4):
                for warps in ((4,) if bn <= 64 else (4, 8)):
                    for stages in (3, 5):
                        out.append(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages))
    return out


def shapes(only: str | None = None):
    cfg = full_config()
    f, llm = cfg.flow_head, cfg.llm
    qkv = (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
    out = [("flow w12 (both halves)", 2 * f.mlp_hidden, f.width), ("flow w3", f.width, f.mlp_hidden),
           ("flow adaLN", 3 * f.width, f.width), ("llm query_key_value", qkv, llm.hidden_size),
           ("llm dense", llm.hidden_size, llm.num_heads * llm.head_dim),
           ("moe gate_up, 36 experts flat", 36 * 2 * llm.moe_intermediate_size, llm.hidden_size),
           ("moe down, 36 experts flat", 36 * llm.hidden_size, llm.moe_intermediate_size)]
    if only:
        keep = only.split(",")
        out = [s for s in out if any(s[0].startswith(k) for k in keep)]
    return out


def configs() -> list[dict]:
    out = []
    for bn in (8, 16, 32, 64):
        for bk in (128, 256, 512):
            for split in (1, 2, 4):
                for warps in (4, 8):
                    out.append(dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--variants", default="stream,tiles,dot,fma,dot-prmt")
    p.add_argument("--shapes", default=None, help="comma-separated name prefixes (default: all)")
    p.add_argument("--tag", default="", help="suffix of the JSON's name")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemv_variants.py needs a CUDA GPU")
    dev = torch.device("cuda")
    variants = a.variants.split(",")
    res = {"env": environment(dev), "rows": a.rows, "shapes": []}
    m = a.rows
    for name, n, k in shapes(a.shapes):
        wq, sc = quantize_rows_fp8(torch.randn(n, k, device=dev) * 0.02)
        sc = sc.to(dev)
        nbytes = wq.numel()
        copies = max(1, min(16, -(-150 * 2**20 // nbytes)))  # rotate past the 50 MB L2
        ws = [wq] + [wq.clone() for _ in range(copies - 1)]
        x = torch.randn(m, k, device=dev).to(torch.float16)
        ref = (x.float() @ (wq.float() * sc[:, None]).t())
        row = {"name": name, "N": n, "K": k, "weight_mb": nbytes / 1e6, "variants": {}}

        def tb(us):
            return round(nbytes / (us * 1e-6) / 1e12, 3)

        def keep(label, us, config, err=None):
            best = row["variants"].get(label)
            if best is None or us < best["us"]:
                row["variants"][label] = {"us": round(us, 2), "tbps": tb(us), "config": config, "max_rel_err": err}

        if "stream" in variants:
            words = [w.view(torch.int32).view(-1) for w in ws]
            sink = torch.empty(1 << 16, dtype=torch.int32, device=dev)
            for block, iters in ((1024, 4), (2048, 4), (1024, 16), (4096, 2)):
                grid = (triton.cdiv(words[0].numel(), block * iters),)
                us = graph_time_us(lambda i: _stream_kernel[grid](words[i], sink, words[i].numel(), BLOCK=block,
                                                                  ITERS=iters), copies, a.reps)
                keep("stream", us, {"BLOCK": block, "ITERS": iters})
        if "tiles" in variants:
            u8 = [w.view(torch.uint8) for w in ws]
            sink = torch.empty(n, dtype=torch.int32, device=dev)
            for bn, bk in ((16, 256), (32, 256), (32, 512), (64, 256)):
                us = graph_time_us(lambda i: _tiles_kernel[(triton.cdiv(n, bn),)](u8[i], sink, n, k, BLOCK_N=bn,
                                                                                   BLOCK_K=bk), copies, a.reps)
                keep("tiles", us, {"BLOCK_N": bn, "BLOCK_K": bk})
        if "dot" in variants:
            out = torch.zeros(m, n, device=dev)
            work = Workspace(n, m, dev)
            config = pick_config(m, n, k, True, STORE)
            skinny_gemm(x, wq, out, w_scale=sc, workspace=work, config=config)
            err = float((out - ref).abs().max() / ref.abs().max())
            us = graph_time_us(lambda i: skinny_gemm(x, ws[i], out, w_scale=sc, workspace=work, config=config),
                               copies, a.reps)
            keep("dot", us, config, err)
        def sweep(label, kern, cfgs, weights, block_m=16, **const):
            """Each config the shape takes (weights(c): the kernel's weight argument for each rotating copy, None
            to skip c): checked against torch, then timed; the fastest kept."""
            y = torch.zeros(m, n, device=dev)
            for c in cfgs:
                if k % (c["BLOCK_K"] * c["SPLIT_K"]):
                    continue
                kw = dict(BLOCK_M=block_m, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], SPLIT_K=c["SPLIT_K"],
                          num_warps=c["num_warps"], num_stages=c.get("num_stages", 3), **const)
                grid = (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
                try:
                    src = weights(c)  # (a descriptor may refuse the tile)
                    if src is None:
                        continue
                    y.zero_()
                    kern[grid](x, src[0], sc, y, m, n, k, **kw)
                    err = float((y - ref).abs().max() / ref.abs().max())
                    if err > 1e-2:
                        print(f"  {label} {c}: wrong (rel err {err:.2e})", flush=True)
                        continue
                    us = graph_time_us(lambda i: kern[grid](x, src[i], sc, y, m, n, k, **kw), copies, a.reps)
                except Exception as exc:  # out of resources and the like
                    print(f"  {label} {c}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                keep(label, us, c, err)

        if "fma" in variants:
            block_m = triton.next_power_of_2(m)
            sweep("fma", _fma_kernel, configs(), lambda c: ws if c["BLOCK_N"] * c["BLOCK_K"] * block_m <= 32768 else None,
                  block_m=block_m)
        if "dot-prmt" in variants:
            u8 = [w.view(torch.uint8) for w in ws]
            sweep("dot-prmt", _dot_prmt_kernel, configs(), lambda c: u8)
        layouts: dict = {}  # dot-pretiled's copies, one layout at a time

        def loaded(load, c):
            bn, bk = c["BLOCK_N"], c["BLOCK_K"]
            if load == TMA:
                from triton.tools.tensor_descriptor import TensorDescriptor

                return [TensorDescriptor.from_tensor(w, [bn, bk]) for w in ws]
            if load == PRETILED:
                if n % bn:
                    return None
                if (bn, bk) not in layouts:
                    layouts.clear()
                    layouts[(bn, bk)] = [pretile(w, bn, bk) for w in ws]
                return layouts[(bn, bk)]
            return ws

        for label, load in LOADS.items():
            if label in variants:
                sweep(label, _dot_loads_kernel, tma_configs(), lambda c, load=load: loaded(load, c), LOAD=load)
        layouts.clear()
        res["shapes"].append(row)
        print(name, json.dumps({v: (r["us"], r["tbps"]) for v, r in row["variants"].items()}), flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"fp8_gemv_variants{a.tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
