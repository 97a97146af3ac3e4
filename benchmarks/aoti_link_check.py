"""Is libstdc++ linked into AOTInductor's wrapper.so statically, and does a dynamic link load?

Session 17's native trace of the H200 machine's loader crash (benchmarks/aoti_crash_trace.py) ended in std::regex
and std::locale code *inside* the package's wrapper.so (AOTInductorModel -> parse_device_str -> regex), and the
wrapper.so defines std::locale's symbols itself: a static copy of libstdc++ in a process that has already loaded
the shared one. This script builds a one-linear package (BUILD, which aoti_crash_trace.py shares) through a
compiler shim (a script named g++ that logs each command) in two ways and loads each in a child process:

  as_is    the command torch gives (only logged);
  dynamic  "-static-libstdc++" dropped and -L pointing at a folder whose libstdc++.so is the libstdc++.so.6 this
           Python process has loaded (so the linker cannot fall back to libstdc++.a).

    python benchmarks/aoti_link_check.py OUT_DIR [--devices cuda,cpu]

Writes OUT_DIR/aoti_link_check.json (the compiler's view of libstdc++, each build's link command, the
wrapper.so's NEEDED entries and whether it defines std::locale, the load's exit code and the result's error).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILD = r'''
import sys, torch
dev = sys.argv[2]
torch.manual_seed(0)
layer = torch.nn.Linear(8, 4).to(dev)
x = torch.randn(2, 8, device=dev)
ep = torch.export.export(layer, (x,))
print(torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1]))
torch.save({"x": x.cpu(), "y": layer(x).detach().cpu()}, sys.argv[1] + ".io")
'''
LOAD = r'''
import sys, torch
f = torch._inductor.aoti_load_package(sys.argv[1])
io = torch.load(sys.argv[1] + ".io")
dev = sys.argv[2]
y = f(io["x"].to(dev))
y = y[0] if isinstance(y, (list, tuple)) else y
print("max_abs", float((y.cpu() - io["y"]).abs().max()))
'''
SHIM = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
for a; do
  shift
  case "$a" in
    -static-libstdc++) [ "{drop}" = 1 ] || set -- "$@" "$a" ;;
    *) set -- "$@" "$a" ;;
  esac
done
exec "{cxx}" {extra} "$@"
"""


def compiler_view(cxx: str) -> dict:
    """What the compiler itself says about libstdc++ (a bare name back means it has no such file)."""
    from export.aoti_toolchain import compiler_file

    out = {"cxx": cxx}
    for name in ("libstdc++.so", "libstdc++.a"):
        path = compiler_file(cxx, name)
        out[name] = {"path": path, "exists": os.path.exists(path) and os.path.isabs(path),
                     "real": os.path.realpath(path) if os.path.isabs(path) else None}
    out["version"] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return out


def plain_shared_lib(tmp: Path, cxx: str) -> dict:
    """A one-function C++ shared library linked by the compiler as it is: does it need libstdc++.so.6?"""
    src = tmp / "probe.cpp"
    src.write_text('#include <string>\nextern "C" int probe(){ std::string s(40, \'x\'); return (int)s.size(); }\n')
    so = tmp / "probe.so"
    r = subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], capture_output=True, text=True)
    return {"rc": r.returncode, "stderr": r.stderr[-500:], **(elf_facts(so) if so.exists() else {})}


def elf_facts(so: Path) -> dict:
    needed = []
    if shutil.which("readelf"):
        r = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True)
        needed = [line.split("[")[-1].rstrip("]") for line in r.stdout.splitlines() if "(NEEDED)" in line]
    defines_locale = None
    if shutil.which("nm"):
        r = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True)
        defines_locale = sum("_ZNKSt6locale" in line for line in r.stdout.splitlines())
    return {"needed": needed, "defines_std_locale_symbols": defines_locale,
            "static_libstdcxx": not any("libstdc++" in n for n in needed) and bool(defines_locale)}


def wrapper_so(package: Path, into: Path) -> Path | None:
    with zipfile.ZipFile(package) as z:
        names = [n for n in z.namelist() if n.endswith(".so")]
        if not names:
            return None
        into.mkdir(parents=True, exist_ok=True)
        target = into / Path(names[0]).name
        target.write_bytes(z.read(names[0]))
        return target


def make_shim(folder: Path, cxx: str, log: Path, drop: bool, libdir: Path | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "g++"  # torch decides "is this gcc" from the compiler's name
    extra = f'-L"{libdir}"' if libdir else ""
    shim.write_text(SHIM.format(log=log, drop=int(drop), cxx=cxx, extra=extra))
    shim.chmod(0o755)
    return shim


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--devices", default="cuda,cpu")
    p.add_argument("--timeout", type=int, default=240)
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from export.aoti_toolchain import inductor_compiler, loaded_libstdcxx

    cxx = inductor_compiler() or "g++"  # the compiler Inductor itself would use (CXX, else its search)
    lib = loaded_libstdcxx()  # torch is imported here: its libstdc++.so.6 is mapped
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "git_sha": os.environ.get("MINGRT_GIT_SHA")}
    result = {"env": env, "compiler": compiler_view(cxx), "python_loads": str(lib) if lib else None,
              "plain_shared_lib": plain_shared_lib(out, cxx), "builds": []}
    print(json.dumps({k: result[k] for k in ("compiler", "python_loads", "plain_shared_lib")}), flush=True)
    (out / "aoti_link_check.json").write_text(json.dumps(result, indent=1))
    libdir = out / "libstdcxx_link"
    if lib:
        libdir.mkdir(exist_ok=True)
        link = libdir / "libstdc++.so"
        link.unlink(missing_ok=True)
        link.symlink_to(lib)
    for dev in args.devices.split(","):
        for variant in ("as_is", "dynamic"):
            tag = f"{dev}_{variant}"
            log = out / f"cxx_{tag}.log"
            log.unlink(missing_ok=True)
            shim = make_shim(out / f"shim_{tag}", cxx, log, drop=variant == "dynamic",
                             libdir=libdir if variant == "dynamic" and lib else None)
            pkg = out / f"{tag}.pt2"
            env = dict(os.environ, CXX=str(shim), TORCHINDUCTOR_CACHE_DIR=str(out / f"cache_{tag}"))
            entry: dict = {"device": dev, "variant": variant}
            try:
                b = subprocess.run([sys.executable, "-c", BUILD, str(pkg), dev], env=env, capture_output=True,
                                   text=True, timeout=args.timeout)
                entry["build_rc"] = b.returncode
                if b.returncode:
                    entry["build_stderr"] = b.stderr[-1500:]
            except subprocess.TimeoutExpired:
                entry["build_rc"] = "timeout"
            commands = log.read_text().splitlines() if log.exists() else []
            entry["link_commands"] = [c for c in commands if " -shared" in c or c.startswith("-shared")][-2:]
            entry["static_flag_given"] = any("-static-libstdc++" in c for c in commands)
            so = wrapper_so(pkg, out / f"so_{tag}") if pkg.exists() else None
            if so:
                entry.update(elf_facts(so))
            if pkg.exists():
                try:
                    r = subprocess.run([sys.executable, "-c", LOAD, str(pkg), dev], capture_output=True, text=True,
                                       timeout=args.timeout)
                    entry["load_rc"] = r.returncode
                    entry["load_stdout"] = r.stdout.strip()[-300:]
                    if r.returncode:
                        entry["load_stderr"] = r.stderr[-800:]
                except subprocess.TimeoutExpired:
                    entry["load_rc"] = "timeout"
            print(json.dumps({k: v for k, v in entry.items() if k not in ("link_commands", "build_stderr",
                                                                          "load_stderr")}), flush=True)
            result["builds"].append(entry)
            (out / "aoti_link_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
