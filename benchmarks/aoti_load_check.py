"""Can this machine load AOTInductor CUDA packages at all? A two-layer MLP through every load route.

Each route runs in its own process, since a failing loader segfaults. Session 3 on an H200 (torch
2.11.0+cu130): all four crashed with SIGSEGV inside the loader (benchmarks/results/aoti_load_variants_h200.log).
Session 17 found why (a static libstdc++ in each package, from a compiler without libstdc++.so) and fixed the build
(export/aoti_toolchain.py); this script builds the torch way and still crashes there.

    python benchmarks/aoti_load_check.py
"""
import subprocess
import sys

CASE = r'''
import faulthandler, glob, sys, zipfile
import torch
faulthandler.enable()
route = sys.argv[1]
mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
x = torch.randn(4, 64, device="cuda")
ep = torch.export.export(mlp, (x,))
if route == "so":  # the older .so route
    f = torch._export.aot_load(torch._inductor.aot_compile(ep.module(), (x,)), "cuda")
else:
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/aoti_check_{route}.pt2")
    if route == "package":
        f = torch._inductor.aoti_load_package(pkg, device_index=0)
    elif route == "single-threaded":
        f = torch._inductor.aoti_load_package(pkg, run_single_threaded=True)
    else:  # the CUDA runner straight on the package's .so
        zipfile.ZipFile(pkg).extractall(f"/tmp/aoti_check_{route}")
        so = glob.glob(f"/tmp/aoti_check_{route}/**/*.so", recursive=True)[0]
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", "", False)
        f = lambda t: runner.run([t])[0]  # noqa: E731
out = f(x)
out = out[0] if isinstance(out, (list, tuple)) else out
print(route, "ran; max abs error vs eager", (out - mlp(x)).abs().max().item(), flush=True)
'''

for route in ["package", "single-threaded", "runner", "so"]:
    r = subprocess.run([sys.executable, "-c", CASE, route], capture_output=True, text=True, timeout=300)
    tail = [ln for ln in (r.stdout + r.stderr).splitlines() if "arn" not in ln][-6:]
    print(f"--- {route}: exit {r.returncode}\n" + "\n".join(tail), flush=True)
