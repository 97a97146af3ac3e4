"""Where the fast LLM step's difference from the eager reference comes from (full size, random weights).

    python benchmarks/moe_routing_check.py --out DIR      # GPU

Runs one decode step of the full-size LLM (2 CFG rows, a random 152-token cache) with the reference
dispatch ("gather") and with the fused MoE kernel (bf16, then FP8 weights), recording each layer's
input and routed experts. Prints, per layer, the relative L2 difference of the layer input and how
many rows route to a different expert set. A top-k choice between near-tied router scores flips
under rounding-level differences (the kernels' sums, and since session 7 the fused step's one GEMM for
both routers, which need not round as the two separate GEMMs do); each flip swaps one expert's output,
which is what carries the difference forward, not the kernels' arithmetic (tests/test_kernels.py
checks that).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.verify import metrics
from models import build, full_config
from runtime.fast.decode_weights import prepare_decode


def run(model, inputs, mode):
    rec = {}
    with torch.no_grad():
        out = model.model.model(*inputs[:3], inputs[4], inputs[5], image_mask=inputs[3], moe_mode=mode, record=rec)[0]
    return out.float(), rec


def compare(ref, got) -> dict:
    (h0, r0), (h1, r1) = ref, got
    rows = []
    for i, (a, b, ia, ib) in enumerate(zip(r0["layer_inputs"], r1["layer_inputs"], r0["topk_idx"], r1["topk_idx"])):
        flips = sum(set(x.tolist()) != set(y.tolist()) for x, y in zip(ia.reshape(-1, ia.shape[-1]), ib.reshape(-1, ib.shape[-1])))
        rows.append({"layer": i, "input_rel_l2": metrics(b, a)["rel_l2"],
                     "rows_with_other_experts": int(flips)})
    return {"final_rel_l2": metrics(h1, h0)["rel_l2"], "layers": rows,
            "first_layer_with_a_flip": next((r["layer"] for r in rows if r["rows_with_other_experts"]), None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()
    cfg = full_config()
    model = build(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, past, h = 2, 152, cfg.llm.hidden_size
    kv = [torch.randn(rows, cfg.llm.num_kv_heads, past, cfg.llm.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
          for _ in range(2 * cfg.llm.num_layers)]
    inputs = (torch.randn(rows, 1, h, device="cuda", dtype=torch.bfloat16, generator=g),
              torch.ones(rows, past + 1, dtype=torch.long, device="cuda"), torch.full((rows, 1), past, device="cuda"),
              torch.zeros(rows, 1, dtype=torch.bool, device="cuda"), kv[0::2], kv[1::2])
    ref = run(model, inputs, "gather")
    result = {"reference_again": compare(ref, run(model, inputs, "gather"))["final_rel_l2"]}
    for fmt in ("bf16", "fp8"):
        prepare_decode(model, fmt)
        result[f"fused_{fmt}"] = compare(ref, run(model, inputs, "fused"))
        r = result[f"fused_{fmt}"]
        print(f"{fmt}: final rel L2 {r['final_rel_l2']:.3e}; first layer with a routing flip: {r['first_layer_with_a_flip']}; "
              f"layer-input rel L2 before it: {[round(x['input_rel_l2'], 5) for x in r['layers'][:(r['first_layer_with_a_flip'] or 28) + 1]]}")
        print("  rows with another expert set per layer:", [x["rows_with_other_experts"] for x in r["layers"]])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "moe_routing_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
