"""benchmarks/router_ties.py: how often the MoE router's top-k choice meets tied scores (CPU, seconds).

    python benchmarks/router_ties.py --out benchmarks/results

The full model's router (64 experts, top 6, hidden 2048) with the build's random-weight recipe (0.05 N(0,1)
on the bf16 grid), on RMS-normalised random bf16 rows as its input. Logits come out of a bf16 linear, so
they sit on bf16's 8-bit grid, and so do ties: how many rows have two equal scores within their top k+1
(the order of the expert sum depends on them) and how many at the k-th place (which expert is chosen does).
Tie rates do not depend on the scale of the logits, only on the grid. Writes OUT/router_ties.json.
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


def tie_rates(hidden: int, experts: int, k: int, rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = (0.05 * torch.randn(experts, hidden, generator=g)).bfloat16()
    x = torch.randn(rows, hidden, generator=g)
    x = (x / x.pow(2).mean(-1, keepdim=True).sqrt()).bfloat16()  # what a norm hands the router
    probs = F.linear(x, w).softmax(-1, dtype=torch.float32)
    top = probs.sort(-1, descending=True).values[:, :k + 1]
    return {"rows": rows, "any_tie_within_top_k_plus_1": float((top[:, :-1] == top[:, 1:]).any(-1).float().mean()),
            "tie_at_kth_place": float((top[:, k - 1] == top[:, k]).float().mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rows", type=int, default=8192)
    a = p.parse_args(argv)
    from benchmarks.speed import environment
    from models import full_config

    llm = full_config().llm
    res = {"env": environment(torch.device("cpu")), "hidden": llm.hidden_size, "experts": llm.num_experts, "top_k": llm.num_experts_per_tok,
           "per_seed": [tie_rates(llm.hidden_size, llm.num_experts, llm.num_experts_per_tok, a.rows, s) for s in range(3)]}
    print(json.dumps(res, indent=1))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "router_ties.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
