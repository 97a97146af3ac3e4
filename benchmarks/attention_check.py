"""benchmarks/attention_check.py: the LLM's decode attention: torch's default backend, the repeatable set, our kernel.

    python benchmarks/attention_check.py --out OUT     # a GPU; writes OUT/attention_check.json

At the released shapes (2 CFG rows, 16 query heads on 4 KV heads of 128, a static cache of S slots with
a key mask, one query): for torch's default dispatch, models.sdpa.attention (cuDNN excluded) and
kernels.attention.decode_attention (what the GPU fast path installs: split over the slots, and given
the query's slot so that it skips the later ones; also timed with one split and without the slot),
how many of --replays graph replays on fixed inputs differ from the first, the time of one call (a
graph of one call per LLM layer, median), and the largest difference to torch's default. The 28 calls
of one image token cost 28x the per-call time.
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

from benchmarks.speed import capture, environment, repeats, timed  # noqa: E402
from kernels.attention import decode_attention  # noqa: E402
from models import full_config  # noqa: E402
from models.sdpa import attention  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--slots", type=int, default=320, help="static cache length S (prompt + 256 image tokens, bucketed)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_check.py needs a CUDA GPU")
    dev = torch.device("cuda")
    llm = full_config().llm
    g = torch.Generator(device=dev).manual_seed(0)
    rows, s, d = 2, a.slots, llm.head_dim
    q = torch.randn(rows, llm.num_heads, 1, d, device=dev, generator=g).to(torch.bfloat16)
    k = torch.randn(rows, llm.num_kv_heads, s, d, device=dev, generator=g).to(torch.bfloat16)
    v = torch.randn(rows, llm.num_kv_heads, s, d, device=dev, generator=g).to(torch.bfloat16)
    mask = torch.zeros(rows, 1, 1, s, dtype=torch.bool, device=dev)
    mask[:, :, :, : s - 40] = True
    mask[1, :, :, 5:20] = False  # the unconditional row hides the user turn
    kw = dict(attn_mask=mask, scale=d ** -0.5, enable_gqa=True)
    last = torch.tensor([s - 41], device=dev)  # the query's own slot: the newest visible one
    out = torch.empty_like(q)
    res = {"env": environment(dev), "shape": {"rows": rows, "heads": llm.num_heads, "kv_heads": llm.num_kv_heads,
                                              "head_dim": d, "slots": s}, "forms": {}}
    firsts = {}
    forms = (("torch default", lambda: F.scaled_dot_product_attention(q, k, v, **kw)),
             ("models.sdpa.attention", lambda: attention(q, k, v, **kw)),
             ("kernels.attention.decode_attention", lambda: decode_attention(q, k, v, mask, kw["scale"])),
             ("kernels.attention.decode_attention, last slot given", lambda: decode_attention(q, k, v, mask, kw["scale"], last=last)),
             ("kernels.attention.decode_attention, one split", lambda: decode_attention(q, k, v, mask, kw["scale"], splits=1)))
    for name, fn in forms:
        first, differing, _ = repeats(capture(lambda fn=fn: out.copy_(fn())), out, a.replays)
        layers = capture(lambda fn=fn: [out.copy_(fn()) for _ in range(llm.num_layers)])
        t = timed(layers, dev, warmup=3, runs=30)
        firsts[name] = first
        res["forms"][name] = {"replays": a.replays, "differing_from_first": differing,
                              "us_per_call": round(t["median_ms"] * 1e3 / llm.num_layers, 2)}
        print(name, res["forms"][name], flush=True)
    ref = firsts["torch default"].float()
    res["max_abs_diff_to_torch_default"] = {n: float((f.float() - ref).abs().max()) for n, f in firsts.items()}
    print("max |difference| to torch's default", res["max_abs_diff_to_torch_default"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "attention_check.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
