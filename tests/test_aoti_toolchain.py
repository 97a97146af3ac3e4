"""export/aoti_toolchain.py: AOTInductor packages link libstdc++ dynamically, also where the compiler has only
libstdc++.a (the H200 machine's GCC: its packages carried a static libstdc++ and crashed the loader)."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from torch._inductor import config

from export import aoti_toolchain as tc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim is for Linux toolchains")

FAKE = """#!/bin/sh
case "$1" in
  -print-file-name=libstdc++.so) {so} ;;
  -print-file-name=libstdc++.a) echo {archive} ;;
  --version) echo {version} ;;
  *) printf '%s\\n' "$@" >> {log} ;;
esac
"""


def fake_compiler(tmp_path, has_so: bool, name: str = "g++", version: str = "g++ (fake) 13.3.0"):
    """A compiler that answers like one with (or without) libstdc++.so and logs any other command's arguments,
    one per line."""
    archive = tmp_path / "libstdc++.a"
    archive.write_bytes(b"!<arch>\n")
    so = tmp_path / "libstdc++.so.real"
    so.write_bytes(b"")
    folder = tmp_path / "bin"
    folder.mkdir()
    cxx = folder / name
    log = tmp_path / "commands.log"
    q = shlex.quote
    cxx.write_text(FAKE.format(so=f"echo {q(str(so))}" if has_so else "echo libstdc++.so", archive=q(str(archive)),
                               log=q(str(log)), version=q(version)))
    cxx.chmod(0o755)
    return str(cxx), log


def test_static_only_compiler_is_detected(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    static, _ = fake_compiler(tmp_path / "a", has_so=False)
    shared, _ = fake_compiler(tmp_path / "b", has_so=True)
    assert tc.links_libstdcxx_statically(static)
    assert not tc.links_libstdcxx_statically(shared)
    assert not tc.links_libstdcxx_statically(str(tmp_path / "no-such-compiler"))


def test_loaded_libstdcxx_is_this_process_s():
    lib = tc.loaded_libstdcxx()  # torch is imported: its libstdc++.so.6 is mapped
    assert lib is not None and lib.name.startswith("libstdc++.so.6") and lib.exists()


def test_shim_adds_the_library_folder_and_passes_every_argument(tmp_path):
    cxx, log = fake_compiler(tmp_path, has_so=False)
    with config.patch({"cpp.cxx": (None, cxx)}):
        with tc.dynamic_libstdcxx(root=tmp_path / "shims") as shim:
            assert shim is not None and shim.name == "g++" and str(tmp_path / "shims") in str(shim)
            assert config.cpp.cxx == (str(shim),)  # what Inductor compiles and links with inside the block
            subprocess.run([str(shim), "-shared", "-o", "out dir/w.so", "w.o"], check=True)
        assert config.cpp.cxx == (None, cxx)
    libdir = shim.parent.parent / "lib"
    assert log.read_text().splitlines() == [f"-L{libdir}", "-shared", "-o", "out dir/w.so", "w.o"]
    assert os.path.realpath(libdir / "libstdc++.so") == os.path.realpath(tc.loaded_libstdcxx())
    assert tc.write_shim(cxx, tc.loaded_libstdcxx(), tmp_path / "shims") == shim  # one folder per pair


def test_no_shim_where_the_compiler_has_its_shared_libstdcxx(tmp_path):
    cxx, log = fake_compiler(tmp_path, has_so=True)
    with config.patch({"cpp.cxx": (cxx,)}), tc.dynamic_libstdcxx(root=tmp_path / "shims") as shim:
        assert shim is None and config.cpp.cxx == (cxx,)
    assert not log.exists()


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("readelf")), reason="needs g++ and readelf")
def test_a_library_linked_through_the_shim_needs_the_shared_libstdcxx(tmp_path):
    shim = tc.write_shim(shutil.which("g++"), tc.loaded_libstdcxx(), tmp_path)
    src = tmp_path / "probe.cpp"
    src.write_text('#include <regex>\nextern "C" int probe(){ return std::regex_match("cuda:0", std::regex("cuda:[0-9]+")); }\n')
    so = tmp_path / "probe.so"
    subprocess.run([str(shim), "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], check=True)
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so.6" in needed
    import ctypes

    assert ctypes.CDLL(str(so)).probe() == 1  # std::regex in this process: the call that crashed the static copy
    assert torch.ones(1).item() == 1.0


def test_config_is_restored_when_the_build_fails(tmp_path):
    cxx, _ = fake_compiler(tmp_path, has_so=False)
    with config.patch({"cpp.cxx": (cxx,)}):
        with pytest.raises(RuntimeError, match="build failed"), tc.dynamic_libstdcxx(root=tmp_path / "shims"):
            raise RuntimeError("build failed")
        assert config.cpp.cxx == (cxx,)


def test_odd_paths_are_quoted_and_clang_keeps_its_name(tmp_path):
    odd = tmp_path / 'we"ird $dir `x`'
    odd.mkdir()
    cxx, log = fake_compiler(odd, has_so=False, name="c++", version="clang version 18.1.3")
    shim = tc.write_shim(cxx, tc.loaded_libstdcxx(), odd / "shims $HOME")
    assert shim.name == "clang++"  # Inductor picks Clang's flags by the name
    subprocess.run([str(shim), "-c", "a b.cpp"], check=True)
    assert log.read_text().splitlines() == [f"-L{shim.parent.parent / 'lib'}", "-c", "a b.cpp"]


def _write_after(barrier, args, results):
    barrier.wait()  # every process at once: the first creation is where writers collide
    try:
        results.put(str(tc.write_shim(*args)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"error: {type(exc).__name__}: {exc}")


def test_concurrent_builds_share_one_shim_without_errors(tmp_path):
    """Builds starting together (pytest-xdist, two export.build runs) write the same shim: each sees a complete
    script and library link at every moment (renames, no unlink-then-create gap). Session 17's first version
    failed here in about half of such rounds (FileExistsError, FileNotFoundError)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    cxx, _ = fake_compiler(tmp_path, has_so=False)
    lib = tc.loaded_libstdcxx()
    for attempt in range(10):
        root = tmp_path / f"shims{attempt}"
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_write_after, args=(barrier, (cxx, lib, root), results)) for _ in range(6)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        shim = tc.write_shim(cxx, lib, root)
        assert got == [str(shim)] * 6, got
        assert os.path.realpath(shim.parent.parent / "lib" / "libstdc++.so") == os.path.realpath(lib)
        assert sorted(p.name for p in shim.parent.iterdir()) == ["g++"]  # no temporary left behind
