"""Skinny GEMM for decode: y = x @ W^T with few rows (M <= 64), W in bf16 or FP8 E4M3.

In a decode step every weight is read once for a handful of rows (the CFG rows of one or a few
prompts), so the time is the time to stream W from HBM. cuBLAS reaches ~2.57 TB/s on an H100 with
bf16; padded `torch._scaled_mm` ~2.1. This kernel is built for that regime:

* swap-AB: the weight tile is the MMA's A operand (BLOCK_N x BLOCK_K, K contiguous) and the rows the
  B operand (BLOCK_K x BLOCK_M, BLOCK_M >= 16), so the tensor core's large dimension runs over W;
* FP8 weights are widened to fp16 in registers (exact, one instruction per pair) and multiplied by
  fp16 rows with fp32 accumulation; the per-output-channel scale is applied once in the epilogue
  (weight-only FP8: rows keep 11 significant bits). bf16 weights multiply bf16 rows;
* split-K when there are too few column blocks to fill the GPU, reduced deterministically: each
  split writes its partial, the last to arrive (an atomic ticket) sums them in split order, so the
  result does not depend on scheduling and a seed gives the same image bit for bit;
* fused epilogues for the flow head's residual block: SwiGLU (both halves of w12 in one program)
  and `h += gate * y` (in place, fp32 residual). The LayerNorm + adaLN modulation before w12 is a
  separate one-program-per-row kernel (kernels/layernorm.py): fused into this one, every program
  recomputed the row statistics before its first weight load, which cost ~30% at the real shapes;
* a PARTIALS epilogue that only stores each split's raw sums, (SPLIT_K, M, N) fp32, without the ticket:
  the flow head's next launch (kernels/layernorm.py, one program per row) sums them in split order and
  applies the scale, bias and gated residual there, so the GEMM ends when its last program's main loop
  does, not after a fence, an atomic and a dependent read of the partials.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ._triton import fp8_widen, interpreting, next_pow2, pdl_launch, pdl_prefetch_tiles, require, tl, triton

if triton is not None:
    from ._triton import arrive, mma, pdl_enter, pdl_main_loop_done, prefetch_l2, rearm, store_cast, unwiden

# epilogues
STORE, SWIGLU, GATED_RESIDUAL, PARTIALS = 0, 1, 2, 3
MAX_SPLIT_K = 8  # the most splits of K a config may take: the workspaces and partial buffers hold this many
MAX_ROWS = 64

if triton is not None:

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, wscale_ptr, bias_ptr, y_ptr,
        gate_ptr, part_ptr, ticket_ptr,
        M, N, K, row_div, stride_xm, stride_ym, stride_gate,
        HAS_WSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr, PF_TILES: tl.constexpr, W_BYTES: tl.constexpr,
        WIDEN: tl.constexpr = 0,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        x_rows = x_ptr + (rm // row_div).to(tl.int64) * stride_xm  # row_div > 1: rows share an input row

        # this split's share of K, a whole number of blocks
        k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_span
        k_hi = tl.minimum(k_lo + k_span, K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # acc[n, m] = y[m, n]
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # SwiGLU's value half
        w_rows = w_ptr + rn.to(tl.int64) * K
        if PF_TILES > 0:  # (with PDL only) scheduled while the previous kernel drains: warm L2 with our first weight tiles
            sector = k_lo + tl.arange(0, PF_TILES * BLOCK_K * W_BYTES // 32) * (32 // W_BYTES)
            pf_ok = n_ok[:, None] & (sector[None, :] < k_hi)
            prefetch_l2(w_rows[:, None] + sector[None, :], pf_ok)
            if EPILOGUE == 1:
                prefetch_l2(w_rows[:, None] + N * K + sector[None, :], pf_ok)
        pdl_enter(PDL)  # nothing above reads an activation or writes anything
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_hi
            xt = tl.load(x_rows[None, :] + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BM)
            wt = tl.load(w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK)
            acc += mma(wt, xt, UPCAST, WIDEN)
            if EPILOGUE == 1:
                wt2 = tl.load(w_rows[:, None] + N * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc2 += mma(wt2, xt, UPCAST, WIDEN)

        pdl_main_loop_done(PDL)  # the next kernel's programs may start during our epilogue
        out_ok = n_ok[:, None] & m_ok[None, :]
        if EPILOGUE == 3:  # raw partial sums, part[pid_k, m, n]: the consumer merges them (no ticket)
            tl.store(part_ptr + (pid_k * M + rm[None, :]).to(tl.int64) * N + rn[:, None], unwiden(acc, WIDEN),
                     mask=out_ok)
        else:
            _epilogue(acc, acc2, rn, rm, n_ok, out_ok, pid_n, pid_k, wscale_ptr, bias_ptr, y_ptr, gate_ptr,
                      part_ptr, ticket_ptr, N, stride_ym, stride_gate, HAS_WSCALE, HAS_BIAS, EPILOGUE, SPLIT_K,
                      BLOCK_M, BLOCK_N, WIDEN)

    @triton.jit
    def _epilogue(acc, acc2, rn, rm, n_ok, out_ok, pid_n, pid_k, wscale_ptr, bias_ptr, y_ptr, gate_ptr, part_ptr,
                  ticket_ptr, N, stride_ym, stride_gate, HAS_WSCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  EPILOGUE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  WIDEN: tl.constexpr):
        """STORE, SWIGLU and GATED_RESIDUAL: merge the splits (the last to arrive), scale, bias, write."""
        if SPLIT_K > 1:
            # partials: (SPLIT_K, 2, N_blocks * BLOCK_N, BLOCK_M) fp32
            n_pad = tl.num_programs(0) * BLOCK_N
            tile = rn[:, None] * BLOCK_M + rm[None, :]
            tl.store(part_ptr + (pid_k * 2) * n_pad * BLOCK_M + tile, acc)
            if EPILOGUE == 1:
                tl.store(part_ptr + (pid_k * 2 + 1) * n_pad * BLOCK_M + tile, acc2)
            ticket = arrive(ticket_ptr + pid_n, None)
            last = ticket == SPLIT_K - 1
            out_ok = out_ok & ((tl.zeros((BLOCK_N, BLOCK_M), tl.int32) + ticket) == SPLIT_K - 1)
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            acc2 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for s in range(SPLIT_K):  # fixed order: deterministic
                acc += tl.load(part_ptr + (s * 2) * n_pad * BLOCK_M + tile, mask=out_ok, other=0.0,
                               cache_modifier=".cg")
                if EPILOGUE == 1:
                    acc2 += tl.load(part_ptr + (s * 2 + 1) * n_pad * BLOCK_M + tile, mask=out_ok, other=0.0,
                                    cache_modifier=".cg")
            rearm(ticket_ptr + pid_n, last)

        acc, acc2 = unwiden(acc, WIDEN), unwiden(acc2, WIDEN)
        if HAS_WSCALE:
            acc = acc * tl.load(wscale_ptr + rn, mask=n_ok, other=0.0)[:, None]
            if EPILOGUE == 1:
                acc2 = acc2 * tl.load(wscale_ptr + N + rn, mask=n_ok, other=0.0)[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if EPILOGUE == 1:
                acc2 = acc2 + tl.load(bias_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        y_off = rm[None, :] * stride_ym + rn[:, None]
        if EPILOGUE == 1:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        if EPILOGUE == 2:
            g = tl.load(gate_ptr + rm[None, :] * stride_gate + rn[:, None], mask=out_ok, other=0.0).to(tl.float32)
            acc = tl.load(y_ptr + y_off, mask=out_ok, other=0.0).to(tl.float32) + g * acc
        store_cast(y_ptr + y_off, acc, out_ok)


SM_COUNT_DEFAULT = 132  # H100 SXM


def candidate_configs(n: int, k: int, fp8: bool = False, wide: bool = False, warps: tuple[int, ...] = (4,)) -> list[dict]:
    """The launch configs worth timing for an (N, K) weight (benchmarks/kernels.py sweeps these):
    K tiles of 256-1024 bytes per weight row, 16-64 rows per program, splits of K up to MAX_SPLIT_K.
    wide (FP8): also 128-wide K tiles (the padded 16-row activation tile is then a smaller share of each
    stage) and 6 pipeline stages (more weight bytes in flight per program), at splits up to 4.
    warps: each config with each of these warp counts (8: twice the threads issuing one tile's loads)."""
    out = []
    for bn in (16, 32, 64):
        for bk in ((256, 512) if fp8 else (128, 256)):
            for split in (1, 2, 4, MAX_SPLIT_K):
                if bn > max(16, next_pow2(n)) or bk > max(32, next_pow2(k)) or (split > 1 and split * bk > k):
                    continue
                out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                            "num_stages": 4 if bk < 512 else 3})
    if wide and fp8:
        for bn in (16, 32, 64):
            for bk in (128, 256):
                for split in (1, 2, 4):
                    for stages in (4, 6):
                        c = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4, "num_stages": stages}
                        if bn <= max(16, next_pow2(n)) and split * bk <= k and c not in out:
                            out.append(c)
    return [dict(c, num_warps=w) for w in warps for c in out]


def heuristic_config(n: int, k: int, fp8: bool, sm_count: int = SM_COUNT_DEFAULT) -> dict:
    """For GPUs without a measured table: the shape of the H100's best configs (64x128 bf16 tiles,
    32x256 FP8 tiles), split K until the column blocks cover the SMs once."""
    bn, bk = (32, 256) if fp8 else (64, 128)
    bk = min(bk, max(32, next_pow2(k)))
    bn = min(bn, max(16, next_pow2(n)))
    split = 1
    while triton.cdiv(n, bn) * split < sm_count and split * 2 * bk <= k and split < MAX_SPLIT_K:
        split *= 2
    return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


_TUNED: dict | None = None


def launch_table_path() -> Path:
    """This GPU model's committed launch-config table: kernels/configs/<gpu_slug()>.json (it may not exist)."""
    return Path(__file__).parent / "configs" / f"{gpu_slug()}.json"


def launch_table() -> dict:
    """The launch-config table the kernels read at each launch: kernels/configs/<gpu>.json (written by
    benchmarks/kernels.py), loaded once; {} without a GPU or a table. A/B scripts edit it in place
    (launch_table().setdefault(kind, {})[key] = config) or swap it (use_launch_table); CUDA graphs captured
    earlier keep the launches they recorded."""
    global _TUNED
    if _TUNED is None:
        _TUNED = {}
        if torch.cuda.is_available():
            path = launch_table_path()
            if path.exists():
                _TUNED = json.loads(path.read_text())
    return _TUNED


def use_launch_table(table: dict) -> dict:
    """Make `table` the one the kernels read from their next launch on; returns the table it replaces."""
    global _TUNED
    old = launch_table()
    _TUNED = table
    return old


def tuned_configs_for(kernel: str) -> dict:
    """Configs measured on this GPU model for one kernel kind ("skinny", "moe", ...; see launch_table)."""
    return launch_table().get(kernel, {})


def gpu_slug() -> str:
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name()).strip("_")


def config_key(m: int, n: int, k: int, fp8: bool, epilogue: int) -> str:
    return f"m{next_pow2(max(m, 1))}_n{n}_k{k}_{'fp8' if fp8 else 'bf16'}_e{epilogue}"


def pick_config(m: int, n: int, k: int, fp8: bool, epilogue: int, device=None) -> dict:
    if interpreting():
        return {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1}  # few, wide programs: the interpreter runs them one by one
    table = tuned_configs_for("skinny")
    found = table.get(config_key(m, n, k, fp8, epilogue))
    if found is None and epilogue == PARTIALS:  # untabled: the ticket-merged GEMM's config, same main loop
        found = table.get(config_key(m, n, k, fp8, GATED_RESIDUAL))
    if found is not None:
        return dict(found)
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else SM_COUNT_DEFAULT
    return heuristic_config(n, k, fp8, sms)


class Workspace:
    """Split-K partials and tickets for one call site (tickets must start at zero and are re-armed
    by the kernel; one workspace must not be used by two streams at once)."""

    def __init__(self, n: int, rows: int, device, max_split: int = MAX_SPLIT_K):
        block_m = max(16, next_pow2(rows))
        self.partials = torch.empty(max_split * 2 * (n + 64) * block_m, dtype=torch.float32, device=device)
        self.tickets = torch.zeros((n + 15) // 16 + 1, dtype=torch.int32, device=device)


_SHARED: dict[tuple, Workspace] = {}


def shared_workspace(n: int, rows: int, device) -> Workspace:
    """One workspace per (device, N, row block) for calls that bring none (FP8Linear's): made once,
    before any graph capture, instead of allocating and zeroing tickets on every call. Launches on
    one stream are ordered and re-arm the tickets, so sequential calls may share it."""
    key = (str(device), n, max(16, next_pow2(rows)))
    if key not in _SHARED:
        _SHARED[key] = Workspace(n, rows, device)
    return _SHARED[key]


SMEM_BUDGET = 200 * 1024  # bytes of shared memory the pipelined tiles may take (H100: 227 KB per block)


def fit_stages(config: dict, w_bytes: int, swiglu: bool, block_m: int, x_bytes: int = 4) -> dict:
    """Lower num_stages until the pipelined weight (and row) tiles fit in shared memory."""
    per_stage = config["BLOCK_N"] * config["BLOCK_K"] * w_bytes * (2 if swiglu else 1) + config["BLOCK_K"] * block_m * x_bytes
    stages = config.get("num_stages", 3)
    while stages > 2 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return {**config, "num_stages": stages} if "num_stages" in config else config


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, w_scale=None, bias=None, gate=None,
                epilogue: int = STORE, row_div: int = 1, workspace: Workspace | None = None,
                config: dict | None = None) -> torch.Tensor:
    """out[m, :] (=|+=) f(x[m // row_div] @ W^T) for M = out.shape[0] rows.

    x (M / row_div, K) any float dtype, row-contiguous (multiplied as bf16 on a GPU); w (N', K)
    bf16/fp16/fp8-e4m3, contiguous; out (M, N) with N = N' (STORE, GATED_RESIDUAL) or N'/2 (SWIGLU:
    out = silu(y[:, :N]) * y[:, N:]); w_scale (N',) fp32 per output channel; bias (N',);
    gate (M, N) with contiguous columns (GATED_RESIDUAL: out += gate * y, in place).
    config pins {BLOCK_N, BLOCK_K, SPLIT_K[, num_warps, num_stages]}; by default the GPU's measured
    table (kernels/configs/) or a heuristic picks it.
    """
    require()
    if epilogue not in (STORE, SWIGLU, GATED_RESIDUAL):
        raise ValueError(f"skinny_gemm epilogue must be STORE, SWIGLU or GATED_RESIDUAL, got {epilogue} "
                         "(the raw partials: skinny_partials)")
    m, n = out.shape
    k = w.shape[1]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm is for <= {MAX_ROWS} rows, got {m}")
    if x.shape[-1] != k or x.stride(-1) != 1 or not w.is_contiguous():
        raise ValueError(f"bad operands: x {tuple(x.shape)} (last stride {x.stride(-1)}), w {tuple(w.shape)}")
    if w.shape[0] != (2 * n if epilogue == SWIGLU else n):
        raise ValueError(f"w has {w.shape[0]} rows for {n} outputs with epilogue {epilogue}")
    if x.shape[0] * row_div != m:
        raise ValueError(f"{x.shape[0]} input rows x row_div {row_div} != {m} output rows")
    if (gate is None) != (epilogue != GATED_RESIDUAL) or (gate is not None and gate.stride(-1) != 1):
        raise ValueError("the gated-residual epilogue needs a gate (M, N) with contiguous columns, and only it does")
    if workspace is None:
        workspace = shared_workspace(n, m, out.device)
    _launch(x, w, out, m, n, k, epilogue, row_div, w_scale, bias, gate, workspace.partials, workspace.tickets,
            out.stride(0), config)
    return out


def skinny_partials(x: torch.Tensor, w: torch.Tensor, parts: torch.Tensor, *, config: dict | None = None) -> int:
    """parts[s, m, :] = x[m] @ W^T summed over split s's share of K, raw (no scale, no bias): the splits'
    partial sums for a consumer to merge in split order (kernels/layernorm.ln_modulate's `residual`).

    x (M, K) as for skinny_gemm; w (N, K); parts (S_max, M, N) fp32 contiguous. Returns the number of
    splits S written (the config's SPLIT_K, S <= S_max); rows s >= S are left as they are.
    """
    require()
    _, m, n = parts.shape
    k = w.shape[1]
    if m > MAX_ROWS or x.shape[0] != m or x.shape[-1] != k or x.stride(-1) != 1 or not w.is_contiguous():
        raise ValueError(f"bad operands: x {tuple(x.shape)}, w {tuple(w.shape)} for partials {tuple(parts.shape)}")
    if w.shape[0] != n or parts.dtype != torch.float32 or not parts.is_contiguous():
        raise ValueError(f"partials must be contiguous fp32 (S, M, {w.shape[0]}), got {parts.dtype} {tuple(parts.shape)}")
    if config is None:
        config = pick_config(m, n, k, w.dtype == torch.float8_e4m3fn, PARTIALS, parts.device)
    if config["SPLIT_K"] > parts.shape[0]:
        raise ValueError(f"config splits K {config['SPLIT_K']} ways, the partials hold {parts.shape[0]}")
    _launch(x, w, parts, m, n, k, PARTIALS, 1, None, None, None, parts, parts, 0, config)
    return config["SPLIT_K"]


def _launch(x, w, out, m, n, k, epilogue, row_div, w_scale, bias, gate, partials, tickets, stride_out, config):
    dummy = out
    args = (x, w, w_scale if w_scale is not None else dummy, bias if bias is not None else dummy, out,
            gate if gate is not None else dummy, partials, tickets,
            m, n, k, row_div, x.stride(0), stride_out, gate.stride(0) if gate is not None else 0)
    block_m = max(16, next_pow2(m))
    pdl = pdl_launch(out.device)
    flags = dict(HAS_WSCALE=w_scale is not None, HAS_BIAS=bias is not None, EPILOGUE=epilogue, BLOCK_M=block_m,
                 UPCAST=interpreting(), WIDEN=fp8_widen(w.dtype), PF_TILES=pdl_prefetch_tiles() if pdl["PDL"] else 0, W_BYTES=w.element_size(),
                 **pdl)
    if config is None:
        config = pick_config(m, n, k, w.dtype == torch.float8_e4m3fn, epilogue, out.device)
    config = fit_stages(config, w.element_size(), epilogue == SWIGLU, block_m, x.element_size())
    grid = (triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    _skinny_kernel[grid](*args, **flags, **config)


__all__ = ["GATED_RESIDUAL", "MAX_ROWS", "MAX_SPLIT_K", "PARTIALS", "STORE", "SWIGLU", "Workspace", "candidate_configs", "config_key", "launch_table", "launch_table_path", "pick_config", "shared_workspace", "skinny_gemm",
           "skinny_partials", "tuned_configs_for", "use_launch_table"]
