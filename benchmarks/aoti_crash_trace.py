"""Where does AOTInductor's loader crash on this machine? A CPU package of one linear layer, built, then loaded
under gdb (where the machine has it) for a native backtrace; without gdb, the loader's shared-library view.

    python benchmarks/aoti_crash_trace.py OUT_DIR

Session 16 on the H200 machine (torch 2.11.0+cu130): the CPU loader segfaulted too (the test fixture in
gpu_tests_h200_s16_crash.log; aoti_load_check.py builds CUDA packages only), so the crash is not CUDA's. Writes
OUT_DIR/aoti_crash_trace.log (benchmarks/results/aoti_crash_trace_h200_s16.log is an excerpt of it).
"""
import shutil
import subprocess
import sys
from pathlib import Path

BUILD = r'''
import sys, torch
ep = torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
print(torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1]))
'''
LOAD = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1]); print('loaded')"


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    log = []
    pkg = "/tmp/aoti_trace.pt2"
    r = subprocess.run([sys.executable, "-c", BUILD, pkg], capture_output=True, text=True)
    log += [f"build rc={r.returncode}", r.stdout[-2000:], r.stderr[-3000:]]
    gdb = shutil.which("gdb")
    log.append(f"gdb: {gdb}")
    if gdb:
        r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                            "--args", sys.executable, "-c", LOAD, pkg], capture_output=True, text=True, timeout=240)
        log += [r.stdout[-12000:], r.stderr[-3000:]]
    else:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", LOAD, pkg], capture_output=True, text=True,
                           env={"LD_DEBUG": "files", **__import__("os").environ}, timeout=240)
        log += [f"load rc={r.returncode}", r.stdout[-2000:], r.stderr[-12000:]]
    for cmd in (["c++", "--version"], ["ldd", "--version"]):
        try:
            log.append(subprocess.run(cmd, capture_output=True, text=True).stdout[:300])
        except OSError as exc:
            log.append(repr(exc))
    (out / "aoti_crash_trace.log").write_text("\n".join(log))
    print("\n".join(log)[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
