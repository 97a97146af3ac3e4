"""export/aoti_toolchain.py: AOTInductor packages link libstdc++ dynamically, also where the compiler has only
libstdc++.a (the H200 machine's GCC: its packages carried a static libstdc++ and crashed the loader)."""
import os
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
  -print-file-name=libstdc++.a) echo "{archive}" ;;
  *) printf '%s\\n' "$*" >> "{log}" ;;
esac
"""


def fake_compiler(tmp_path, has_so: bool):
    """A 'g++' that answers like a compiler with (or without) libstdc++.so and logs any other command."""
    archive = tmp_path / "libstdc++.a"
    archive.write_bytes(b"!<arch>\n")
    so = tmp_path / "libstdc++.so.real"
    so.write_bytes(b"")
    folder = tmp_path / "bin"
    folder.mkdir()
    cxx = folder / "g++"
    log = tmp_path / "commands.log"
    cxx.write_text(FAKE.format(so=f'echo "{so}"' if has_so else "echo libstdc++.so", archive=archive, log=log))
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
    assert log.read_text().splitlines() == [f"-L{libdir} -shared -o out dir/w.so w.o"]
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
