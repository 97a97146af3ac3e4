"""The flow head's residual block for a few rows in two launches instead of three.

The launches path (runtime.fast.kernel_flow_head) runs, per block and Euler step, LayerNorm + modulation,
w12 (SwiGLU epilogue) and w3 (gated residual). Each GEMM launch pays a fixed cost beside its bytes (the
launch, the first loads' latency, the tail, w3's split-K merge): on an H200 the FP8 w3 streams its 25 MB
in 10.8 us, where 5.2 us would be the bandwidth's. Here:

  launch 1, program p of P = hidden / BLOCK_H, owning hidden columns c_p = [p*BLOCK_H, (p+1)*BLOCK_H):
      act_p   = silu(xn @ Wg[c_p]^T) * (xn @ Wu[c_p]^T)      (M, BLOCK_H), rounded to the rows' type as
                                                             the launches store it (fp16 FP8, bf16 bf16)
      part[p] = act_p @ W3[:, c_p]^T                          (M, W) fp32, w3's scale not yet applied
  launch 2, program (c, m) over column chunk c of row m:
      h[m, c] += gate[m, c] * (sum_p part[p, m, c] * s3[c] + b3[c])      partials in a fixed order
      the last program of row m to finish (an atomic ticket) then writes the next LayerNorm + modulation
      of the whole row, as kernels/layernorm.py does (same arithmetic)

so w3 needs no launch of its own and no split-K merge, and the LayerNorm launch is folded into the
residual's. The partials cost 2*P*M*W*4 bytes of traffic (3 MB at 2 rows, 4% of an FP8 block's 75 MB),
which grows with M: the flow head uses this path up to FUSED_MLP_MAX_ROWS rows. Deterministic: every
sum runs in an order fixed by the launch config, so a seed gives the same latent bit for bit (but not
the launches' bits: w3's sum over the hidden dimension is split differently).
"""
from __future__ import annotations

import torch

from ._triton import fp8_widen, interpreting, next_pow2, pdl_launch, require, tl, triton
from .layernorm import check_modulation

if triton is not None:
    from ._triton import E4M3_UNSCALE, F16_MAX, arrive, mma, pdl_enter, pdl_main_loop_done, rearm, store_cast
    from .layernorm import ln_modulate_row

FUSED_MLP_MAX_ROWS = 4  # above this the partials' traffic (and registers) outgrow the saved launch
RESIDUAL_BLOCK_C = 128  # columns per program of launch 2
RESIDUAL_BLOCK_P = 16  # partials summed per load of launch 2

if triton is not None:

    @triton.jit
    def _swiglu_partials_kernel(
        x_ptr, w12_ptr, s12_ptr, b12_ptr, w3_ptr, part_ptr,
        M, W, HID, stride_xm,
        HAS_S12: tl.constexpr, HAS_B12: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N3: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr, WIDEN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rh = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = rh < HID
        rk = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rm.to(tl.int64) * stride_xm
        g_rows = w12_ptr + rh.to(tl.int64) * W  # gate half of w12
        u_rows = w12_ptr + (HID + rh).to(tl.int64) * W  # value half
        acc_g = tl.zeros((BLOCK_H, BLOCK_M), tl.float32)  # acc[h, m] = (xn @ Wg^T)[m, h]
        acc_u = tl.zeros((BLOCK_H, BLOCK_M), tl.float32)
        pdl_enter(PDL)
        for k0 in range(0, W, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < W
            xt = tl.load(x_rows[None, :] + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BM)
            w_ok = h_ok[:, None] & k_ok[None, :]
            acc_g += mma(tl.load(g_rows[:, None] + kk[None, :], mask=w_ok, other=0.0), xt, UPCAST, WIDEN)
            acc_u += mma(tl.load(u_rows[:, None] + kk[None, :], mask=w_ok, other=0.0), xt, UPCAST, WIDEN)
        if WIDEN > 0:
            acc_g = acc_g * E4M3_UNSCALE
            acc_u = acc_u * E4M3_UNSCALE
        if HAS_S12:
            acc_g = acc_g * tl.load(s12_ptr + rh, mask=h_ok, other=0.0)[:, None]
            acc_u = acc_u * tl.load(s12_ptr + HID + rh, mask=h_ok, other=0.0)[:, None]
        if HAS_B12:
            acc_g = acc_g + tl.load(b12_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)[:, None]
            acc_u = acc_u + tl.load(b12_ptr + HID + rh, mask=h_ok, other=0.0).to(tl.float32)[:, None]
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # (BH, BM): the SwiGLU epilogue's formula
        if x_ptr.dtype.element_ty == tl.float16:  # rounded as the launches store it (store_cast)
            act = tl.minimum(tl.maximum(act, -F16_MAX), F16_MAX)
        act = tl.where(h_ok[:, None], act, 0.0).to(x_ptr.dtype.element_ty)  # (K = BH, BM): w3's row operand

        # part[pid, m, n] = sum over our hidden columns of W3[n, h] * act[h, m]
        part_rows = part_ptr + (pid * M + rm).to(tl.int64) * W
        for n0 in range(0, W, BLOCK_N3):
            rn = n0 + tl.arange(0, BLOCK_N3)
            n_ok = rn < W
            w3t = tl.load(w3_ptr + rn[:, None].to(tl.int64) * HID + rh[None, :], mask=n_ok[:, None] & h_ok[None, :],
                          other=0.0)  # (BN3, BH)
            p = mma(w3t, act, UPCAST, WIDEN)  # (BN3, BM)
            if WIDEN > 0:
                p = p * E4M3_UNSCALE
            tl.store(part_rows[None, :] + rn[:, None], p, mask=n_ok[:, None] & m_ok[None, :])
        pdl_main_loop_done(PDL)

    @triton.jit
    def _residual_ln_kernel(
        part_ptr, s3_ptr, b3_ptr, gate_ptr, h_ptr, ticket_ptr, lnw_ptr, lnb_ptr, shift_ptr, scale_ptr, out_ptr,
        P, M, W, stride_gate, stride_mod, stride_out, eps,
        HAS_S3: tl.constexpr, HAS_B3: tl.constexpr, AFFINE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_enter(PDL)
        c = tl.program_id(0)
        m = tl.program_id(1)
        rc = c * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = rc < W
        rp = tl.arange(0, BLOCK_P)
        y = tl.zeros((BLOCK_C,), tl.float32)
        for p0 in range(0, P, BLOCK_P):  # fixed order: deterministic
            pp = p0 + rp
            t = tl.load(part_ptr + (pp[:, None] * M + m).to(tl.int64) * W + rc[None, :],
                        mask=(pp < P)[:, None] & ok[None, :], other=0.0, cache_modifier=".cg")
            y += tl.sum(t, axis=0)
        if HAS_S3:
            y = y * tl.load(s3_ptr + rc, mask=ok, other=0.0)
        if HAS_B3:
            y = y + tl.load(b3_ptr + rc, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + m * stride_gate + rc, mask=ok, other=0.0).to(tl.float32)
        hv = tl.load(h_ptr + m * W + rc, mask=ok, other=0.0) + g * y
        tl.store(h_ptr + m * W + rc, hv, mask=ok)
        # the last program of row m to get here has every column of the new h[m]: it writes the next rows
        ticket = arrive(ticket_ptr + m, None)
        last = ticket == tl.num_programs(0) - 1
        if last:
            rw = tl.arange(0, BLOCK_W)
            w_ok = rw < W
            x = tl.load(h_ptr + m * W + rw, mask=w_ok, other=0.0, cache_modifier=".cg")
            yn = ln_modulate_row(x, rw, w_ok, W, lnw_ptr, lnb_ptr, shift_ptr + m * stride_mod,
                                 scale_ptr + m * stride_mod, eps, AFFINE)
            store_cast(out_ptr + m * stride_out + rw, yn, w_ok)
        rearm(ticket_ptr + m, last)


def default_config(w: int, hidden: int, fp8: bool) -> dict:
    """Launch 1's tiles when none is given: 32 hidden columns a program (256 programs at the released 8192),
    K tiles of 256 weight bytes, 128 w3 rows a tile, 2 warps (mma.sync: at 4 warps and 64-row tiles Triton
    takes wgmma, whose FP8 register operand serialises, session 11's SASS)."""
    if interpreting():
        return {"BLOCK_H": 32, "BLOCK_K": 64, "BLOCK_N3": 64}
    return {"BLOCK_H": 32, "BLOCK_K": 256 if fp8 else 128, "BLOCK_N3": 128, "num_warps": 2, "num_stages": 4}


class FusedMLPScratch:
    """The partials (P, M, W) fp32 and the per-row tickets of one row count (made before any capture;
    one scratch must not serve two streams at once)."""

    def __init__(self, rows: int, w: int, hidden: int, device, block_h_min: int = 32):
        self.max_programs = triton.cdiv(hidden, block_h_min) if triton is not None else hidden
        self.partials = torch.empty(self.max_programs * rows * w, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(rows, dtype=torch.int32, device=device)


def swiglu_partials(x: torch.Tensor, w12: torch.Tensor, w3: torch.Tensor, scratch: FusedMLPScratch, *,
                    s12=None, b12=None, config: dict | None = None) -> int:
    """Launch 1: x (M, W) rows (fp16 for FP8 weights, bf16 otherwise), w12 (2*HID, W) [gate; value],
    w3 (W, HID), per-output-channel s12 (2*HID,) and bias b12 (2*HID,) or None. Writes the partials into
    `scratch`; returns their count P for residual_ln_modulate."""
    require()
    m, w = x.shape
    hid = w3.shape[1]
    if m > FUSED_MLP_MAX_ROWS:
        raise ValueError(f"the fused MLP is for <= {FUSED_MLP_MAX_ROWS} rows, got {m}")
    if w12.shape != (2 * hid, w) or w3.shape != (w, hid) or not (w12.is_contiguous() and w3.is_contiguous()):
        raise ValueError(f"bad weights for x {tuple(x.shape)}: w12 {tuple(w12.shape)}, w3 {tuple(w3.shape)} "
                         "(want (2*hidden, W) and (W, hidden), contiguous)")
    if x.stride(-1) != 1:
        raise ValueError("x rows must be contiguous")
    config = dict(config or default_config(w, hid, w12.dtype == torch.float8_e4m3fn))
    programs = triton.cdiv(hid, config["BLOCK_H"])
    if programs > scratch.max_programs or scratch.tickets.numel() < m:
        raise ValueError(f"scratch made for {scratch.max_programs} programs and {scratch.tickets.numel()} rows; "
                         f"this launch needs {programs} and {m}")
    dummy = scratch.partials
    _swiglu_partials_kernel[(programs,)](
        x, w12, s12 if s12 is not None else dummy, b12 if b12 is not None else dummy, w3, scratch.partials,
        m, w, hid, x.stride(0), HAS_S12=s12 is not None, HAS_B12=b12 is not None, BLOCK_M=max(16, next_pow2(m)),
        UPCAST=interpreting(), WIDEN=fp8_widen(w12.dtype), **pdl_launch(x.device), **config)
    return programs


def residual_ln_modulate(scratch: FusedMLPScratch, programs: int, h: torch.Tensor, gate: torch.Tensor,
                         shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, *, s3=None, b3=None,
                         weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """Launch 2: h (M, W) fp32 += gate * (sum of the `programs` partials * s3 + b3), in place; then
    out = modulate(LN(h)) with (weight, bias) the next LayerNorm's affine (or None) and shift/scale
    (M, W) views sharing a row stride, as kernels.layernorm.ln_modulate."""
    require()
    m, w = h.shape
    check_modulation(h, shift, scale, weight, bias)
    if h.dtype != torch.float32 or not h.is_contiguous() or gate.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("residual_ln_modulate: h contiguous fp32; gate and out rows contiguous")
    affine = weight is not None
    grid = (triton.cdiv(w, RESIDUAL_BLOCK_C), m)
    _residual_ln_kernel[grid](
        scratch.partials, s3 if s3 is not None else h, b3 if b3 is not None else h, gate, h, scratch.tickets,
        weight if affine else h, bias if affine else h, shift, scale, out,
        programs, m, w, gate.stride(0), shift.stride(0), out.stride(0), eps,
        HAS_S3=s3 is not None, HAS_B3=b3 is not None, AFFINE=affine, BLOCK_P=RESIDUAL_BLOCK_P,
        BLOCK_C=RESIDUAL_BLOCK_C, BLOCK_W=next_pow2(w), num_warps=4, **pdl_launch(h.device, trigger_at_start=True))
    return out


def candidate_configs(fp8: bool) -> list[dict]:
    """Launch 1's configs worth timing at the released shapes (benchmarks/fused_mlp_ab.py sweeps them): 32 or 64
    hidden columns a program, K tiles of 256-512 bytes, 64-256 w3 rows a tile, 2 or 4 warps; not the tiles of
    32 KB a half (ptxas spills ~0.5 KB at sm_90 with 2 warps, benchmarks/kernel_ir_check.py)."""
    wbytes = 1 if fp8 else 2
    out = []
    for bh in (32, 64):
        for bk in ((256, 512) if fp8 else (128, 256)):
            if bh * bk * wbytes >= 32768:
                continue
            for bn3 in (64, 128, 256):
                for warps in (2, 4):
                    out.append({"BLOCK_H": bh, "BLOCK_K": bk, "BLOCK_N3": bn3, "num_warps": warps,
                                "num_stages": 4 if bh * bk * wbytes <= 8192 else 3})
    return out


__all__ = ["FUSED_MLP_MAX_ROWS", "FusedMLPScratch", "candidate_configs", "default_config", "residual_ln_modulate",
           "swiglu_partials"]
