"""The C++ toolchain AOTInductor builds packages with: link libstdc++ dynamically, always.

A package's wrapper.so is loaded into a process that already has the shared libstdc++.so.6 (torch's). Where
the compiler has no libstdc++.so to link against, only libstdc++.a, g++ quietly links a private static copy of
libstdc++ into wrapper.so; the two copies' std::locale state then meet in the package's first std::regex
(AOTInductorModel parses its device string with one) and the process dies with SIGSEGV. That is the loader
crash of the H200 machine we were lent (its GCC 13.3 under /opt/gcc ships libstdc++.a alone): static copy ->
SIGSEGV, the same package linked against the loaded libstdc++.so.6 -> loads and matches eager
(benchmarks/aoti_link_check.py, benchmarks/results/h200_session17.md).

`dynamic_libstdcxx()` is a no-op where the compiler has its libstdc++.so. Otherwise it points Inductor at a
small compiler shim (a script named like the compiler, since Inductor tells GCC from Clang by the name) that
adds -L for a folder whose libstdc++.so is this process's libstdc++.so.6. The package then needs
libstdc++.so.6 like any C++ library, and the machine that loads it has one.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("export.build")

SHIM = ('#!/bin/sh\n# written by mingrt (export/aoti_toolchain.py): link libstdc++ dynamically\n'
        'exec {cxx} {libdir_flag} "$@"\n')


def inductor_compiler() -> str | None:
    """The C++ compiler Inductor would pick (its own search over config.cpp.cxx), as a path; None if it finds none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch's InvalidCxxCompiler (no compiler: nothing to link), or no such helper
        return None
    return shutil.which(cxx) or cxx


def compiler_file(cxx: str, name: str) -> str:
    """What `cxx -print-file-name=name` answers: a path where the compiler has the file, the bare name where it has
    not, "" where the compiler does not run."""
    try:
        r = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = r.stdout.strip().splitlines()
    return lines[-1].strip() if r.returncode == 0 and lines else ""  # the last line (a wrapper may print before it)


def links_libstdcxx_statically(cxx: str) -> bool:
    """True when `cxx` has libstdc++.a but no libstdc++.so (it then links the static one into shared objects)."""
    def has(name: str) -> bool:
        path = compiler_file(cxx, name)
        return os.path.isabs(path) and os.path.exists(path)

    return not has("libstdc++.so") and has("libstdc++.a")


def loaded_libstdcxx() -> Path | None:
    """The libstdc++.so.6 mapped into this process (Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                path = fields[-1] if fields else ""
                if re.search(r"/libstdc\+\+\.so\.6[.\d]*$", path) and os.path.exists(path):
                    return Path(path)  # (a library replaced on disk since it was mapped ends in " (deleted)": skipped)
    except OSError:
        return None
    return None


def _shim_root() -> Path:
    """This user's folder for shims: Inductor's own cache folder (per user), else one in the temp folder."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir()) / "mingrt-cxx"
    except ImportError:  # older torch: the same per-user idea by hand
        return Path(tempfile.gettempdir()) / f"mingrt-cxx-{os.getuid()}"


def _replace_atomically(target: Path, make) -> None:
    """Create the new `target` under a unique name with make(path), then rename it over the old one: a build in
    another process sees the old file or the new one, never none (a compile in that gap would quietly link the
    static libstdc++ again)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    os.unlink(tmp)
    try:
        make(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _compiler_kind(cxx: str) -> str:
    """The shim's name: Inductor tells GCC from Clang by the compiler's name, so keep what the real one is."""
    name = Path(cxx).name
    if re.search(r"(g\+\+|clang\+\+)", name):
        return name
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return "clang++" if "clang" in version.lower() else "g++"


def write_shim(cxx: str, lib: Path, root: Path | None = None) -> Path:
    """A compiler shim adding -L<folder with libstdc++.so -> lib>; the same folder for the same pair, so
    Inductor's caches see one compiler path across builds. Safe against concurrent builds (atomic renames)."""
    tag = hashlib.sha256(f"{cxx}\0{lib}".encode()).hexdigest()[:12]
    folder = Path(root or _shim_root()) / tag
    libdir, bindir = folder / "lib", folder / "bin"
    libdir.mkdir(parents=True, exist_ok=True)
    bindir.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user: not running a compiler script from it")
    link = libdir / "libstdc++.so"
    if not (link.is_symlink() and os.readlink(link) == str(lib)):
        _replace_atomically(link, lambda p: p.symlink_to(lib))
    shim = bindir / _compiler_kind(cxx)
    text = SHIM.format(cxx=shlex.quote(cxx), libdir_flag=shlex.quote(f"-L{libdir}"))
    if not shim.exists() or shim.read_text() != text:
        def make(p: Path) -> None:
            p.write_text(text)
            p.chmod(0o755)

        _replace_atomically(shim, make)
    return shim


@contextlib.contextmanager
def dynamic_libstdcxx(root: Path | None = None):
    """Within: AOTInductor packages link libstdc++ dynamically (module docstring). Yields the shim in use (written
    under `root`, default a folder of Inductor's per-user cache), or None where the compiler needs none (or this
    is not Linux, or no libstdc++.so.6 is loaded: then a warning)."""
    cxx = inductor_compiler() if sys.platform.startswith("linux") else None
    if cxx is None or not links_libstdcxx_statically(cxx):
        yield None
        return
    lib = loaded_libstdcxx()
    if lib is None:
        logger.warning("aoti: %s has only a static libstdc++ and no libstdc++.so.6 is loaded here to link against; "
                       "its packages may crash the loader", cxx)
        yield None
        return
    from torch._inductor import config

    shim = write_shim(cxx, lib, root)
    logger.info("aoti: %s has no libstdc++.so; linking packages against %s through %s", cxx, lib, shim)
    with config.patch({"cpp.cxx": (str(shim),)}):
        yield shim


__all__ = ["compiler_file", "dynamic_libstdcxx", "inductor_compiler", "links_libstdcxx_statically", "loaded_libstdcxx", "write_shim"]
