"""Where does AOTInductor's loader crash on this machine? A CPU package of one linear layer is built, then loaded
in a child process with a native backtrace on SIGSEGV: under gdb where the machine has it, else through
benchmarks/segv_backtrace.c (built here with cc, installed just before the load), with addr2line naming the
frames the dynamic symbols do not.

    python benchmarks/aoti_crash_trace.py OUT_DIR [--cuda]      # --cuda: a CUDA package of the same layer
    python benchmarks/aoti_crash_trace.py OUT_DIR --self-test   # the handler on a deliberate segfault

Session 16 on the H200 machine (torch 2.11.0+cu130, g++ 13.3, no gdb): the CPU loader segfaulted too (the test
fixture in gpu_tests_h200_s16_crash.log; aoti_load_check.py builds CUDA packages only), after the package's
wrapper.so had loaded and initialised (LD_DEBUG; benchmarks/results/aoti_crash_trace_h200_s16.log is an excerpt
of that run's log). The same torch 2.11.0+cu130 wheel builds and loads the package on our CPU machine (g++ 12.2).
Session 17 ran it there: the frames end in std::regex/std::locale code inside the package's own wrapper.so, a static
copy of libstdc++ the machine's compiler (which has no libstdc++.so) linked in; benchmarks/aoti_link_check.py
confirmed it and export/aoti_toolchain.py links packages dynamically now. This script builds the torch way, so it
still shows the crash on such a machine.
Writes OUT_DIR/aoti_crash_trace.log.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.aoti_link_check import BUILD  # noqa: E402  (argv: package, device; the torch way of linking)

# argv: package, handler .so ('' for none), device index
LOAD = r'''
import ctypes, sys, torch
if sys.argv[2]:
    assert ctypes.CDLL(sys.argv[2]).install_segv_backtrace() == 0
print("loading", flush=True)
f = torch._inductor.aoti_load_package(sys.argv[1], device_index=int(sys.argv[3]))
print("loaded", flush=True)
'''
SELF_TEST = r'''
import ctypes, sys
assert ctypes.CDLL(sys.argv[1]).install_segv_backtrace() == 0
ctypes.string_at(0)
'''
FRAME = re.compile(r"^#(\d+) (\S+)\+0x([0-9a-f]+) (\S+)$")


def build_handler(out: Path) -> Path | None:
    """benchmarks/segv_backtrace.c as a shared library in `out`, or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    so = out / "segv_backtrace.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(HERE / "segv_backtrace.c"), "-ldl"], check=True)
    return so


def name_frames(stderr: str) -> list[str]:
    """The handler's frames, with addr2line's function (and line, where there is debug info) for those whose
    dynamic symbol is unknown."""
    frames = [m.groups() for m in map(FRAME.match, stderr.splitlines()) if m]
    addr2line = shutil.which("addr2line")
    named: dict[tuple[str, str], str] = {}
    if addr2line:
        by_lib = defaultdict(list)
        for _, lib, off, sym in frames:
            if sym == "?" and Path(lib).exists():
                by_lib[lib].append(off)
        for lib, offs in by_lib.items():
            r = subprocess.run([addr2line, "-f", "-C", "-e", lib, *(f"0x{o}" for o in offs)], capture_output=True, text=True)
            lines = r.stdout.splitlines()
            for i, off in enumerate(offs):
                if 2 * i + 1 < len(lines):
                    named[(lib, off)] = f"{lines[2 * i]} ({lines[2 * i + 1]})"
    return [f"#{i} {lib}+0x{off} {named.get((lib, off), sym)}" for i, lib, off, sym in frames]


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--cuda", action="store_true", help="a CUDA package (the default: a CPU one)")
    p.add_argument("--self-test", action="store_true", help="only check the handler on a deliberate segfault")
    p.add_argument("--no-gdb", action="store_true", help="the handler even where gdb exists")
    p.add_argument("--no-ld-debug", dest="ld_debug", action="store_false",
                   help="without LD_DEBUG=files (the libraries loaded before the crash)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    handler = build_handler(a.out)
    log.append(f"handler: {handler}")
    if a.self_test:
        if handler is None:
            raise SystemExit("no C compiler: the handler cannot be built")
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SELF_TEST, str(handler)], capture_output=True,
                           text=True, timeout=120)
        log += [f"self-test rc={r.returncode}", *name_frames(r.stderr),
                "faulthandler after ours: " + str("Fatal Python error: Segmentation fault" in r.stderr)]
    else:
        pkg, dev = str(a.out / "aoti_trace.pt2"), "cuda" if a.cuda else "cpu"
        r = subprocess.run([sys.executable, "-c", BUILD, pkg, dev], capture_output=True, text=True)
        log += [f"build ({dev}) rc={r.returncode}", r.stdout[-2000:], r.stderr[-3000:]]
        index = "0" if a.cuda else "-1"
        gdb = None if a.no_gdb else shutil.which("gdb")
        log.append(f"gdb: {gdb}")
        if gdb:
            r = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info sharedlibrary",
                                "--args", sys.executable, "-c", LOAD, pkg, "", index],
                               capture_output=True, text=True, timeout=240)
            log += [r.stdout[-12000:], r.stderr[-3000:]]
        else:  # faulthandler: the Python frames after ours; LD_DEBUG=files: which libraries were loaded last
            env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1", **({"LD_DEBUG": "files"} if a.ld_debug else {}))
            try:
                r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", LOAD, pkg, str(handler or ""), index],
                                   capture_output=True, text=True, timeout=240, env=env)
                rc, out, err = r.returncode, r.stdout, r.stderr
            except subprocess.TimeoutExpired as exc:  # a hang (e.g. a deadlock in the handler): keep what it printed
                rc, out, err = "timeout (240 s)", _text(exc.stdout), _text(exc.stderr)
            loaded = [ln for ln in err.splitlines() if "file=" in ln and "calling init" not in ln][-12:]
            rest = [ln for ln in err.splitlines() if "file=" not in ln and not FRAME.match(ln) and ln.strip()
                    and not re.match(r"^\s*\d+:\s", ln)]
            log += [f"load rc={rc}", out[-2000:], "last libraries loaded:", *loaded, "native frames:",
                    *name_frames(err), "the rest of stderr:", *rest[-80:]]
    for cmd in (["c++", "--version"], ["ldd", "--version"]):
        try:
            log.append(subprocess.run(cmd, capture_output=True, text=True).stdout[:300])
        except OSError as exc:
            log.append(repr(exc))
    (a.out / "aoti_crash_trace.log").write_text("\n".join(log))
    print("\n".join(log)[-4000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
