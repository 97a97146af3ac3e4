"""benchmarks/kernel_ir_check.py: how Triton compiles the decode kernels' main loops for Hopper.

    python benchmarks/kernel_ir_check.py                 # this GPU's target
    python benchmarks/kernel_ir_check.py --sm 90         # any machine: compile only, no GPU needed

For each kernel at its H100/H200 launch configs: whether the K loop is software-pipelined (asynchronous
global-to-shared copies, several shared buffers), which MMA it uses (wgmma or mma.sync), how many FP8
converts it issues, and its shared memory. A streaming kernel whose loop is not pipelined issues one
tile's loads, waits for them, multiplies, and only then loads the next: the loads in flight per SM are
then what the occupancy gives, which FP8 (half the bytes per tile) feels first.

The compile gets the alignment facts Triton's JIT specializes on at launch (`jit_attrs`); without them no
load can become a 16-byte cp.async and nothing is pipelined, not even a textbook matmul, which is what
the first version of this check reported (session 5 on the CPU, session 6 on the H200's triton 3.6).
With them, on the CPU (triton 3.9, sm 90): every decode kernel's K loop is pipelined
(benchmarks/results/kernel_ir_check_cpu_sm90.json). `cp_async_narrow` counts copies under 16 bytes:
FP8 weight tiles of 64 rows (which Triton feeds to wgmma) load in 8-byte copies, 32-row ones (mma.sync)
in 16-byte copies; the measured tables pick 32-row FP8 tiles everywhere, which may be why. `registers` and
`spill_bytes` come from running triton's bundled ptxas with -v on the PTX (None where no bundled ptxas
takes it). Writes OUT/kernel_ir_check.json when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cases():
    """(name, jit function, signature, constexprs, options) at the configs the released shapes use."""
    from kernels import attention, flow_chain, moe, skinny
    from models import full_config

    llm = full_config().llm
    top_k, experts = llm.num_experts_per_tok, llm.num_experts  # the released model's routing (6 of 64)

    sk = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", wscale_ptr="*fp32", bias_ptr="*fp32", y_ptr="*bf16", gate_ptr="*fp32",
              part_ptr="*fp32", ticket_ptr="*i32", M="i32", N="i32", K="i32", row_div="i32", stride_xm="i32",
              stride_ym="i32", stride_gate="i32")
    out = []
    for fmt, wty, bn, bk, stages in (("bf16", "*bf16", 64, 128, 4), ("fp8", "*fp8e4nv", 32, 256, 4)):
        for epi, split in ((skinny.STORE, 1), (skinny.SWIGLU, 1), (skinny.GATED_RESIDUAL, 4), (skinny.PARTIALS, 4)):
            c = dict(HAS_WSCALE=fmt == "fp8", HAS_BIAS=False, EPILOGUE=epi, SPLIT_K=split, BLOCK_M=16, BLOCK_N=bn,
                     BLOCK_K=bk, UPCAST=False, PDL=0, PF_TILES=0, W_BYTES=1 if fmt == "fp8" else 2, WIDEN=0)
            out.append((f"skinny {fmt} epilogue {epi} split {split}", skinny._skinny_kernel, dict(sk, w_ptr=wty), c,
                        dict(num_warps=4, num_stages=stages)))
    for fmt, wty, act, bn, bk in (("bf16", "*bf16", "*bf16", 32, 256), ("fp8", "*fp8e4nv", "*fp16", 32, 256),
                                  ("fp8 64-row tiles", "*fp8e4nv", "*fp16", 64, 128)):
        c = dict(TOPK=top_k, HAS_SCALE=fmt.startswith("fp8"), BLOCK_N=bn, BLOCK_K=bk, UPCAST=False, PDL=0, WIDEN=0)
        gu = dict(x_ptr="*bf16", ids_ptr="*i32", wg_ptr=wty, wu_ptr=wty, sg_ptr="*fp32", su_ptr="*fp32", act_ptr=act,
                  H="i32", I="i32", stride_x="i32")
        dn = dict(act_ptr=act, ids_ptr="*i32", topw_ptr="*fp32", wd_ptr=wty, sd_ptr="*fp32", y_ptr="*fp32",
                  part_ptr="*fp32", ticket_ptr="*i32", H="i32", I="i32", stride_y="i32")
        out.append((f"moe gate_up {fmt}", moe._gate_up_kernel, gu, c, dict(num_warps=4, num_stages=3)))
        for split in (1, top_k):
            out.append((f"moe down {fmt} expert split {split}", moe._down_kernel, dn, dict(c, SPLIT_E=split),
                        dict(num_warps=4, num_stages=3)))
    # the grouped MoE kernels at their default tiles: 2 rows (BLOCK_M 16, a program per slot), 16 rows, 64 rows
    # (BLOCK_M 64); their S (slots) is compiled as a multiple of 16 like every integer here: it only bounds
    # the ids load
    for fmt, wty, act in (("bf16", "*bf16", "*bf16"), ("fp8", "*fp8e4nv", "*fp16")):
        for rows in (2, 16, 64):
            c = dict(TOPK=top_k, HAS_SCALE=fmt == "fp8", BLOCK_S=max(16, 1 << (rows * top_k - 1).bit_length()),
                     BLOCK_M=max(16, 1 << (rows - 1).bit_length()), BLOCK_N=moe.GROUPED_DEFAULT["BLOCK_N"],
                     BLOCK_K=moe.GROUPED_DEFAULT["BLOCK_K"], BY_SLOT=rows * top_k < experts, UPCAST=False, PDL=0,
                     WIDEN=0)
            gu = dict(x_ptr="*bf16", ids_ptr="*i64", wg_ptr=wty, wu_ptr=wty, sg_ptr="*fp32", su_ptr="*fp32", act_ptr=act,
                      S="i32", H="i32", I="i32", stride_x="i32")
            dn = dict(act_ptr=act, ids_ptr="*i64", topw_ptr="*fp32", wd_ptr=wty, sd_ptr="*fp32", y_ptr="*fp32",
                      part_ptr="*fp32", ticket_ptr="*i32", S="i32", H="i32", I="i32", stride_y="i32")
            opts = dict(num_warps=4, num_stages=3)
            out.append((f"moe grouped gate_up {fmt} {rows} rows", moe._gate_up_grouped_kernel, gu, c, opts))
            out.append((f"moe grouped down {fmt} {rows} rows", moe._down_grouped_kernel, dn,
                        dict(c, BLOCK_N=moe.GROUPED_DEFAULT["DOWN_BLOCK_N"], BLOCK_K=moe.GROUPED_DEFAULT["DOWN_BLOCK_K"]), opts))
    att = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", mask_ptr="*u8", last_ptr="*i64", o_ptr="*bf16",
               part_ptr="*fp32", ticket_ptr="*i32", S="i32",
               scale="fp32", **{f"stride_{n}": "i32" for n in ("qb", "qh", "kb", "kh", "ks", "vb", "vh", "vs", "mb", "ob", "oh")})
    for splits in (1, 4):
        out.append((f"decode attention splits {splits}", attention._decode_attention_kernel, att,
                    dict(GROUP=4, BLOCK_G=16, BLOCK_S=64, D=128, SPLITS=splits, HAS_LAST=True, UPCAST=False, PDL=0),
                    dict(num_warps=4, num_stages=3)))
    # the flow head's LayerNorm + modulation (+ w3's merge) at the real width, as launched
    from kernels import layernorm

    ln = dict(x_ptr="*fp32", w_ptr="*fp32", b_ptr="*fp32", shift_ptr="*fp32", scale_ptr="*fp32", out_ptr="*fp16",
              part_ptr="*fp32", gate_ptr="*fp32", pscale_ptr="*fp32", pbias_ptr="*fp32", K="i32", stride_x="i32",
              stride_mod="i32", stride_out="i32", stride_gate="i32", eps="fp32")
    out.append(("layernorm merge 4 splits", layernorm._ln_modulate_kernel, ln,
                dict(AFFINE=True, BLOCK=4096, PDL=0, SPLITS=4, HAS_PSCALE=True, HAS_PBIAS=True),
                dict(num_warps=8, num_stages=1)))
    chain = dict(h_ptr="*fp32", xn_ptr="*fp16", act_ptr="*fp16", part_ptr="*fp32", mods_ptr="*fp32", lnw_ptr="*fp32",
                 lnb_ptr="*fp32", w12_ptr="*fp8e4nv", s12_ptr="*fp32", b12_ptr="*fp32", w3_ptr="*fp8e4nv", s3_ptr="*fp32",
                 b3_ptr="*fp32", bar_ptr="*i32", err_ptr="*i32", M="i32", W="i32", HID="i32", DEPTH="i32",
                 stride_mod_blk="i32", stride_mod_row="i32", eps="fp32")
    chain_consts = dict(HAS_SCALE=True, HAS_B12=True, HAS_B3=True, BLOCK_M=16, BLOCK_N12=32, BLOCK_N3=32, BLOCK_K=256,
                        SPLIT3=4, W_BLOCK=4096, PREFETCH=True, W_BYTES=1, UPCAST=False, SPIN_LIMIT=flow_chain.MAX_SPINS)
    out.append(("flow chain fp8 (experimental)", flow_chain._flow_chain_kernel, chain, chain_consts,
                dict(num_warps=8, num_stages=3)))
    # flow_chain_check --sweep's overrides: do they fit, and with how many registers
    from benchmarks.flow_chain_check import SWEEP

    for over in SWEEP:
        opts = {"num_warps": over.get("num_warps", 8), "num_stages": over.get("num_stages", 3),
                **({"maxnreg": over["maxnreg"]} if "maxnreg" in over else {})}
        consts = dict(chain_consts, **{k: v for k, v in over.items() if k not in opts and k != "programs_per_sm"})
        out.append((f"flow chain fp8 {over}", flow_chain._flow_chain_kernel, chain, consts, opts))
    return out


def code_lines(ptx: str) -> str:
    """The PTX's instructions and declarations: without the DWARF sections, .loc/.file lines, their labels
    and comments, which move with every source line."""
    keep = []
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith(".section"):
            break  # the debug sections come last
        if not text.startswith((".loc", ".file", "//", "$L__tmp")):  # $L__tmpN: labels for the debug info
            keep.append(line)
    return "\n".join(keep) + "\n"


def ptxas_usage(ptx: str, sm: int) -> dict:
    """Registers and spill bytes of `ptx` for `sm` from triton's bundled ptxas (the newest that takes it)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(bin_dir, exe)
            if not os.path.exists(path):
                continue
            gpu = f"sm_{sm}a" if sm >= 90 else f"sm_{sm}"  # the arch-specific target triton builds for
            r = subprocess.run([path, "-v", "--gpu-name", gpu, src, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
            text = r.stdout + r.stderr
            regs = re.search(r"Used (\d+) registers", text)
            spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            if r.returncode == 0 and regs:
                return {"registers": int(regs.group(1)),
                        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None}
    return {"registers": None, "spill_bytes": None}


def textbook_matmul():
    """A plain 64x16 bf16 tile loop: the control for 'does this triton pipeline anything here'."""
    import triton
    import triton.language as tl

    @triton.jit
    def mm(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            acc += tl.dot(tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :]),
                          tl.load(b_ptr + (k0 + rk)[:, None] * BN + rn[None, :]))
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

    sig = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32", K="i32", BM="constexpr", BN="constexpr", BK="constexpr")
    return ("textbook matmul (control)", mm, sig, dict(BM=64, BN=16, BK=128), dict(num_warps=4, num_stages=3))


def jit_attrs(fn, sig: dict, odd: tuple[str, ...]) -> dict:
    """The alignment facts Triton's JIT specializes on at launch: every pointer here is 16-byte aligned and
    every integer argument a multiple of 16 at the released shapes, except those named in `odd` (the row
    count). Without them no load can be a 16-byte cp.async and the pipeliner leaves the loop alone, which is
    why a bare ASTSource compile (what this check did first) reports nothing pipelined, even for a matmul."""
    names = list(fn.arg_names)
    return {(names.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
            if n not in odd and ty != "constexpr" and not ty.startswith("fp")}


def inspect(fn, sig, consts, opts, target, odd=("M", "row_div", "scale", "DEPTH", "eps")) -> dict:
    import triton
    from triton.compiler import ASTSource

    attrs = jit_attrs(fn, {n: t for n, t in sig.items() if n not in consts}, odd)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target, options=opts)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    return {"ptx": ptx,  # (main() keeps it out of the JSON; --ptx writes it)
            "pipelined": "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir or "cp.async" in ptx,
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            # copies narrower than 16 bytes (FP8 tiles of 64 rows get 8-byte ones: half-width loads)
            "cp_async_narrow": len(re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(?:0x)?[1-9]\b", ptx)),
            "tma": ptx.count("cp.async.bulk.tensor"),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"), "fp8_cvt": ptx.count("e4m3x2"),
            "shared_bytes": k.metadata.shared, "num_stages": opts.get("num_stages"), **ptxas_usage(ptx, target.arch)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sm", type=int, default=None, help="compile for this SM (default: this GPU's)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ptx", type=Path, default=None,
                   help="also write each kernel's PTX here, without debug lines: compile two trees and diff the folders "
                        "to see whether a source change moved any instruction")
    a = p.parse_args(argv)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    if a.sm is None:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU here: pass --sm 90 to compile for Hopper")
        major, minor = torch.cuda.get_device_capability()
        a.sm = major * 10 + minor
    target = GPUTarget("cuda", a.sm, 32)
    from benchmarks.speed import environment

    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"env": environment(here), "triton": triton.__version__, "sm": a.sm, "kernels": {}}
    for name, fn, sig, consts, opts in [textbook_matmul(), *cases()]:
        try:
            r = inspect(fn, sig, consts, opts, target)
            ptx = r.pop("ptx")
            if a.ptx is not None:
                a.ptx.mkdir(parents=True, exist_ok=True)
                (a.ptx / (re.sub(r"\W+", "_", name).strip("_") + ".ptx")).write_text(code_lines(ptx))
        except Exception as exc:  # report, don't hide
            r = {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"}
        res["kernels"][name] = r
        print(f"{name:38s} {r}", flush=True)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "kernel_ir_check.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
