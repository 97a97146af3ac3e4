"""Where an AOTInductor package of a fast-path step departs from the eager module, op by op.

The build's verification compares each package's outputs with the eager module's on random inputs. When
that fails, this says whether the package computes something else or the step merely amplifies rounding:
every call of our decode ops (kernels/ops.py) is recorded (first input, outputs, scalar arguments, strides)
in each of these runs of the same inputs:

- eager, twice (must repeat bit for bit);
- eager on its input nudged by about half an ulp (export.compiled_steps.nudged: the step's own sensitivity to
  rounding, as the build's verification measures it);
- the package; and torch.compile of the module (the run-time path the packages replace), unless --no-jit.

Each run's calls are matched with the eager run's by op and occurrence (and the package's with torch.compile's).
Per call: rel L2 of its first input and of its outputs (the router's weights in expert order), and for the
router how many rows chose other experts. Scalar arguments that differ are listed (a package's proxy executor
misreading an argument shows there), and layout differences (dtype, shape, stride) are counted per op argument.

    python benchmarks/aoti_accuracy.py --out DIR [--model full] [--weights fp8] [--packages DIR]

Without --packages the packages are built first (export.compiled_steps.compile_steps, minutes at full size);
with it, the folder's compiled_*.pt2 are loaded onto this process's model (same seed, so the same weights).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# kernels.ops's globals each custom op's body calls: patched to record, so eager, torch.compile and a
# package (its proxy executor calls the same Python bodies) are all seen
RECORDED = ("moe_decode", "skinny_gemm", "decode_attention", "route_topk", "rope_kv_write")


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


@contextlib.contextmanager
def recording(calls: list):
    """Every call of the RECORDED kernel entry points appends (name, first tensor input, outputs, scalars, layout)."""
    import kernels.ops as ops

    saved = {n: getattr(ops, n) for n in RECORDED}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            tensors = [a for a in args if torch.is_tensor(a)]
            scalars = [repr(a) for a in args if not torch.is_tensor(a) and a is not None]
            scalars += [f"{k}={v!r}" for k, v in sorted(kwargs.items()) if not torch.is_tensor(v) and v is not None]
            layout = [[str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride())] for t in tensors]
            calls.append({"op": name, "x": tensors[0].detach().float().clone(),
                          "out": [o.detach().float().clone() for o in _as_tuple(out) if torch.is_tensor(o)],
                          "scalars": scalars, "layout": layout})
            return out
        return recorded

    for n, fn in saved.items():
        setattr(ops, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(ops, n, fn)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """export.verify.metrics' rel L2 of `a` against `b`; NaN where the two differ in size (a mismatch to flag)."""
    from export.verify import metrics

    return metrics(a, b)["rel_l2"] if a.numel() == b.numel() else math.nan


def compare_calls(got: list, ref: list) -> dict:
    """Each call of `got` against `ref`'s call of the same op and occurrence."""
    by_op = defaultdict(list)
    for c in ref:
        by_op[c["op"]].append(c)
    seen: dict = defaultdict(int)
    rows, first_bad, scalar_diffs, route_flips = [], None, [], []
    layout_counts: dict = defaultdict(int)  # "op: what differs" -> calls
    layout_examples: dict = {}
    for i, c in enumerate(got):
        k = seen[c["op"]]
        seen[c["op"]] += 1
        if k >= len(by_op[c["op"]]):
            rows.append({"i": i, "op": c["op"], "unmatched": True})
            continue
        r = by_op[c["op"]][k]
        outs, ref_outs = c["out"], r["out"]
        if c["op"] == "route_topk":  # (ids, weights): the weights in expert-id order, and rows whose expert set moved
            ids, order = outs[0].sort(dim=-1)
            ref_ids, ref_order = ref_outs[0].sort(dim=-1)
            outs, ref_outs = [outs[1].gather(-1, order)], [ref_outs[1].gather(-1, ref_order)]
            moved = int((ids != ref_ids).any(dim=-1).sum().item()) if ids.shape == ref_ids.shape else -1
            route_flips.append(moved)
        row = {"i": i, "op": c["op"], "n": k, "x": rel_l2(c["x"], r["x"]),
               "out": max((rel_l2(o, q) for o, q in zip(outs, ref_outs)), default=0.0)}
        if c["op"] == "route_topk":
            row["rows_rerouted"] = route_flips[-1]
        if len(outs) != len(ref_outs):
            row["out"] = float("nan")
        if c["scalars"] != r["scalars"]:
            scalar_diffs.append({"i": i, "op": c["op"], "got": c["scalars"], "eager": r["scalars"]})
        for j, (a, b) in enumerate(zip(c["layout"], r["layout"])):
            for what, pos in (("dtype", 0), ("shape", 1), ("stride", 2)):
                if a[pos] != b[pos]:
                    tag = f"{c['op']} arg {j} {what}"
                    layout_counts[tag] += 1
                    layout_examples.setdefault(tag, {"got": a, "eager": b})
        if first_bad is None and not (row["x"] <= 1e-2 and row["out"] <= 1e-2):  # NaN (a mismatch) counts
            first_bad = row
        rows.append(row)
    for op, ref_calls in by_op.items():  # calls the reference made and `got` did not
        rows.extend({"op": op, "n": k, "unmatched": True, "missing": True} for k in range(seen[op], len(ref_calls)))
    return {"calls": len(got), "eager_calls": len(ref), "first_over_1e-2": first_bad,
            "route_rows_rerouted": route_flips, "scalar_diffs": scalar_diffs[:10],
            "layout_diffs": dict(layout_counts), "layout_examples": layout_examples,
            "layout_diff_count": sum(layout_counts.values()), "per_call": rows}


def run_step(fn, inputs: tuple, n_caches: int) -> tuple[list, list, list]:
    """(outputs, caches after the call, recorded op calls) of one call on clones of `inputs`."""
    args = tuple(t.clone() for t in inputs)
    calls: list = []
    with torch.no_grad(), recording(calls):
        out = fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    return [o.float() for o in _as_tuple(out)], [t.float() for t in args[len(args) - n_caches:]], calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser("benchmarks/aoti_accuracy.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny", "full"], default="full")
    p.add_argument("--weights", choices=["bf16", "fp8"], default="fp8")
    p.add_argument("--packages", type=Path, help="a folder with compiled_*.pt2 built for this model (else: build them)")
    p.add_argument("--no-jit", action="store_true", help="skip the torch.compile run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    from benchmarks.speed import environment
    from export.compiled_steps import _fresh_inputs, compile_steps, nudged
    from models import build, get_config
    from runtime.fast import compiled_steps as cs
    from runtime.fast.graph import GraphImageGenerator

    dev = torch.device(a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"aoti_accuracy_{a.model}_{a.weights}.json"
    res: dict = {"environment": environment(dev), "command": " ".join(sys.argv), "nudge": "export.compiled_steps.nudged",
                 "steps": {}}
    model = build(get_config(a.model), seed=0, device=dev, dtype=torch.bfloat16).eval()
    gen = GraphImageGenerator(model, use_graph=False, kernels=True, weights=a.weights, compile=False)
    modules = cs.step_modules(gen)
    t = time.perf_counter()
    if a.packages:
        steps = {}
        for name, file in cs.STEP_FILES.items():  # the package's own tensor names (same seed: the same weights)
            steps[name] = cs.CompiledStep(a.packages / file, modules[name], None, dev)
        res["packages"] = str(a.packages)
    else:
        (a.out / "packages").mkdir(exist_ok=True)
        _, steps = compile_steps(gen, a.out / "packages", max_sequence=4096)
    res["packages_s"] = time.perf_counter() - t
    jit = {}
    if not a.no_jit:
        opts = gen._inductor_options()
        jit = {n: torch.compile(m, dynamic=False, options=opts) for n, m in modules.items()}

    for name, module in modules.items():
        n_caches = cs.num_caches(gen, name)
        for case, (r, b, s) in enumerate([(2, 1, 96), (2, 3, 160)]):
            inputs = _fresh_inputs(gen, name, r, b, s, seed=100 + case)
            nudged_in = (nudged(inputs[0], seed=200 + 10 * case), *inputs[1:])  # the build's first nudge of this call
            runs = {"eager": (module, inputs), "eager_again": (module, inputs), "eager_nudged": (module, nudged_in),
                    "package": (steps[name], inputs)}
            if name in jit:
                runs["jit"] = (jit[name], inputs)
            got = {}
            for kind, (fn, args) in runs.items():
                t = time.perf_counter()
                got[kind] = run_step(fn, args, n_caches)
                print(f"{name} case {case} {kind}: {len(got[kind][2])} op calls, {time.perf_counter() - t:.1f}s",
                      flush=True)
            ref_out, ref_caches, ref_calls = got["eager"]
            case_res = {"rows_per_prompt": r, "prompts": b, "s_max": s,
                        "nudged_input_rel_l2": rel_l2(nudged_in[0], inputs[0])}
            for kind, (outs, caches, calls) in got.items():
                if kind == "eager":
                    continue
                cmp = compare_calls(calls, ref_calls)
                case_res[kind] = {"outputs_rel_l2": [rel_l2(o, q) for o, q in zip(outs, ref_out)],
                                  "caches_rel_l2": rel_l2(torch.cat([c.flatten() for c in caches]),
                                                          torch.cat([c.flatten() for c in ref_caches])),
                                  **cmp}
                fb = cmp["first_over_1e-2"]
                print(f"  {kind:12s} outputs {['%.3g' % v for v in case_res[kind]['outputs_rel_l2']]}, "
                      f"caches {case_res[kind]['caches_rel_l2']:.3g}, calls {cmp['calls']}/{cmp['eager_calls']}, "
                      f"rerouted rows {sum(x for x in cmp['route_rows_rerouted'] if x > 0)}, first call over 1e-2: "
                      f"{None if fb is None else (fb['i'], fb['op'], round(fb['x'], 4), round(fb['out'], 4))}, "
                      f"scalar diffs {len(cmp['scalar_diffs'])}, layout diffs {cmp['layout_diffs']}", flush=True)
            if "jit" in got:  # the package against the run-time compile of the same module, call for call
                cmp = compare_calls(got["package"][2], got["jit"][2])

                def distance(c):  # a NaN (a shape or output-count mismatch) or an unmatched call: infinitely far
                    vals = [math.inf] if c.get("unmatched") else [c["x"], c["out"]]
                    return max(math.inf if math.isnan(v) else v for v in vals)

                worst_call = max((distance(c) for c in cmp["per_call"]), default=0.0)
                case_res["package_vs_jit"] = {
                    "outputs_rel_l2": [rel_l2(o, q) for o, q in zip(got["package"][0], got["jit"][0])],
                    "worst_call_rel_l2": worst_call, "first_over_1e-2": cmp["first_over_1e-2"],
                    "unmatched_calls": sum(1 for c in cmp["per_call"] if c.get("unmatched")),
                    "calls": cmp["calls"], "jit_calls": cmp["eager_calls"],
                    "scalar_diffs": cmp["scalar_diffs"], "layout_diffs": cmp["layout_diffs"]}
                print(f"  package vs jit: outputs {case_res['package_vs_jit']['outputs_rel_l2']}, worst call "
                      f"{worst_call:.3g}, calls {cmp['calls']}/{cmp['eager_calls']}, layout diffs "
                      f"{cmp['layout_diffs']}", flush=True)
            res["steps"].setdefault(name, []).append(case_res)
            path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
