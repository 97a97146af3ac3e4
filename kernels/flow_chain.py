"""EXPERIMENTAL: all of one Euler step's flow-head blocks in one persistent launch (not used by default).

The flow head streams 12 x (w12, w3) per Euler step (0.9 GB in FP8) through 37 launches (LayerNorm,
w12, w3 per block); each launch fills and drains the memory pipe, and the LayerNorm launches stream
nothing. Here G programs (one per SM, all resident) walk the blocks together, meeting at a grid-wide
barrier (an atomic counter) between the phases of each block:

  A  row p (program p): h[p] += gate_{j-1}[p] * (sum of block j-1's w3 partials, in split order) + bias, then
     xn[p] = modulate(LN(h[p])) with block j's LayerNorm and modulation; the other programs prefetch
     their first w12 tiles into L2 meanwhile
  B  w12 + SwiGLU: act[:, tile] = silu(xn @ Wg^T) * (xn @ Wu^T), BLOCK_N12 columns per item
  C  w3 partials: part[s, :, tile] = act[:, k-split s] @ W3[tile, k-split s]^T (no reduction here: A does it)

and after the last block one more A-style step applies block DEPTH-1's residual. Every sum runs in a
fixed order, so the result is deterministic. Triton's interpreter runs programs one after another,
where a barrier could never be passed: there G must be 1 (the tests run it so). On a GPU, G programs
must all be resident at once: the launch is cooperative (the driver refuses a grid that cannot be),
and a spin limit still guards the barriers (a flag, FlowChain.failed(), then says the result is wrong).
benchmarks/flow_chain_check.py times it against the launches and checks it against them.
"""
from __future__ import annotations

import torch

from ._triton import interpreting, next_pow2, require, tl, triton

MAX_SPINS = 1 << 20  # about a second of polling: a barrier that takes longer is a deadlock

if triton is not None:
    from ._triton import mma, prefetch_l2, store_cast

    @triton.jit
    def _grid_sync(bar_ptr, err_ptr, target, SPIN_LIMIT: tl.constexpr):
        """Arrive, then wait until `target` programs have arrived in total (the counter only grows)."""
        tl.debug_barrier()  # every thread's stores are issued before the arrival is released
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        spins = 0
        failed = tl.atomic_add(err_ptr, 0, sem="relaxed", scope="gpu")  # after one timeout, no more waiting
        while (seen < target) & (spins < SPIN_LIMIT) & (failed == 0):
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
        if seen < target:  # this launch's flag (stops every later wait of the launch) and the sticky one
            tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")
            tl.atomic_xchg(err_ptr + 1, 1, sem="relaxed", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _residual_and_norm(h_ptr, part_ptr, w3s_ptr, b3_ptr, gate_ptr, lnw_ptr, lnb_ptr, shift_ptr, scale_ptr,
                           xn_ptr, p, M, W, stride_mod, eps, apply, NORM: tl.constexpr,
                           HAS_W3S: tl.constexpr, HAS_B3: tl.constexpr, SPLIT3: tl.constexpr,
                           W_BLOCK: tl.constexpr):
        rc = tl.arange(0, W_BLOCK)
        ok = rc < W
        v = tl.load(h_ptr + p * W + rc, mask=ok, other=0.0)
        if apply:  # the previous block's w3: partials in split order, then scale, bias, gate
            y = tl.zeros((W_BLOCK,), tl.float32)
            for s in range(SPLIT3):
                y += tl.load(part_ptr + (s * M + p) * W + rc, mask=ok, other=0.0, cache_modifier=".cg")
            if HAS_W3S:
                y = y * tl.load(w3s_ptr + rc, mask=ok, other=0.0)
            if HAS_B3:
                y = y + tl.load(b3_ptr + rc, mask=ok, other=0.0)
            v = v + tl.load(gate_ptr + p * stride_mod + rc, mask=ok, other=0.0) * y
            tl.store(h_ptr + p * W + rc, v, mask=ok)
        if NORM:
            mean = tl.sum(v, axis=0) / W
            d = tl.where(ok, v - mean, 0.0)
            n = d / tl.sqrt(tl.sum(d * d, axis=0) / W + eps)
            n = n * tl.load(lnw_ptr + rc, mask=ok, other=0.0) + tl.load(lnb_ptr + rc, mask=ok, other=0.0)
            sh = tl.load(shift_ptr + p * stride_mod + rc, mask=ok, other=0.0)
            sc = tl.load(scale_ptr + p * stride_mod + rc, mask=ok, other=0.0)
            store_cast(xn_ptr + p * W + rc, n * (1.0 + sc) + sh, ok)

    @triton.jit
    def _flow_chain_kernel(
        h_ptr, xn_ptr, act_ptr, part_ptr, mods_ptr, lnw_ptr, lnb_ptr,
        w12_ptr, s12_ptr, b12_ptr, w3_ptr, s3_ptr, b3_ptr, bar_ptr, err_ptr,
        M, W, HID, DEPTH, stride_mod_blk, stride_mod_row, eps,
        HAS_SCALE: tl.constexpr, HAS_B12: tl.constexpr, HAS_B3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N12: tl.constexpr, BLOCK_N3: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT3: tl.constexpr, W_BLOCK: tl.constexpr, PREFETCH: tl.constexpr, W_BYTES: tl.constexpr,
        UPCAST: tl.constexpr, SPIN_LIMIT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n12_tiles = tl.cdiv(HID, BLOCK_N12)
        n3_items = tl.cdiv(W, BLOCK_N3) * SPLIT3
        k3_span = tl.cdiv(tl.cdiv(HID, SPLIT3), BLOCK_K) * BLOCK_K
        phase = 0
        for j in range(DEPTH):
            mods = mods_ptr + j * stride_mod_blk  # (M, 3W) rows of this step: [shift | scale | gate]
            prev = mods_ptr + (j - 1) * stride_mod_blk
            jj = tl.zeros((), tl.int64) + j  # 64-bit block offsets
            w12 = w12_ptr + jj * (2 * HID) * W
            w3 = w3_ptr + jj * W * HID
            # --- A: the previous block's residual, this block's LayerNorm + modulation -----------------
            for p in range(pid, M, G):  # one row per program (G >= M on a GPU)
                _residual_and_norm(h_ptr, part_ptr, s3_ptr + (j - 1) * W, b3_ptr + (j - 1) * W, prev + 2 * W,
                                   lnw_ptr + j * W, lnb_ptr + j * W, mods, mods + W, xn_ptr, p, M, W,
                                   stride_mod_row, eps, j > 0, NORM=True, HAS_W3S=HAS_SCALE, HAS_B3=HAS_B3,
                                   SPLIT3=SPLIT3, W_BLOCK=W_BLOCK)
            if PREFETCH:  # the programs without a row warm L2 with their first w12 tile (both halves) meanwhile
                if (pid >= M) & (pid < n12_tiles):
                    rn = pid * BLOCK_N12 + tl.arange(0, BLOCK_N12)
                    col = tl.arange(0, 2 * BLOCK_K * W_BYTES // 32) * (32 // W_BYTES)  # two K tiles, one address per 32 B
                    pf_ok = (rn < HID)[:, None] & (col < W)[None, :]
                    prefetch_l2(w12 + rn[:, None].to(tl.int64) * W + col[None, :], pf_ok)
                    prefetch_l2(w12 + (HID + rn[:, None]).to(tl.int64) * W + col[None, :], pf_ok)
            phase += 1
            _grid_sync(bar_ptr, err_ptr, phase * G, SPIN_LIMIT)
            # --- B: w12 + SwiGLU ------------------------------------------------------------------
            for t in range(pid, n12_tiles, G):
                rn = t * BLOCK_N12 + tl.arange(0, BLOCK_N12)
                n_ok = rn < HID
                rows = w12 + rn[:, None].to(tl.int64) * W
                acc_g = tl.zeros((BLOCK_N12, BLOCK_M), tl.float32)
                acc_u = tl.zeros((BLOCK_N12, BLOCK_M), tl.float32)
                for k0 in range(0, W, BLOCK_K):
                    kk = k0 + rk
                    k_ok = kk < W
                    xt = tl.load(xn_ptr + rm[None, :] * W + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0,
                                 cache_modifier=".cg")  # written by other SMs since this SM last read it: not from L1
                    ok = n_ok[:, None] & k_ok[None, :]
                    acc_g += mma(tl.load(rows + kk[None, :], mask=ok, other=0.0), xt, UPCAST)
                    acc_u += mma(tl.load(rows + HID * W + kk[None, :], mask=ok, other=0.0), xt, UPCAST)
                if HAS_SCALE:
                    acc_g = acc_g * tl.load(s12_ptr + j * 2 * HID + rn, mask=n_ok, other=0.0)[:, None]
                    acc_u = acc_u * tl.load(s12_ptr + j * 2 * HID + HID + rn, mask=n_ok, other=0.0)[:, None]
                if HAS_B12:
                    acc_g = acc_g + tl.load(b12_ptr + j * 2 * HID + rn, mask=n_ok, other=0.0)[:, None]
                    acc_u = acc_u + tl.load(b12_ptr + j * 2 * HID + HID + rn, mask=n_ok, other=0.0)[:, None]
                store_cast(act_ptr + rm[None, :] * HID + rn[:, None], acc_g / (1.0 + tl.exp(-acc_g)) * acc_u,
                           n_ok[:, None] & m_ok[None, :])
            phase += 1
            _grid_sync(bar_ptr, err_ptr, phase * G, SPIN_LIMIT)
            # --- C: w3 partials ---------------------------------------------------------------------
            for it in range(pid, n3_items, G):
                s = it % SPLIT3
                rn = (it // SPLIT3) * BLOCK_N3 + tl.arange(0, BLOCK_N3)
                n_ok = rn < W
                rows = w3 + rn[:, None].to(tl.int64) * HID
                k_lo = s * k3_span
                k_hi = tl.minimum(k_lo + k3_span, HID)
                acc = tl.zeros((BLOCK_N3, BLOCK_M), tl.float32)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    kk = k0 + rk
                    k_ok = kk < k_hi
                    at = tl.load(act_ptr + rm[None, :] * HID + kk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0,
                                 cache_modifier=".cg")
                    acc += mma(tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0), at, UPCAST)
                tl.store(part_ptr + (s * M + rm[None, :]) * W + rn[:, None], acc, mask=n_ok[:, None] & m_ok[None, :])
            phase += 1
            _grid_sync(bar_ptr, err_ptr, phase * G, SPIN_LIMIT)
        # the last block's residual
        last = mods_ptr + (DEPTH - 1) * stride_mod_blk
        for p in range(pid, M, G):
            _residual_and_norm(h_ptr, part_ptr, s3_ptr + (DEPTH - 1) * W, b3_ptr + (DEPTH - 1) * W, last + 2 * W,
                               lnw_ptr, lnb_ptr, last, last + W, xn_ptr, p, M, W, stride_mod_row, eps,
                               True, NORM=False, HAS_W3S=HAS_SCALE, HAS_B3=HAS_B3, SPLIT3=SPLIT3,
                               W_BLOCK=W_BLOCK)
        # re-arm: the last program to get here (everyone has passed every barrier) zeroes the counter and
        # this launch's error flag (the sticky one stays for the host: FlowChain.failed)
        done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done == G - 1:
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(err_ptr, 0, sem="relaxed", scope="gpu")


class FlowChain:
    """Stacked weights of a KernelFlowHead's blocks and the scratch of one row count, for flow_chain_step."""

    def __init__(self, blocks: list[dict], rows: int, device, programs: int | None = None,
                 config: dict | None = None):
        """config overrides entries of the launch config (BLOCK_N12, BLOCK_N3, BLOCK_K, SPLIT3, num_warps,
        num_stages, PREFETCH, maxnreg, programs_per_sm): benchmarks/flow_chain_check.py --sweep tries some.
        programs_per_sm > 1 needs the kernel to fit that many times on an SM (registers: maxnreg), or the
        cooperative launch is refused."""
        require()
        self.depth = len(blocks)
        self.w12 = torch.stack([b["w12"].weight for b in blocks]).contiguous()  # (D, 2*HID, W)
        self.w3 = torch.stack([b["w3"].weight for b in blocks]).contiguous()  # (D, W, HID)
        self.s12 = torch.stack([b["w12"].scale for b in blocks]) if blocks[0]["w12"].scale is not None else None
        self.s3 = torch.stack([b["w3"].scale for b in blocks]) if blocks[0]["w3"].scale is not None else None
        self.b12 = torch.stack([b["w12"].bias for b in blocks]) if blocks[0]["w12"].bias is not None else None
        self.b3 = torch.stack([b["w3"].bias for b in blocks]) if blocks[0]["w3"].bias is not None else None
        self.lnw = torch.stack([b["ln"][0] for b in blocks]).contiguous()
        self.lnb = torch.stack([b["ln"][1] for b in blocks]).contiguous()
        self.hid, self.width = self.w3.shape[2], self.w3.shape[1]
        self.rows = rows
        config = dict(config or {})
        per_sm = int(config.pop("programs_per_sm", 1))
        if interpreting():
            self.programs = 1  # the interpreter runs programs one by one: a barrier needs them all at once
        elif programs is not None:
            self.programs = int(programs)
        else:
            self.programs = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
        self.config = ({"BLOCK_N12": 32, "BLOCK_N3": 32, "BLOCK_K": 64, "SPLIT3": 2} if interpreting() else
                       # w12: 256 tiles of 32 x 2 halves (about 2 per program); w3: 96 column tiles x 4 K splits
                       # of 2048 (about 3 per program, K loops long enough to keep the pipeline full). 32-row
                       # FP8 tiles: at 64 rows Triton 3.9 loads FP8 weights in 8-byte copies (16 at 32 rows)
                       {"BLOCK_N12": 32, "BLOCK_N3": 32, "BLOCK_K": 256, "SPLIT3": 4})
        # one program per SM holds num_stages weight tiles in flight: 3 stages of 16 KB (FP8 w12) are about a
        # quarter of what the per-block launches keep in flight per SM (3 programs x 4 stages); more stages
        # are the first thing to try. At 8 warps the kernel needs 244-255 registers, so two programs do not
        # fit; maxnreg=128 lets two fit at the price of 120-324 bytes of spills
        # (benchmarks/results/kernel_ir_check_cpu_sm90.json, a CPU compile with triton 3.9)
        self.config = {**self.config, "num_warps": 8, "num_stages": 3, "PREFETCH": not interpreting(), **config}
        unknown = set(self.config) - {"BLOCK_N12", "BLOCK_N3", "BLOCK_K", "SPLIT3", "num_warps", "num_stages",
                                      "PREFETCH", "maxnreg"}
        if unknown:
            raise ValueError(f"flow chain config: unknown entries {sorted(unknown)}")
        rows_dtype = torch.float16 if self.w12.dtype == torch.float8_e4m3fn else torch.bfloat16
        self.act = torch.empty(rows, self.hid, dtype=rows_dtype, device=device)
        self.part = torch.empty(self.config["SPLIT3"] * rows * self.width, dtype=torch.float32, device=device)
        self.barrier = torch.zeros(2, dtype=torch.int32, device=device)  # arrivals, finished programs
        self.error = torch.zeros(2, dtype=torch.int32, device=device)  # a barrier timed out: this launch, ever

    def failed(self) -> bool:
        """Whether any launch so far had a barrier time out (its result is wrong). Syncs with the GPU."""
        return bool(int(self.error[1]))

    def step(self, h: torch.Tensor, xn: torch.Tensor, mods: torch.Tensor, eps: float) -> None:
        """One Euler step's blocks: h (M, W) fp32 in place; xn (M, W) scratch of the GEMM row dtype;
        mods (D, M, 3W) fp32 views of this step's modulations ([shift | scale | gate] per block)."""
        m, w = h.shape
        if m > 64:
            raise ValueError(f"flow chain: at most 64 rows, got {m}")
        if m != self.rows or w != self.width or mods.shape != (self.depth, m, 3 * w) or mods.stride(2) != 1:
            raise ValueError(f"flow chain for {self.rows} rows of {self.width}: h {tuple(h.shape)}, mods {tuple(mods.shape)}")
        dummy = h
        _flow_chain_kernel[(self.programs,)](
            h, xn, self.act, self.part, mods, self.lnw, self.lnb,
            self.w12, self.s12 if self.s12 is not None else dummy, self.b12 if self.b12 is not None else dummy,
            self.w3, self.s3 if self.s3 is not None else dummy, self.b3 if self.b3 is not None else dummy,
            self.barrier, self.error, m, w, self.hid, self.depth, mods.stride(0), mods.stride(1), float(eps),
            HAS_SCALE=self.s12 is not None, HAS_B12=self.b12 is not None, HAS_B3=self.b3 is not None,
            BLOCK_M=max(16, next_pow2(m)), W_BLOCK=next_pow2(w),
            W_BYTES=self.w12.element_size(), UPCAST=interpreting(), SPIN_LIMIT=MAX_SPINS,
            # cooperative: the driver refuses a grid that cannot be resident at once instead of letting it spin
            **({} if interpreting() else {"launch_cooperative_grid": True}), **self.config)


__all__ = ["FlowChain", "MAX_SPINS"]
