"""`export.build --targets aoti`: AOTInductor packages of the fast path's steps, built, verified, loaded.

CPU: the fp32 packages (C++ code) end to end through the build and the runtime, and the FP8 decode
path (the Triton kernels as custom ops inside a package) in the Triton interpreter. The GPU versions
run in tests/test_gpu_fast_path.py.
"""
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import runtime
from export.aoti_toolchain import dynamic_libstdcxx
from export.build import main
from runtime.errors import EngineError


@pytest.fixture(scope="module")
def cpu_aoti(tmp_path_factory):
    """Skip (with the reason) where AOTInductor cannot build for the CPU: no C++ compiler or headers."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("AOTInductor on the CPU needs a C++ compiler")
    from runtime.fast.compiled_steps import probe_load

    probe = torch.nn.Linear(8, 4)
    try:  # a toolchain check on a single linear, so that a failure below is ours, not the machine's
        ep = torch.export.export(probe, (torch.randn(2, 8),))
        where = tmp_path_factory.mktemp("probe") / "p.pt2"
        with dynamic_libstdcxx():  # as export.build links its packages
            path = torch._inductor.aoti_compile_and_package(ep, package_path=str(where))
    except Exception as exc:  # noqa: BLE001 - any toolchain failure is a skip reason
        pytest.skip(f"AOTInductor cannot build for the CPU here: {type(exc).__name__}: {str(exc)[:200]}")
    why = probe_load(path, torch.device("cpu"))  # in a child: on some machines the loader segfaults
    if why and ("crashed" in why or "took over" in why):
        pytest.skip(f"AOTInductor cannot load a CPU package here: {why}")
    assert why is None, f"the probe failed on a healthy one-linear package: {why}"  # the probe itself is broken


@pytest.fixture(scope="module")
def aoti_folder(tmp_path_factory, cpu_aoti):
    out = tmp_path_factory.mktemp("aoti-fp32")
    assert main(["--precision", "fp32", "--targets", "aoti", "--device", "cpu", "--out", str(out)]) == 0
    return out


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_build_records_and_verifies_the_packages(aoti_folder):
    man = _manifest(aoti_folder)
    comp = man["compiled"]
    assert man["passed"] and man["pieces"] == {}  # --targets aoti alone: no ONNX piece
    assert comp["format"] == "aotinductor" and comp["torch"] == torch.__version__ and comp["device"] == "cpu"
    assert (comp["dtype"], comp["weights"], comp["kernels"]) == ("float32", "bf16", False)
    assert set(comp["steps"]) == {"llm_step", "semantic_step"}
    for name, step in comp["steps"].items():
        path = aoti_folder / step["file"]
        assert path.stat().st_size == step["bytes"] < 20e6  # code only: the weights stay with the model
        assert any(n.endswith("norm.weight") for n, _, _ in step["constants"]), name
        assert step["inductor_configs"] == {"aot_inductor.package_constants_in_so": False}, name  # no PDL on a CPU
    v = comp["verification"]
    assert v["passed"] and v["bound_rel_l2"] == 1e-4
    for name, res in v["steps"].items():
        assert res["worst"]["rel_l2"] < 1e-5 and "caches" in res["outputs"], name


def test_unchanged_build_is_skipped(aoti_folder, caplog):
    before = _manifest(aoti_folder)["compiled"]
    with caplog.at_level(logging.INFO, logger="export.build"):
        assert main(["--precision", "fp32", "--targets", "aoti", "--device", "cpu", "--out", str(aoti_folder)]) == 0
    assert "compiled steps: unchanged" in caplog.text
    assert _manifest(aoti_folder)["compiled"] == before


def test_runtime_runs_the_packages_and_matches_eager(aoti_folder):
    rt = runtime.load(aoti_folder, device="cpu")  # auto: the torch backend, because the packages suit this machine
    assert rt.backend.name == "torch" and rt._fast is not None and rt._fast.compiled == "aot"
    prompts = ["a red bicycle", "a blue car"]
    got = rt.generate_image(prompts, seed=[3, 4])
    eager = runtime.load(aoti_folder, backend="torch", device="cpu", compiled="off")
    ref = eager.generate_image(prompts, seed=[3, 4])
    assert torch.allclose(got.latents, ref.latents, atol=1e-5, rtol=0)
    assert (got.pixels - ref.pixels).abs().max() < 1e-4


def test_mismatched_or_damaged_packages_fail_clearly(aoti_folder, tmp_path, caplog):
    folder = tmp_path / "copy"
    shutil.copytree(aoti_folder, folder)
    man = _manifest(folder)
    man["compiled"]["torch"] = "0.0.0"
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EngineError, match="built for torch='0.0.0'"):
        runtime.load(folder, backend="torch", device="cpu", compiled="aot")
    with caplog.at_level(logging.WARNING):
        rt = runtime.load(folder, backend="torch", device="cpu")  # auto: falls back to the plain loop, and says so
    assert rt._fast is None and "compiled steps not used" in caplog.text
    shutil.copytree(aoti_folder, folder, dirs_exist_ok=True)  # good manifest back, then damage a package
    with open(folder / "compiled_llm_step.pt2", "ab") as f:
        f.write(b"x")
    with pytest.raises(EngineError, match="differs from the manifest"):
        runtime.load(folder, backend="torch", device="cpu")
    # a package cut short cannot load at all: still the manifest's error, not a probe failure excused by a fallback
    pkg = folder / "compiled_llm_step.pt2"
    pkg.write_bytes(pkg.read_bytes()[:1000])
    with pytest.raises(EngineError, match="differs from the manifest"):
        runtime.load(folder, backend="torch", device="cpu")
    pkg.unlink()
    with pytest.raises(EngineError, match="compiled_llm_step.pt2 is missing"):
        runtime.load(folder, backend="torch", device="cpu")
    with pytest.raises(ValueError, match="compiled must be one of"):
        runtime.load(folder, compiled="yes")


def test_fp8_kernel_steps_compile_into_a_package(tmp_path, cpu_aoti):
    """The decode kernels (custom ops) inside AOTInductor packages: same result as the eager modules."""
    pytest.importorskip("triton", reason="the decode kernels need triton (the 'kernels' extra)")
    from kernels._triton import interpreting

    if not interpreting():  # a GPU machine: there the CUDA packages are test_gpu_packages_inside_the_cuda_graph's
        pytest.skip("the decode kernels take CPU tensors only in Triton's interpreter (on where no GPU is present: CI)")
    from export.compiled_steps import compile_steps, verify_steps
    from models.config import tiny_config
    from models.univision import build
    from runtime.fast.graph import GraphImageGenerator

    model = build(tiny_config(), seed=0).to(torch.bfloat16).eval()
    gen = GraphImageGenerator(model, use_graph=False, kernels=True, weights="fp8", compile=False)
    _, steps = compile_steps(gen, tmp_path, max_sequence=512)
    names = [n for n, _, _ in steps["llm_step"].expected]
    assert any(n.endswith("fused_decode.wg") for n in names) and any(n.endswith("weight_fp8") for n in names)
    rep = verify_steps(gen, steps, torch.bfloat16)
    assert rep["passed"]
    for name, res in rep["steps"].items():  # bf16 rounding differs between Inductor's fusions and eager
        assert res["worst"]["rel_l2"] < 2e-2 and res["worst"]["cosine"] > 0.9995, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_packages_inside_the_cuda_graph(tmp_path, precision):
    """Built by export.build on the GPU, loaded by the runtime, replayed in the per-token CUDA graph:
    the image matches the run-time torch.compile path's up to bf16 rounding of the fused steps."""
    from export.verify import psnr
    from kernels.fp8 import gpu_supports_fp8

    if precision == "fp8" and not gpu_supports_fp8(torch.device("cuda"))[0]:
        pytest.skip("FP8 needs SM 8.9+")
    assert main(["--precision", precision, "--targets", "aoti", "--device", "cuda", "--out", str(tmp_path)]) == 0
    comp = _manifest(tmp_path)["compiled"]
    if comp["verification"]["passed"] is None:  # the packages were written; this torch cannot load them here
        pytest.skip(comp["verification"]["note"])
    assert comp["device"] == "cuda" and comp["kernels"] and comp["weights"] == ("fp8" if precision == "fp8" else "bf16")
    aot = runtime.load(tmp_path, backend="torch", compiled="aot")
    assert aot._fast.compiled == "aot"
    got = aot.generate_image("a red bicycle", seed=3)
    assert all(k.graph is not None for k in aot._fast._buckets.values())
    ref = runtime.load(tmp_path, backend="torch", compiled="jit", decode_weights=comp["weights"])
    assert ref._fast.compiled is True
    # bf16 rounding differs between the two compilations (as between bf16 and fp32: see test_gpu_fast_path)
    assert psnr(got.pixels.float(), ref.generate_image("a red bicycle", seed=3).pixels.float()) > 25


def test_a_crashing_loader_is_caught_in_a_child_process(tmp_path, monkeypatch):
    """probe_load reports a loader that kills its process (a segfault) instead of inheriting it."""
    from runtime.fast import compiled_steps as cs

    pkg = tmp_path / "step.pt2"
    pkg.write_bytes(b"not a package")
    monkeypatch.setattr(cs, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(cs, "_PROBED", {})
    why = cs.probe_load(pkg, torch.device("cuda", 0))
    assert why.startswith("AOTInductor's loader crashed") and "signal 11" in why and why.endswith("on cuda")
    monkeypatch.setattr(cs, "_PROBE", "raise SystemExit('bad archive')")
    monkeypatch.setattr(cs, "_PROBED", {})
    assert cs.probe_load(pkg, torch.device("cuda", 0)) == "AOTInductor's loader failed: bad archive"
    # CPU packages too: the loader crashed on the CPU as well on the H200 machine (session 16)
    assert cs.probe_load(pkg, torch.device("cpu")) == "AOTInductor's loader failed: bad archive"
    monkeypatch.setattr(cs, "_PROBE", "import sys; assert sys.argv[2] == '-1'")
    monkeypatch.setattr(cs, "_PROBED", {})
    assert cs.probe_load(pkg, torch.device("cpu")) is None
    # one answer per package and device, cached: the CPU's does not answer for a GPU, nor "cuda" for cuda:1
    monkeypatch.setattr(cs, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert "crashed" in cs.probe_load(pkg, torch.device("cuda"))
    assert cs.probe_load(pkg, torch.device("cpu")) is None  # cached from before the crash probe
    monkeypatch.setattr(cs, "_PROBE", "pass")  # a probe from now on would load: cached answers still crash
    assert "crashed" in cs.probe_load(pkg, torch.device("cuda", 1))  # "cuda" is cuda:1 here: the same answer
    assert cs.probe_load(pkg, torch.device("cuda", 0)) is None  # another GPU: probed again


def test_packages_load_single_threaded_with_the_models_own_tensors(monkeypatch, tmp_path):
    """CompiledStep opens a package without the container's model pool: the pool asks cudaEventQuery before each call,
    which the per-token graph's capture refuses (session 18 on the H200); the weights go in as the module's own
    tensors (user_managed, no copy)."""
    from runtime.errors import EngineError
    from runtime.fast.compiled_steps import CompiledStep, constants_signature

    module = torch.nn.Linear(8, 4)
    calls = {}

    class Runner:
        def get_constant_fqns(self):
            return ["bias", "weight"]

        def load_constants(self, consts, **kw):
            calls["constants"], calls["load_kw"] = consts, kw

    def fake_load(path, **kw):
        calls["path"], calls["load"] = path, kw
        return Runner()

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    step = CompiledStep(tmp_path / "p.pt2", module, constants_signature(module, ["weight", "bias"]), torch.device("cpu"))
    assert calls["load"]["run_single_threaded"] is True and calls["path"] == str(tmp_path / "p.pt2")
    assert calls["constants"]["weight"].data_ptr() == module.weight.data_ptr() and calls["load_kw"]["user_managed"]
    assert isinstance(step.runner, Runner)
    # without a manifest's signature (benchmarks/aoti_accuracy.py --packages): the package's names, one load
    calls.clear()
    step = CompiledStep(tmp_path / "p.pt2", module, None, torch.device("cpu"))
    assert step.expected == constants_signature(module, ["weight", "bias"]) and set(calls["constants"]) == {"weight", "bias"}
    Runner.get_constant_fqns = lambda self: ["bias", "weight", "scale"]
    with pytest.raises(EngineError, match="needs tensors the model lacks: \\['scale'\\]"):
        CompiledStep(tmp_path / "p.pt2", module, None, torch.device("cpu"))


def test_no_decode_op_takes_a_dtype_argument():
    """Inside a package, custom ops run through AOTInductor's proxy executor, which in torch <= 2.11 reads a dtype
    argument with the wrong numbering (bfloat16 arrives as quint8: the H200's GPU packages failed so in session 18).
    The ops take dtype names instead; a float8 output is refused by name."""
    import kernels.ops as ops

    names = [n.removesuffix("_op") for n in ops.__all__ if n.endswith("_op")]
    assert {"skinny_linear", "skinny_swiglu", "moe_decode"} <= set(names)
    for name in names:
        for arg in getattr(torch.ops.mingrt, name).default._schema.arguments:
            # real_type: a dtype argument's `type` prints as int (its serialised form), its real type as ScalarType
            assert "ScalarType" not in str(arg.real_type), f"mingrt::{name}({arg.name}: {arg.real_type})"
    assert ops.dtype_name(torch.bfloat16) == "bfloat16" and ops.OUT_DTYPES["float16"] is torch.float16
    with pytest.raises(ValueError, match="not torch.float8_e4m3fn"):
        ops.dtype_name(torch.float8_e4m3fn)
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        ops.skinny_linear_op(x, w, None, None, "int8")


def test_the_fp8_fingerprint_follows_the_shared_expert_setting(monkeypatch):
    """MINGRT_MOE_SHARED changes the FP8 LLM step's graph: an FP8 package built under one setting is out of
    date under the other (rebuilt, not refused at load); bf16 packages do not depend on it."""
    from export.compiled_steps import fingerprint
    from runtime.fast.decode_weights import SHARED_IN_MOE_ENV

    def fp(precision, setting):
        monkeypatch.setenv(SHARED_IN_MOE_ENV, setting)
        return fingerprint(precision, "weights", "source", torch.device("cpu"), 64)

    assert fp("fp8", "1") != fp("fp8", "0") and fp("fp8", "1") == fp("fp8", "1")
    assert fp("bf16", "1") == fp("bf16", "0")


def test_the_fp8_fingerprint_follows_the_attention_rows_setting(monkeypatch):
    """decode_weights.ATTENTION_FP8_ROWS changes the FP8 steps only (which attention kernel feeds an FP8 output
    projection); bf16 packages do not depend on it."""
    import runtime.fast.decode_weights as dw
    from export.compiled_steps import fingerprint

    fp = {}
    for on in (True, False):
        monkeypatch.setattr(dw, "ATTENTION_FP8_ROWS", on)
        fp[on] = {p: fingerprint(p, "weights", "source", torch.device("cpu"), 64) for p in ("fp8", "bf16")}
    assert fp[True]["fp8"] != fp[False]["fp8"] and fp[True]["bf16"] == fp[False]["bf16"]


@pytest.mark.parametrize("setting", ["ROUTER_ON_KERNEL", "ROUTE_ON_KERNEL", "KV_WRITE_ON_KERNEL"])
def test_the_fingerprint_follows_the_router_settings(monkeypatch, setting):
    """decode_weights.ROUTER_ON_KERNEL (the router GEMMs on the skinny kernel or on F.linear), ROUTE_ON_KERNEL
    (the softmax-top-k in one kernel or in Inductor's) and KV_WRITE_ON_KERNEL (the cache writes and RoPE likewise)
    change both formats' steps: a package built with one setting is out of date with the other."""
    import runtime.fast.decode_weights as dw
    from export.compiled_steps import fingerprint

    for precision in ("bf16", "fp8"):
        on = fingerprint(precision, "weights", "source", torch.device("cpu"), 64)
        monkeypatch.setattr(dw, setting, False)
        off = fingerprint(precision, "weights", "source", torch.device("cpu"), 64)
        monkeypatch.setattr(dw, setting, True)
        assert on != off and on == fingerprint(precision, "weights", "source", torch.device("cpu"), 64)


def test_nudged_moves_some_elements_by_one_ulp():
    """The verification's rounding-level noise: deterministic per seed, a Gaussian of about half an ulp, so a part of
    the elements moves to a neighbouring value (two ulps in the tail) and the rest stay."""
    from export.compiled_steps import nudged

    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = nudged(x, seed=1)
    assert torch.equal(y, nudged(x, seed=1)) and not torch.equal(y, nudged(x, seed=2))
    moved = y != x
    assert 0.05 < moved.float().mean().item() < 0.5
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(x.float().abs())))  # one ulp at x
    steps = (y.float() - x.float()).abs() / ulp
    assert steps.max().item() <= 2 and steps[moved].mean().item() < 1.1
    x32 = x.float()
    assert 0 < (nudged(x32, seed=1) != x32).float().mean().item() < 0.5  # fp32: its own (smaller) ulp


def test_verification_allows_the_steps_own_rounding_floor(monkeypatch):
    """A package output passes within the precision's bound, or within twice what the eager module moves when its
    input is nudged (a deep random-weight MoE step reroutes rows under half an ulp: session 19's full-size FP8
    package and torch.compile both differed from eager by 0.11-0.22 rel L2, as the nudged eager run did). What the
    first layer writes into its caches is held to the bound alone; anything not finite fails."""
    import export.compiled_steps as ecs
    from models.config import tiny_config
    from models.univision import build
    from runtime.fast.compiled_steps import num_caches, step_modules
    from runtime.fast.graph import GraphImageGenerator

    assert ecs.FLOOR_FACTOR == 2.0 and ecs.allowed_rel_l2(6e-2, 0.01) == 6e-2
    assert ecs.allowed_rel_l2(6e-2, 0.11) == pytest.approx(0.22) and ecs.allowed_rel_l2(6e-2, float("nan")) < 0
    model = build(tiny_config(), seed=0).eval()
    gen = GraphImageGenerator(model, use_graph=False, kernels=False, weights="bf16", compile=False)
    mods = step_modules(gen)

    def verify(llm_step):
        return ecs.verify_steps(gen, {"llm_step": llm_step, "semantic_step": mods["semantic_step"]}, torch.float32)

    def scaled(factor):
        return lambda *args: mods["llm_step"](*args) * factor

    good = verify(mods["llm_step"])
    assert good["passed"] and good["bound_rel_l2"] == 1e-4 and good["nudges"] == 2
    for name, res in good["steps"].items():
        assert res["passed"] and res["worst"]["rel_l2"] == 0 and len(res["calls"]) == 2, name
        for call in res["calls"]:
            assert 0 < call["floor_rel_l2"]["out0"] < 1e-5 and call["allowed"]["out0"] == 1e-4, name  # fp32: the bound
            assert call["floor_rel_l2"]["first_layer_writes"] == 0 and call["allowed"]["first_layer_writes"] == 1e-4
    bad = verify(scaled(1.0003))  # 3e-4 off: above the bound, far above the floor
    assert not bad["passed"] and not bad["steps"]["llm_step"]["passed"] and bad["steps"]["semantic_step"]["passed"]
    assert bad["steps"]["llm_step"]["tightest"] == {"output": "out0", "rel_l2": pytest.approx(3e-4, rel=1e-2),
                                                    "allowed": 1e-4}

    # a step that amplifies its input's rounding far beyond the bound, as the full-size LLM step does: here by
    # nudging 1% instead of half an ulp, so that the floor decides
    def coarse(t, seed):
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (t.double() * (1 + 1e-2 * noise)).to(t.dtype)

    monkeypatch.setattr(ecs, "nudged", coarse)
    floors = [c["floor_rel_l2"]["out0"] for c in verify(mods["llm_step"])["steps"]["llm_step"]["calls"]]
    assert min(floors) > 1e-3  # ten times the fp32 bound
    for i, ((r, b, s), floor) in enumerate(zip([(2, 1, 96), (2, 3, 160)], floors)):  # the mean of two nudges
        inputs = ecs._fresh_inputs(gen, "llm_step", r, b, s, seed=100 + i)
        with torch.no_grad():
            ref = mods["llm_step"](*(t.clone() for t in inputs))
            moved = [mods["llm_step"](coarse(inputs[0], 200 + 10 * i + j), *(t.clone() for t in inputs[1:]))
                     for j in range(2)]
        assert moved[0].shape == ref.shape and not torch.equal(moved[0], moved[1])
        assert floor == pytest.approx(sum((m - ref).norm().item() for m in moved) / 2 / ref.norm().item(), rel=1e-6)
    assert verify(scaled(1 + 1.5 * min(floors)))["steps"]["llm_step"]["passed"]
    assert not verify(scaled(1 + 3 * max(floors)))["steps"]["llm_step"]["passed"]

    first = len(ecs._fresh_inputs(gen, "llm_step", 2, 1, 96, seed=0)) - num_caches(gen, "llm_step")

    def wrong_first_layer(which):  # the outputs right, what the first layer wrote into its key or value 0.1% off
        def step(*args):
            before = args[first + which].clone()
            out = mods["llm_step"](*args)
            written = args[first + which] != before
            args[first + which][written] *= 1.001
            return out
        return step

    for which in (0, 1):  # its key, its value
        rep = verify(wrong_first_layer(which))["steps"]["llm_step"]
        assert not rep["passed"] and rep["tightest"]["output"] == "first_layer_writes", which
        assert rep["tightest"]["rel_l2"] == pytest.approx(1e-3 / 2 ** 0.5, rel=0.05)  # one of the two written halves
        assert max(c["allowed"]["caches"] for c in rep["calls"]) > 1e-4  # the loose floor alone would let it by

    assert not verify(scaled(float("nan")))["passed"]  # a package that returns NaN
    assert not verify(scaled(float("inf")))["passed"]
    monkeypatch.setattr(ecs, "nudged", lambda t, seed: torch.full_like(t, float("nan")))
    rep = verify(mods["llm_step"])["steps"]["llm_step"]  # eager itself, but its floor is not finite: nothing allowed
    assert not rep["passed"] and all(c["allowed"]["out0"] < 0 for c in rep["calls"])
    assert rep["tightest"]["allowed"] < 0  # the summary shows the output that allowed nothing

    monkeypatch.setattr(ecs, "nudged", coarse)
    import runtime.fast.compiled_steps as cs

    class NaNEager(torch.nn.Module):  # an eager reference that returns NaN: nothing can be judged against it
        def forward(self, *args):
            return mods["llm_step"](*args) * float("nan")

    monkeypatch.setattr(cs, "step_modules", lambda g: {**mods, "llm_step": NaNEager()})
    rep = verify(mods["llm_step"])["steps"]["llm_step"]
    assert not rep["passed"] and math.isinf(rep["calls"][0]["rel_l2"]["out0"])


def test_packages_compile_with_the_run_time_inductor_options(monkeypatch, tmp_path):
    """The packages' Inductor options are the run-time compile's (its kernels' PDL waits included), recorded per
    package, and the fingerprint follows the Inductor-PDL switch: a torch whose AOTInductor launcher forwards each
    kernel's launch_pdl launches the packaged kernels as the run-time path does (benchmarks/aoti_pdl_check.py)."""
    import export.compiled_steps as ecs
    import runtime.fast.compiled_steps as cs
    from models.config import tiny_config
    from models.univision import build
    from runtime.fast.graph import INDUCTOR_PDL_ENV, GraphImageGenerator

    gen = GraphImageGenerator(build(tiny_config(), seed=0).eval(), use_graph=False, kernels=False, compile=False)
    monkeypatch.setattr(gen, "_inductor_options", lambda: {"triton.enable_pdl": True})
    seen = []

    def fake_compile(ep, package_path, inductor_configs):  # no compiler run: record what the build asked for
        seen.append(dict(inductor_configs))
        inductor_configs["aot_inductor.package"] = True  # as Inductor does: the recorded options stay the asked ones
        Path(package_path).write_bytes(b"not a package")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    monkeypatch.setattr(cs, "probe_load", lambda path, device: "not loaded in this test")
    entries, steps = ecs.compile_steps(gen, tmp_path, max_sequence=512)
    want = {"aot_inductor.package_constants_in_so": False, "triton.enable_pdl": True}
    assert seen == [want, want] and steps == {}
    assert all(e["inductor_configs"] == want and e["load_error"] for e in entries.values())

    import kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # a GPU's fingerprint

    def fp(setting, pdl):
        monkeypatch.setenv(INDUCTOR_PDL_ENV, setting)
        monkeypatch.setattr(kernels, "pdl_enabled", lambda device=None: pdl)
        return ecs.fingerprint("fp8", "weights", "source", torch.device("cuda"), 64)

    assert fp("0", True) != fp("1", True) == fp("1", True)  # the switch, where the decode kernels use PDL
    assert fp("0", False) == fp("1", False) == fp("0", True)  # no PDL for the decode kernels (MINGRT_PDL=0, no GPU)
