"""`--targets aoti`: AOTInductor packages of the GPU fast path's compiled steps (see
runtime/fast/compiled_steps.py for what they hold and how the runtime loads them).

Built once here instead of torch.compile'd at every start of a service: the LLM step over the CFG rows
and the semantic-decoder step, exported with dynamic rows and cache length, compiled for this
machine's torch and GPU, verified against the eager modules on fresh inputs, and recorded in the
manifest with the same rules as the other engines (files, sha256, versions, a fingerprint that
skips an unchanged rebuild).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch

from . import manifest as mf
from .aoti_toolchain import dynamic_libstdcxx
from .verify import REL_L2_BOUND, metrics, worst

logger = logging.getLogger("export.build")

AOTI_PRECISIONS = ("fp32", "bf16", "fp8")
VERIFY_CALLS = 2
FLOOR_FACTOR = 2.0  # allowed_rel_l2
NUDGES = 2  # nudged inputs a call's rounding floor averages over


def plan(precision: str, device: str) -> dict:
    """(model dtype, decode weights, kernels) of the packages a build makes: the runtime's fast-path
    layout for these engines (runtime.engines.fast_path_layout); raises ValueError if none."""
    from kernels import available
    from runtime.engines import fast_path_layout

    if precision not in AOTI_PRECISIONS:
        raise ValueError(f"--targets aoti compiles the fp32, bf16 or fp8 fast path, not {precision}")
    dtype, weights = fast_path_layout(precision, device)
    kernels = device == "cuda" and available()
    if precision == "fp8" and not kernels:
        raise ValueError("--targets aoti at fp8 streams FP8 weights through the Triton kernels: it needs "
                         "--device cuda and triton (pip install 'mingrt[kernels]')")
    return {"dtype": dtype, "weights": weights, "kernels": kernels}


def fingerprint(precision: str, model_hash: str, src_hash: str, device: torch.device, max_sequence: int) -> str:
    from kernels import pdl_enabled
    from runtime.fast import decode_weights
    from runtime.fast.compiled_steps import SCHEMA, device_key
    from runtime.fast.graph import inductor_options

    settings = decode_weights.decode_settings("fp8" if precision == "fp8" else "bf16")  # switches the graphs follow
    return mf.sha256_json({"aoti": SCHEMA, "precision": precision, "weights": model_hash, "source": src_hash,
                           "torch": torch.__version__, **device_key(device), "max_sequence": max_sequence, **settings,
                           # the packages' Inductor options (compile_steps), as a generator here would set them
                           "inductor": inductor_options(device.type == "cuda" and pdl_enabled(device))})


def up_to_date(folder: Path, old: dict | None, fp: str) -> bool:
    entry = (old or {}).get("compiled")
    if not entry or entry.get("fingerprint") != fp or not entry.get("verification", {}).get("passed"):
        return False
    digests = {s["file"]: s["sha256"] for s in entry["steps"].values()}
    return mf.files_intact(folder, {"targets": {"aoti": {"sha256": digests}}})


def _fresh_inputs(gen, name: str, rows_per_prompt: int, prompts: int, s_max: int, seed: int) -> tuple:
    """Random inputs of another size than the export sample: states a real loop could be in."""
    from runtime.fast import compiled_steps as cs

    g = torch.Generator().manual_seed(seed)
    args = list(cs.sample_inputs(gen, rows_per_prompt, prompts, s_max)[name])
    first_cache = len(args) - cs.num_caches(gen, name)
    args = [(torch.randn(t.shape, generator=g)).to(t.device, t.dtype) if i == 0 or i >= first_cache else t
            for i, t in enumerate(args)]  # random input and caches
    if name == "llm_step":
        filled = s_max // 2  # slots [0, filled] hold a prompt, the current token writes slot `filled`
        args[1][:, :filled + 1] = 1
        args[2].fill_(filled)
        args[4].fill_(filled)
    else:
        args[1].fill_(3)
    return tuple(args)


def nudged(t: torch.Tensor, seed: int) -> torch.Tensor:
    """`t` moved by rounding-level noise: relative Gaussian noise of a quarter of its dtype's epsilon (about half an
    ulp), so that some elements move by one ulp and the rest stay."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)
    return (t.double() * (1 + torch.finfo(t.dtype).eps / 4 * noise)).to(t.dtype)


def allowed_rel_l2(bound: float, floor_rel_l2: float) -> float:
    """What a package output may differ from eager's by: the precision's bound, or FLOOR_FACTOR times what the
    eager module itself moves when its input moves by rounding-level noise (`nudged`), whichever is larger. A
    deep random-weight MoE step at full size amplifies rounding: half an ulp on the input reroutes some rows and
    moved the LLM step's output by 0.13-0.29 rel L2 on the H200, as Inductor's fused rounding does
    (benchmarks/results/h200_session19.md). A floor that is not finite allows nothing (the step fails)."""
    if not math.isfinite(floor_rel_l2):
        return -math.inf
    return max(bound, FLOOR_FACTOR * floor_rel_l2)


def _named_outputs(out, args: tuple, first_cache: int) -> dict[str, torch.Tensor]:
    """One call's outputs by name: out0, out1, ..., "caches" (every cache after the call, flattened) and
    "first_layer" (the first layer's key and value caches, flattened; caches are (k0, v0, k1, v1, ...))."""
    out = (out,) if torch.is_tensor(out) else out
    return {**{f"out{j}": o for j, o in enumerate(out)},
            "caches": torch.cat([t.flatten() for t in args[first_cache:]]),
            "first_layer_writes": torch.cat([t.flatten() for t in args[first_cache:first_cache + 2]])}


def verify_steps(gen, steps: dict, dtype: torch.dtype) -> dict:
    """Each package against the eager module on fresh inputs, two calls of other sizes than the export's.

    Outputs and caches (they are outputs too) pass within allowed_rel_l2: the precision's bound, or twice the
    step's rounding floor (the mean over NUDGES of what eager moves when its input is nudged by half an ulp),
    judged per call. The values the first layer wrote into its caches (where the package's or eager's cache
    changed), computed before any layer could amplify a rounding, must be within the bound alone. A non-finite
    eager, nudged or package output fails (metrics() gives it an infinite rel L2)."""
    from runtime.fast.compiled_steps import num_caches, step_modules

    modules = step_modules(gen)
    key = "fp32" if dtype == torch.float32 else "bf16"  # both sides stream the same (bf16 or FP8) weights
    bound = REL_L2_BOUND[key]
    per_step = {}
    for name, step in steps.items():
        res: dict = {}
        calls = []
        for i, (r, b, s) in enumerate([(2, 1, 96), (2, 3, 160)][:VERIFY_CALLS]):
            ref_in = _fresh_inputs(gen, name, r, b, s, seed=100 + i)
            first_cache = len(ref_in) - num_caches(gen, name)
            prior = torch.cat([t.flatten() for t in ref_in[first_cache:first_cache + 2]])  # before any call writes
            runs = {"got": (step, tuple(t.clone() for t in ref_in))}
            for j in range(NUDGES):
                runs[j] = (modules[name], (nudged(ref_in[0], seed=200 + 10 * i + j), *(t.clone() for t in ref_in[1:])))
            runs["ref"] = (modules[name], ref_in)  # last: it writes into ref_in's caches
            with torch.no_grad():
                sides = {side: _named_outputs(fn(*args), args, first_cache) for side, (fn, args) in runs.items()}
            got, ref = sides["got"], sides["ref"]
            written = (got["first_layer_writes"] != prior) | (ref["first_layer_writes"] != prior)  # same slots if right
            for side in (got, ref):
                side["first_layer_writes"] = side["first_layer_writes"][written]
            call = {"rows_per_prompt": r, "prompts": b, "s_max": s, "rel_l2": {}, "floor_rel_l2": {}, "allowed": {}}
            for k, q in ref.items():
                m = metrics(got[k].float(), q.float())
                floor = 0.0 if k == "first_layer_writes" else (  # before any amplification: the bound alone
                    sum(metrics(sides[j][k].float(), q.float())["rel_l2"] for j in range(NUDGES)) / NUDGES)
                call["rel_l2"][k], call["floor_rel_l2"][k] = m["rel_l2"], floor
                call["allowed"][k] = allowed_rel_l2(bound, floor)
                res[k] = m if k not in res else worst({"a": res[k], "b": m})
            calls.append(call)
        # the (call, output) nearest its allowance: what decides, and what the build's summary shows
        ratio, out_key, call = max(((c["rel_l2"][k] / c["allowed"][k] if c["allowed"][k] > 0 else math.inf, k, c)
                                    for c in calls for k in c["rel_l2"]), key=lambda t: t[0])
        per_step[name] = {"outputs": res, "worst": worst(res), "calls": calls, "passed": ratio <= 1,
                          "tightest": {"output": out_key, "rel_l2": call["rel_l2"][out_key],
                                       "allowed": call["allowed"][out_key]}}
    return {"judge": "the eager modules, same weights; floor: the eager module on its input nudged by half an ulp",
            "steps": per_step, "bound_rel_l2": bound, "floor_factor": FLOOR_FACTOR, "nudges": NUDGES,
            "passed": all(st["passed"] for st in per_step.values())}


def compile_steps(gen, out: Path, max_sequence: int) -> tuple[dict, dict]:
    """Export and AOT-compile the generator's two steps into `out`: (manifest entries, loaded steps)."""
    from torch.nn.attention import sdpa_kernel

    from models.sdpa import REPEATABLE_BACKENDS
    from runtime.fast import compiled_steps as cs

    samples, shapes = cs.sample_inputs(gen), cs.dynamic_shapes(gen, max_sequence)
    # Inductor's own options as the run-time compile's (its kernels' PDL waits): torch 2.11's AOTInductor launcher
    # launches them without the PDL attribute, where the waits cost nothing (benchmarks/aoti_pdl_check.py); a torch
    # whose launcher forwards each kernel's launch_pdl (pytorch/pytorch#194079) launches them as the run-time path does
    configs = {"aot_inductor.package_constants_in_so": False, **(gen._inductor_options() or {})}
    entries, steps = {}, {}
    for name, module in cs.step_modules(gen).items():
        t = time.time()
        path = Path(out) / cs.STEP_FILES[name]
        logger.info("aoti: exporting %s", name)
        # models.sdpa keeps the cuDNN attention backend out at run time, but an exported program records
        # only aten.scaled_dot_product_attention: the backend is chosen again when AOTInductor lowers it,
        # so export and compile under the same restriction
        with torch.no_grad(), sdpa_kernel(REPEATABLE_BACKENDS):
            ep = torch.export.export(module, samples[name], dynamic_shapes=shapes[name])
        sig = ep.graph_signature  # the tensors the program reads from the module (what a package will ask for)
        ep_constants = [*sig.inputs_to_parameters.values(), *sig.inputs_to_buffers.values()]
        logger.info("aoti: compiling %s with AOTInductor (minutes for the full model)", name)
        path.unlink(missing_ok=True)
        with sdpa_kernel(REPEATABLE_BACKENDS), dynamic_libstdcxx():  # a static libstdc++ copy crashes the loader
            # a copy: Inductor adds its own keys to the dict it is given
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=dict(configs))
        del ep
        entries[name] = {"file": path.name, "sha256": mf.sha256_file(path), "bytes": path.stat().st_size,
                         "seconds": round(time.time() - t, 1), "inductor_configs": configs,
                         "constants": cs.constants_signature(module, ep_constants)}
        why = cs.probe_load(path, gen.device)
        if why:  # the package is written, but this process must not load it (see probe_load)
            logger.warning("aoti: %s cannot be loaded on this machine: %s", name, why)
            entries[name]["load_error"] = why
            continue
        steps[name] = cs.CompiledStep(path, module, entries[name]["constants"], gen.device)  # loads it once
    return entries, steps


def build_compiled_steps(model, precision: str, out: Path, max_sequence: int, fp: str) -> dict:
    """Export, compile, verify; returns the manifest's "compiled" block. `model` is changed in place
    when it already has the packages' dtype (the decode kernels install themselves; the full model is
    not copied), so this runs after everything else that uses it."""
    from runtime.fast import compiled_steps as cs
    from runtime.fast.graph import GraphImageGenerator

    t0 = time.time()
    device = next(model.parameters()).device
    p = plan(precision, device.type)
    if next(model.parameters()).dtype != p["dtype"]:
        model = copy.deepcopy(model).to(p["dtype"])
    gen = GraphImageGenerator(model, use_graph=False, kernels=p["kernels"], weights=p["weights"], compile=False)
    entry = {"schema": cs.SCHEMA, "format": "aotinductor", "torch": torch.__version__, **cs.device_key(device),
             "dtype": str(p["dtype"]).removeprefix("torch."), "weights": p["weights"], "kernels": p["kernels"],
             "max_rows": cs.MAX_ROWS, "max_sequence": max_sequence, "fingerprint": fp}
    entry["steps"], steps = compile_steps(gen, out, max_sequence)
    errors = {s.get("load_error") for s in entry["steps"].values()} - {None}
    if errors:
        entry["verification"] = {"passed": None, "note": f"not loadable on this machine: {errors.pop()}"}
    else:
        entry["verification"] = verify_steps(gen, steps, p["dtype"])
    entry["seconds"] = round(time.time() - t0, 1)
    return entry


__all__ = ["AOTI_PRECISIONS", "FLOOR_FACTOR", "allowed_rel_l2", "build_compiled_steps", "compile_steps", "fingerprint",
           "nudged", "plan", "up_to_date", "verify_steps"]
