"""benchmarks/kernels.py: effective HBM bandwidth of the decode kernels at the released shapes.

    python benchmarks/kernels.py                 # GPU: time, sweep launch configs, write the table
    python benchmarks/kernels.py --no-sweep      # only the default (table or heuristic) configs

For each decode GEMM of the full-size model (flow head blocks, adaLN, LLM attention / shared experts,
the fused MoE) it times cuBLAS bf16 (F.linear), our kernel with bf16 weights and with FP8 weights.
Effective bandwidth = weight bytes (plus FP8 scales) / time. Each timing replays a CUDA graph of 20
launches (no CPU launch gaps, as in the token graph) that cycle through enough weight copies to
exceed the L2 cache, so every launch streams from HBM. Median of --reps graph replays.
--sweep times every candidate config of the heaviest shapes and writes the best to
<out>/<gpu>.json, the file kernels/ reads from kernels/configs/ (copy it there to use it).

Since session 13 the FP8 fast path runs the LLM's shared experts as two more slots of the fused MoE
(runtime.fast.decode_weights, MINGRT_MOE_SHARED): the MoE rows here time the 6 routed slots and the
"llm shared ... (fp8 path)" rows the shared experts' own launches, which is the MINGRT_MOE_SHARED=0 path
(and what the MoE entry `h..._fp8` is for). The 8-slot entry (`h..._fp8_k8`) is measured by
benchmarks/moe_shared_ab.py.

The last row is the LLM routers' stacked GEMM, which the fast path runs on the kernel with their bf16
weights in either format (runtime.fast.decode_weights.router_logits, session 14): timed and swept in bf16
only; its table entry is the `_bf16` key of its shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import capture, environment, hbm_tbps, timed
from kernels.fp8 import quantize_rows_fp8
from kernels.moe import candidate_configs as moe_candidates
from kernels.moe import down_candidates as moe_down_candidates
from kernels.moe import moe_decode
from kernels.moe import pick_config as moe_pick
from kernels.skinny import (
    GATED_RESIDUAL,
    MAX_ROWS,
    MAX_SPLIT_K,
    PARTIALS,
    STORE,
    SWIGLU,
    Workspace,
    candidate_configs,
    config_key,
    gpu_slug,
    launch_table_path,
    pick_config,
    skinny_gemm,
    skinny_partials,
)
from models import full_config
from models.config import swiglu_hidden

L2_BYTES = 50 * 2**20
LAUNCHES = 20


def graph_time_us(launch, copies: int, reps: int) -> float:
    """Median time of one launch: a graph of LAUNCHES launches over rotating weight copies."""
    replay = capture(lambda: [launch(i % copies) for i in range(LAUNCHES)])  # warm-up covers every copy
    return timed(replay, torch.device("cuda"), warmup=1, runs=reps)["median_ms"] * 1e3 / LAUNCHES


def time_configs(configs: list[dict], run) -> list[dict]:
    """{"config", "us": run(config)} for each launch config; one that does not fit (out of shared memory, a
    failed compile) gets {"config", "error"} instead and is reported."""
    out = []
    for c in configs:
        try:
            out.append({"config": c, "us": run(c)})
        except Exception as exc:  # noqa: BLE001 - not a candidate on this GPU
            print(f"  skip {c}: {type(exc).__name__}", flush=True)
            out.append({"config": c, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"})
    return out


def fastest(tried: list[dict], best: tuple[float, dict]) -> tuple[float, dict]:
    """(us, config) of the fastest of `tried` and `best` (best wins ties)."""
    return min([best] + [(r["us"], r["config"]) for r in tried if "us" in r], key=lambda p: p[0])


def shapes(cfg, prompts: int = 1):
    """The decode GEMMs of one image token for `prompts` prompts (2 CFG rows each), with the weight formats in
    which the fast path runs each on the skinny kernel (the LLM's and semantic decoder's linears only with FP8
    weights, cuBLAS for bf16; the routers keep bf16 weights with either format). The adaLN's steps x rows are
    capped at MAX_ROWS here: up to that the flow head runs them on the kernel, above it on cuBLAS
    (runtime/fast/kernel_flow_head.py), so the capped row shows one 64-row pass."""
    f, llm = cfg.flow_head, cfg.llm
    w, hid = f.width, f.mlp_hidden
    s = f.num_steps
    qkv = (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
    shared = llm.moe_intermediate_size * llm.num_shared_experts
    mt = cfg.mingtok
    sem_hidden = swiglu_hidden(mt.semantic_dim, mt.mlp_ratio)
    # name, rows, N (outputs), K, epilogue, kernel formats; swiglu: N is the hidden width, W has 2N rows
    r = 2 * prompts
    both, fp8, bf16 = ("bf16", "fp8"), ("fp8",), ("bf16",)
    return [
        ("flow w12 + SwiGLU", r, hid, w, SWIGLU, both),
        ("flow w3 gated residual", r, w, hid, GATED_RESIDUAL, both),
        (f"flow adaLN ({s} steps x {r} rows)", min(r * s, MAX_ROWS), 3 * w, w, STORE, both),
        ("flow w3 partials (the next LayerNorm merges)", r, w, hid, PARTIALS, both),
        ("llm query_key_value", r, qkv, llm.hidden_size, STORE, fp8),
        ("llm dense", r, llm.hidden_size, llm.num_heads * llm.head_dim, STORE, fp8),
        ("llm shared gate/up", r, shared, llm.hidden_size, STORE, fp8),
        ("llm shared gate+up + SwiGLU (fp8 path)", r, shared, llm.hidden_size, SWIGLU, fp8),
        ("llm shared down", r, llm.hidden_size, shared, STORE, fp8),
        ("semantic w12 + SwiGLU (fp8 path)", prompts, sem_hidden, mt.semantic_dim, SWIGLU, fp8),
        ("semantic w3", prompts, mt.semantic_dim, sem_hidden, STORE, fp8),
        ("llm routers, stacked (bf16 weights with either format)", r, 2 * llm.num_experts, llm.hidden_size, STORE, bf16),
    ]


def skinny_case(m: int, n: int, k: int, epi: int, fmt: str, dev="cuda") -> dict:
    """Operands of one decode GEMM for timing: random weights (bf16, or FP8 with per-channel scales) in enough
    copies to leave L2 (`ws`, `copies`), rows as the runtime hands them (fp16 next to FP8 weights, since
    kernels.fp8.fp16_rows, else bf16), the gated residual's gate (a column slice of the modulations, as in the
    flow head), the skinny_gemm keywords (`kw`) and the bytes one launch streams."""
    w_rows = 2 * n if epi == SWIGLU else n
    wb = torch.randn(w_rows, k, device=dev, dtype=torch.bfloat16) * 0.02
    if fmt == "fp8":
        wq, sc = quantize_rows_fp8(wb)
        nbytes = wq.numel() + sc.numel() * 4
    else:
        wq, sc, nbytes = wb, None, wb.numel() * 2
    copies = max(1, min(16, -(-3 * L2_BYTES // nbytes)))
    kw = dict(w_scale=sc, epilogue=epi, workspace=Workspace(n, m, dev))
    if epi == GATED_RESIDUAL:
        kw.update(gate=(torch.randn(m, 3 * n, device=dev) * 0.1)[:, 2 * n:])
    return dict(ws=[wq] + [wq.clone() for _ in range(copies - 1)], copies=copies, w_rows=w_rows, nbytes=nbytes, kw=kw,
                x=torch.randn(m, k, device=dev, dtype=torch.float16 if fmt == "fp8" else torch.bfloat16))


def bench_skinny(name, m, n, k, epi, fmt, reps, sweep, table, wide=False, warps=(4,)):
    """One GEMM at its default config (and the sweep's best)."""
    c = skinny_case(m, n, k, epi, fmt)
    ws, copies, nbytes, x, kw = c["ws"], c["copies"], c["nbytes"], c["x"], c["kw"]
    out = torch.zeros(m, n, device=x.device)

    def run(config):
        if epi == PARTIALS:  # raw split-K sums only (the runtime's w3: kernels.skinny.skinny_partials)
            return graph_time_us(lambda i: skinny_partials(x, ws[i], parts, config=config), copies, reps)
        return graph_time_us(lambda i: skinny_gemm(x, ws[i], out, config=config, **kw), copies, reps)

    parts = torch.zeros(MAX_SPLIT_K, m, n, device=x.device) if epi == PARTIALS else None

    default = pick_config(m, n, k, fmt == "fp8", epi)
    row = {"name": name, "rows": m, "N": c["w_rows"], "K": k, "fmt": fmt, "rows_dtype": str(x.dtype).split(".")[-1],
           "weight_mb": nbytes / 1e6, "default_config": default, "us": run(default)}
    if sweep:
        best = fastest(time_configs(candidate_configs(n, k, fmt == "fp8", wide, warps), run), (row["us"], default))
        row["best_us"], row["best_config"] = best
        table["skinny"][config_key(m, n, k, fmt == "fp8", epi)] = best[1]
    t_us = min(row["us"], row.get("best_us", row["us"]))
    row["tbps"] = nbytes / (t_us * 1e-6) / 1e12
    if fmt == "bf16":  # cuBLAS at the same shape, for reference
        xb = x.to(torch.bfloat16)
        row["cublas_us"] = graph_time_us(lambda i: F.linear(xb, ws[i]), copies, reps)
        row["cublas_tbps"] = nbytes / (row["cublas_us"] * 1e-6) / 1e12
    print(f"{name:34s} {fmt:5s} {row['weight_mb']:8.1f} MB  {t_us:8.1f} us  {row['tbps']:5.2f} TB/s"
          + (f"   cuBLAS {row['cublas_us']:8.1f} us {row['cublas_tbps']:5.2f} TB/s" if "cublas_us" in row else ""), flush=True)
    return row


def moe_weights(llm, fmt: str, dev="cuda") -> tuple[list, tuple | None]:
    """Random stacked expert weights of the LLM's shapes: [gate (E, I, H), up, down (E, H, I)] in bf16, or
    FP8 with their per-channel scales (moe_decode's arguments)."""
    e, i, h = llm.num_experts, llm.moe_intermediate_size, llm.hidden_size
    ws = [torch.randn(e, i, h, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)] + \
         [torch.randn(e, h, i, device=dev, dtype=torch.bfloat16) * 0.02]
    if fmt != "fp8":
        return ws, None
    q = [quantize_rows_fp8(t) for t in ws]
    return [a for a, _ in q], tuple(s for _, s in q)


def bench_moe(cfg, fmt, reps, sweep, table, rows=2, warps=(2, 4)):
    llm = cfg.llm
    e, i, h, k = llm.num_experts, llm.moe_intermediate_size, llm.hidden_size, llm.num_experts_per_tok
    dev = "cuda"
    ws, scales = moe_weights(llm, fmt, dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)]).to(dev)  # distinct per row
    topw = torch.rand(rows, k, device=dev)
    # the rows as the runtime hands them: fp16 next to FP8 weights (kernels.fp8.fp16_rows), else bf16
    x = torch.randn(rows, h, device=dev, dtype=torch.float16 if fmt == "fp8" else torch.bfloat16)
    used = len(set(ids.flatten().tolist()))
    nbytes = used * 3 * i * h * (1 if fmt == "fp8" else 2)
    # the routed experts of one layer are 18 MB (bf16): rotate 12 layers' worth of expert ids to leave L2
    id_sets = [torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)]).to(dev) for _ in range(12)]
    act = torch.empty(rows * k, i, device=dev, dtype=torch.float16 if fmt == "fp8" else torch.bfloat16)  # as moe_decode
    out = torch.empty(rows, h, device=dev)

    def run(config, grouped=False):
        # the per-slot kernels, whose table this tunes (benchmarks/moe_grouped.py times the grouped ones)
        return graph_time_us(lambda j: moe_decode(x, id_sets[j], topw, *ws, scales, act=act, out=out,
                                                  config=config, grouped=grouped), len(id_sets), reps)

    default = moe_pick(h, i, fmt == "fp8")
    row = {"name": f"moe decode, per-slot kernels ({rows} rows, top-{k} of {e})", "fmt": fmt, "experts_read": used,
           "weight_mb": nbytes / 1e6, "default_config": default, "us": run(default)}
    if sweep:
        best = fastest(time_configs(moe_candidates(warps), run), (row["us"], default))  # the shared tile first,
        best = fastest(time_configs(moe_down_candidates(best[1], k), run), best)   # then the down kernel's own
        row["best_us"], row["best_config"] = best
        table["moe"][f"h{h}_i{i}_{fmt}"] = best[1]
    t_us = min(row["us"], row.get("best_us", row["us"]))
    row["tbps"] = nbytes / (t_us * 1e-6) / 1e12
    row["grouped_us"] = run(None, grouped=True)  # at its default tile (each row draws its experts independently)
    if fmt == "bf16":  # the gather dispatch the graph used before (copies the routed weights)
        wg, wu, wd = ws

        def gather(j):
            idx = id_sets[j]
            xk = x[:, None, :, None]
            hh = F.silu((wg[idx] @ xk).squeeze(-1)) * (wu[idx] @ xk).squeeze(-1)
            return (wd[idx] @ hh[..., None]).squeeze(-1)

        row["gather_us"] = graph_time_us(gather, len(id_sets), reps)
    print(f"{row['name']:34s} {fmt:5s} {row['weight_mb']:8.1f} MB  {t_us:8.1f} us  {row['tbps']:5.2f} TB/s"
          + f"   grouped {row['grouped_us']:8.1f} us"
          + (f"   gather {row['gather_us']:8.1f} us" if "gather_us" in row else ""), flush=True)
    return row


def markdown(res) -> str:
    lines = [f"# Decode kernels on {res['env'].get('gpu')} (effective HBM bandwidth; peak {res['peak_tbps']} TB/s)", "",
             "| GEMM | rows | weight | format | ours (us) | ours TB/s | cuBLAS bf16 (us) | cuBLAS TB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        t = min(r["us"], r.get("best_us", r["us"]))
        ref = f"{r['cublas_us']:.1f} | {r['cublas_tbps']:.2f}" if "cublas_us" in r else (
            f"gather {r['gather_us']:.1f} | -" if "gather_us" in r else "- | -")
        lines.append(f"| {r['name']} | {r.get('rows', 2)} | {r['weight_mb']:.1f} MB | {r['fmt']} | {t:.1f} | {r['tbps']:.2f} | {ref} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only the default configs")
    p.add_argument("--sweep-shapes", type=int, default=99, help="sweep configs for the first N GEMM shapes (heaviest first)")
    p.add_argument("--formats", default="bf16,fp8", help="weight formats to time (comma-separated)")
    p.add_argument("--prompts", type=int, default=1, help="the GEMMs of a batch of this many prompts (2 CFG rows each; "
                                                              "the table is keyed by rows, so batch-1 entries stay)")
    p.add_argument("--skip-moe", action="store_true", help="no fused-MoE rows (its table entries are kept)")
    p.add_argument("--only-moe", action="store_true", help="only the fused-MoE rows (the GEMMs' table entries are kept)")
    p.add_argument("--only", default="", help="only the GEMM rows whose name contains this (or one of these, comma-separated), "
                   "e.g. 'router' (with --skip-moe)")
    p.add_argument("--wide", action="store_true", help="FP8: also sweep 128-wide K tiles and 6 pipeline stages")
    p.add_argument("--warps", default="4", help="warp counts to sweep each GEMM config with (comma-separated, e.g. 4,8; the fused-MoE sweep adds 2)")
    p.add_argument("--peak-tbps", type=float, default=None, help="HBM peak (default: by GPU name, speed.HBM_TBPS)")
    p.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch (the "
                   "20-launch graphs then pay every launch's ramp-up and tail, as before session 4)")
    a = p.parse_args(argv)
    if not 1 <= a.prompts <= MAX_ROWS // 2:
        p.error(f"--prompts must be 1 to {MAX_ROWS // 2} (2 CFG rows each, <= {MAX_ROWS} rows)")
    if a.prompts != 1 and a.only_moe:
        p.error("--prompts times the GEMMs at a batch's rows; the fused-MoE rows are batch 1's "
                "(benchmarks/moe_grouped.py times batches)")
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if a.no_pdl:
        from kernels import set_pdl

        set_pdl(False)
    cfg = full_config()
    # a sweep updates this GPU's table: entries it does not measure stay as they are
    known = launch_table_path()
    table = json.loads(known.read_text()) if known.exists() else {"skinny": {}, "moe": {}}
    formats = a.formats.split(",")
    res = {"env": environment(torch.device("cuda")), "peak_tbps": hbm_tbps(torch.device("cuda"), a.peak_tbps),
           "rows": []}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.prompts != 1 and not a.skip_moe:
        print("--prompts: the fused-MoE rows are batch 1's (their table has no row key; benchmarks/moe_grouped.py "
              "times batches): skipped", flush=True)
        a.skip_moe = True
    for fmt in () if a.skip_moe else formats:  # first: few candidates, and the LLM step's largest kernel
        res["rows"].append(bench_moe(cfg, fmt, a.reps, a.sweep, table,
                                     warps=tuple(sorted({2, *(int(w) for w in a.warps.split(","))}))))
        if a.sweep:
            (a.out / f"{gpu_slug()}.json").write_text(json.dumps(table, indent=1))
    for idx, (name, m, n, k, epi, kernel_formats) in enumerate(() if a.only_moe else shapes(cfg, a.prompts)):
        if not any(part in name for part in a.only.split(",")):
            continue
        for fmt in formats:
            if fmt not in kernel_formats and fmt != "bf16":  # bf16 stays as the cuBLAS comparison
                continue
            sweep = a.sweep and idx < a.sweep_shapes and fmt in kernel_formats
            res["rows"].append(bench_skinny(name, m, n, k, epi, fmt, a.reps, sweep, table, a.wide,
                                            tuple(int(w) for w in a.warps.split(","))))
            (a.out / "kernels.json").write_text(json.dumps(res, indent=1))
            if a.sweep:  # after every shape: a run cut short keeps what it found
                (a.out / f"{gpu_slug()}.json").write_text(json.dumps(table, indent=1))
    (a.out / "kernels.json").write_text(json.dumps(res, indent=1))
    (a.out / "kernels.md").write_text(markdown(res))
    if a.sweep:
        (a.out / f"{gpu_slug()}.json").write_text(json.dumps(table, indent=1))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
