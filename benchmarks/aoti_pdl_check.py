"""Do AOTInductor packages built with Inductor's PDL switch (triton.enable_pdl) compile, load and compute right?

The run-time compiled steps launch Inductor's kernels with programmatic dependent launch; torch 2.11's AOTInductor
launcher does not set the launch attribute (plain cuLaunchKernel), so its packages' steps ran 0.19 ms slower on the
H200 (benchmarks/results/h200_session19.md). Later torch forwards each kernel's launch_pdl to the launch
(pytorch/pytorch#194079), for kernels compiled with the switch. This builds a small step (LayerNorm, our skinny GEMM
as a custom op, GELU, residual) with the switch off and on, each in its own process and Inductor cache, and reports
per variant: whether it built and loaded, its error against eager, a CUDA-graph replay's agreement, and how many of
the generated Triton kernels wait on a predecessor (gdc_wait). Waits are harmless without the launch attribute: a
grid launched without it has no programmatic predecessor still running.

    python benchmarks/aoti_pdl_check.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = r'''
import glob, json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import kernels.ops  # noqa: F401  (registers mingrt::skinny_linear)
from export.aoti_toolchain import dynamic_libstdcxx
from kernels.ops import skinny_linear_op

pdl = sys.argv[2] == "1"

class Step(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(2048)
        self.w = torch.nn.Parameter(torch.randn(4096, 2048) / 45)
        self.out = torch.nn.Linear(4096, 2048)

    def forward(self, x):
        h = skinny_linear_op(self.norm(x), self.w, None, None, "bfloat16")
        return x + self.out(torch.nn.functional.gelu(h))

torch.manual_seed(0)
m = Step().cuda().to(torch.bfloat16).eval()
x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
res = {"pdl": pdl}
with torch.no_grad():
    ref = m(x)
    ep = torch.export.export(m, (x,))
    with dynamic_libstdcxx():
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(sys.argv[3], "p.pt2"),
                                                      inductor_configs={"triton.enable_pdl": pdl})
    res["built"] = True
    f = torch._inductor.aoti_load_package(pkg, run_single_threaded=True)
    got = f(x)
    res["rel_l2_vs_eager"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    static_x = x.clone()
    f(static_x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = f(static_x)
    g.replay()
    torch.cuda.synchronize()
    res["graph_replay_equal"] = bool(torch.equal(static_out, got))
srcs = [p for p in glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**", "*.py"), recursive=True)
        if "@triton.jit" in open(p).read()]
res["triton_kernels"] = len(srcs)
res["kernels_with_gdc_wait"] = sum("gdc_wait" in open(p).read() for p in srcs)
print("RESULT " + json.dumps(res), flush=True)
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser("benchmarks/aoti_pdl_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for each variant's process")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.speed import environment

    res = {"environment": environment(torch.device("cuda")), "variants": {}}
    for pdl in ("0", "1"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "cache")}
            try:
                r = subprocess.run([sys.executable, "-c", CASE, str(ROOT), pdl, tmp], capture_output=True, text=True,
                                   timeout=a.timeout, env=env)
            except subprocess.TimeoutExpired:
                r = None
        if r is None:
            out = {"timed_out_s": a.timeout}
        else:
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            out = json.loads(line[-1][7:]) if line else {"returncode": r.returncode, "stderr_tail": r.stderr[-1500:]}
        res["variants"][f"enable_pdl={pdl}"] = out
        print(f"enable_pdl={pdl}: {out}", flush=True)
    path = a.out / "aoti_pdl_check.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
