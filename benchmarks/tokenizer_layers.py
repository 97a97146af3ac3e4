"""benchmarks/tokenizer_layers.py: where one MingTok layer's time goes, op by op, and what other forms cost.

    python benchmarks/tokenizer_layers.py --out OUT [--pieces pixel,encoder] [--autotune]    # a GPU

One full-size block (random weights, bf16, batch 1, 512 px) of the pixel decoder (1024 tokens, dim 1024,
GELU MLP) and of the low-level encoder (257 tokens, dim 768, SwiGLU), each op captured `--reps` times in
one CUDA graph and timed per call (median of `--runs` replays). Besides the ops the block runs today
(LayerNorm, qkv, attention, proj, residual add, fc1/w12, activation, fc2/w3) it times other forms of them:
the residual accumulated by the GEMM in place (`addmm_`, beta = 1; the bias then has to go elsewhere),
cuBLASLt's GELU epilogue (tanh approximation: not the exact GELU the model uses, timed only to bound what
an epilogue saves), FP8 GEMMs (`torch._scaled_mm`, row-wise scales; a bound, not a numerics claim), and
the whole block eager, torch.compile'd, and (--autotune) compiled with max-autotune's GEMM search. Issue
5's targets (H100): pixel decode 1.5 ms = 62 us a layer over 24 layers; encode 0.7 ms.
Writes OUT/tokenizer_layers.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import environment, settle, timed  # noqa: E402
from models import full_config  # noqa: E402
from models.sdpa import attention  # noqa: E402
from models.vit_layers import Block  # noqa: E402
from runtime.fast.graphed import capture_graph  # noqa: E402

PIECES = ("pixel", "encoder")


def per_call_us(fn, dev, reps: int, runs: int) -> float:
    """fn() captured `reps` times in one graph; microseconds per call."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(reps)][-1], dev)
    settle(graph.replay, dev, 0.3)
    ms = timed(graph.replay, dev, warmup=3, runs=runs)["median_ms"]
    del graph
    return ms * 1e3 / reps


def fp8_linear(x: torch.Tensor, w: torch.Tensor):
    """A row-wise scaled FP8 GEMM of x (M, K) by w (N, K): the tensor-core time FP8 weights and activations
    would take (operands quantised once, outside the timed call)."""
    f8 = torch.float8_e4m3fn
    xs = x.float().abs().amax(1, keepdim=True).clamp(min=1e-6) / 448
    ws = w.float().abs().amax(1, keepdim=True).clamp(min=1e-6) / 448
    xq, wq = (x / xs).to(f8), (w / ws).to(f8)
    return lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)


def layer_ops(piece: str, dev) -> tuple[Block, torch.Tensor, dict]:
    """(one full-size block, its input (1, N, D), {op name: a call}) for `piece`."""
    mt = full_config().mingtok
    if piece == "pixel":
        d, n, ffn = mt.pixel_dim, mt.num_tokens * mt.pixel_ratio ** 2, "mlp"
    else:
        d, n, ffn = mt.encoder_dim, mt.num_tokens + 1, "swiglu"
    torch.manual_seed(0)
    blk = Block(d, mt.head_dim, mt.mlp_ratio, ffn, mt.norm_eps).to(dev, torch.bfloat16).eval()
    x = torch.randn(1, n, d, device=dev, dtype=torch.bfloat16)
    xn = blk.norm1(x)
    # the *_accumulate_inplace forms add into `res` on every replay: tiny operands keep it finite
    res = x.clone().view(n, d)
    ops = {"norm": lambda: blk.norm1(x), **attention_ops(blk, x, xn, res)}
    ops.update(gelu_mlp_ops(blk, xn, res) if ffn == "mlp" else swiglu_mlp_ops(blk, xn, res))
    return blk, x, ops


def attention_ops(blk: Block, x, xn, res) -> dict:
    a = blk.attn
    n, d = xn.shape[1], xn.shape[2]
    qkv = a.qkv(xn).view(1, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # the model's strided views
    q, k, v = qkv[0], qkv[1], qkv[2]
    o = attention(q, k, v, scale=a.head_dim ** -0.5).transpose(1, 2).reshape(1, n, d)  # (1, N, D)
    o_tiny = o.view(n, d) * 1e-4
    return {
        "qkv": lambda: a.qkv(xn),
        "attention": lambda: attention(q, k, v, scale=a.head_dim ** -0.5),
        "proj": lambda: a.proj(o),
        "residual_add": lambda: x + o,
        "proj_accumulate_inplace": lambda: res.addmm_(o_tiny, a.proj.weight.t()),  # beta = 1, no bias
        "qkv_fp8": fp8_linear(xn.view(n, d), a.qkv.weight),
        "proj_fp8": fp8_linear(o.view(n, d), a.proj.weight),
    }


def gelu_mlp_ops(blk: Block, xn, res) -> dict:
    f1, f2 = blk.mlp.fc1, blk.mlp.fc2
    n, d = xn.shape[1], xn.shape[2]
    x2 = xn.view(n, d)
    hid = f1(xn)  # (1, N, 4D)
    act = F.gelu(hid)
    act_tiny = act.view(n, -1) * 1e-4
    return {
        "fc1": lambda: f1(xn),
        "gelu": lambda: F.gelu(hid),
        "fc1_gelu_tanh_epilogue": lambda: torch._addmm_activation(f1.bias, x2, f1.weight.t(), use_gelu=True),
        "fc2": lambda: f2(act),
        "fc2_accumulate_inplace": lambda: res.addmm_(act_tiny, f2.weight.t()),
        "fc1_fp8": fp8_linear(x2, f1.weight),
        "fc2_fp8": fp8_linear(act.view(n, -1), f2.weight),
    }


def swiglu_mlp_ops(blk: Block, xn, res) -> dict:
    w12, w3 = blk.mlp.w12, blk.mlp.w3
    n, d = xn.shape[1], xn.shape[2]
    hid = w12(xn)  # (1, N, 2 * hidden): [gate | value]
    g, val = hid.chunk(2, dim=-1)
    act = F.silu(g) * val
    act_tiny = act.view(n, -1) * 1e-4
    return {
        "w12": lambda: w12(xn),
        "silu_mul": lambda: F.silu(g) * val,
        "w3": lambda: w3(act),
        "w3_accumulate_inplace": lambda: res.addmm_(act_tiny, w3.weight.t()),
        "w12_fp8": fp8_linear(xn.view(n, d), w12.weight),
        "w3_fp8": fp8_linear(act.view(n, -1), w3.weight),
    }


def gemm_tflop(blk: Block, op: str, n: int) -> float | None:
    """TFLOP of a GEMM op over n tokens, from the weight it multiplies (qkv_fp8 -> attn.qkv); None for the others."""
    base = op.split("_")[0]
    lin = getattr(blk.attn, base, None) or getattr(blk.mlp, base, None)
    return 2 * n * lin.weight.numel() / 1e12 if isinstance(lin, nn.Linear) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pieces", default="pixel,encoder")
    p.add_argument("--reps", type=int, default=24, help="calls per captured graph")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--autotune", action="store_true", help="also the block compiled with max-autotune (minutes)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tokenizer_layers.py needs a CUDA GPU")
    for piece in a.pieces.split(","):
        if piece not in PIECES:
            p.error(f"--pieces: unknown {piece!r}; choose from {PIECES}")
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    res = {"env": environment(dev), "reps": a.reps, "pieces": {}}
    path = a.out / "tokenizer_layers.json"
    with torch.no_grad():
        for piece in a.pieces.split(","):
            blk, x, ops = layer_ops(piece, dev)
            n, d = x.shape[1], x.shape[2]
            row = res["pieces"][piece] = {"tokens": n, "dim": d, "ops_us": {}, "tflops": {}}
            for name, fn in ops.items():
                us = per_call_us(fn, dev, a.reps, a.runs)
                row["ops_us"][name] = us
                fl = gemm_tflop(blk, name, n)
                if fl is not None:
                    row["tflops"][name] = fl / (us * 1e-6)
                print(f"{piece:8s} {name:26s} {us:8.2f} us" + (f"  {row['tflops'][name]:6.0f} TFLOP/s" if fl else ""), flush=True)
                path.write_text(json.dumps(res, indent=1))
            modes = {"block_eager": None, "block_compile": {}}
            if a.autotune:
                modes["block_autotune"] = {"mode": "max-autotune-no-cudagraphs"}
            for name, opts in modes.items():
                f = blk if opts is None else torch.compile(blk, dynamic=False, **opts)
                t = time.perf_counter()
                us = per_call_us(lambda f=f: f(x), dev, a.reps, a.runs)
                row["ops_us"][name] = us
                row.setdefault("setup_seconds", {})[name] = time.perf_counter() - t
                print(f"{piece:8s} {name:26s} {us:8.2f} us  (setup {row['setup_seconds'][name]:.1f} s)", flush=True)
                path.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
