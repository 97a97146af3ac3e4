"""The flow head on the custom kernels: bf16 or FP8 weight streaming, two launches per block per step.

Same function as FastFlowHead (hoisted invariants: temb once, condition once per token, all S steps'
adaLN modulations in one GEMM per block, or one for all blocks: merge_mods), laid out for the memory-bound
decode regime:

  per token:  mods[blk] = adaLN_blk(silu(temb + cond))          (S*M, 3W) fp32, a GEMM per block (or one)
  per step:   h   = input_proj(x)                                (M, W) fp32 residual stream
              xn  = modulate(LN(h))                              launch 1: one program per row, bf16 out
              act = SwiGLU(w12 @ xn)                             launch 2: both halves in one program
              h  += gate * (w3 @ act)                            launch 3: in place, fp32
              v   = final(modulate(LN(h)))                       (M, C)
              x  += dt * guide(v)                                one launch
with M = B*R rows. With `deferred_residual` (the default) launch 3 only stores its split-K partial sums and the
next launch 1 (the next block's, or the final layer's) merges them into h before its LayerNorm: same arithmetic
in the same order as launch 3's own merge, without its fence, ticket and dependent reads at the end of every w3.
The residual stream and the modulations stay fp32 (the reference rounds them to
bf16 at each op); the GEMM operands are bf16 (bf16 weights) or fp16 (FP8 weights widened exactly to fp16).

Above MAX_ROWS modulation rows (S*M > 64: three prompts or more with 2 CFG rows, two with 3) the modulation
GEMMs go to cuBLAS instead (`_mods_cublas`; torch >= 2.8, whose mm takes an fp32 out_dtype; older torches
keep the 64-row passes). At 8 prompts they are 256 rows: compute-bound, where the skinny kernel's four
64-row passes read the weights four times and run its fp16 dot products well below the tensor cores' rate
(H200, session 10: 4 x 25 us FP8 with bf16-fed rows, 4 x 24 us bf16 per block, against 17 us for one 64-row
cuBLAS pass). Same operands and
fp32 accumulation as the kernel; FP8 weights are widened once into an fp16 copy (2 bytes per modulation
weight, made with the scratch of the first such row count, at its warm-up) and their per-channel scale
applied after the product. That copy stacks the D + 1 matrices (merge_mods), so the modulations are one GEMM
into one (S*M, D*3W + 2W) buffer, whose column blocks the steps read as strided views, and one contiguous
scale-and-bias pass, where per-block GEMMs left a broadcast pass over a (D, S*M, 3W) view: at 8 prompts on an
H200, 354 against 394 us a token, the same bits (benchmarks/flow_mods_ab.py, session 20).
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from kernels import interpreting
from kernels.fp8 import WEIGHT_FORMATS, fp16_rows, quantize_rows_fp8
from kernels.guidance import guide_euler_
from kernels.layernorm import PendingResidual, ln_modulate
from kernels.skinny import GATED_RESIDUAL, MAX_ROWS, MAX_SPLIT_K, SWIGLU, Workspace, skinny_gemm, skinny_partials
from models.univision import MingUniVision

from .flow_head import FastFlowHead

logger = logging.getLogger(__name__)


# torch.mm(a, b, out_dtype=torch.float32) for 16-bit a, b: torch >= 2.8
MM_FP32_OUT = "dtype_out" in torch.ops.aten.mm.overloads()


def _mm_fp32(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out (M, N) fp32 = x (M, K) @ w (N, K)^T, fp32 accumulation: cuBLAS (x already in w's 16-bit type, as
    the kernels round their operands); in Triton's interpreter fp32 products, as its kernels."""
    if interpreting():
        torch.mm(x.float(), w.float().t(), out=out)
    else:
        torch.mm(x, w.t(), out_dtype=torch.float32, out=out)


class PackedLinear:
    """A linear layer's weight in the kernel's format: (W or Wq, per-row scale or None, fp32 bias)."""

    def __init__(self, linear: nn.Linear, fmt: str):
        w = linear.weight.detach()
        if fmt == "fp8":
            self.weight, self.scale = quantize_rows_fp8(w)
        else:
            self.weight, self.scale = w.to(torch.bfloat16).contiguous(), None
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class KernelFlowHead(nn.Module):
    def __init__(self, model: MingUniVision, *, weights: str = "bf16", time_shift: float | None = None,
                 renorm: bool = False, chain: bool = False, deferred_residual: bool = True,
                 merge_mods: bool | None = None):
        """chain (EXPERIMENTAL, kernels/flow_chain.py): each Euler step's blocks in one persistent launch,
        from a second, stacked copy of the block weights; benchmarks/flow_chain_check.py measures it.
        deferred_residual: w3's split-K merge and gated residual run in the next LayerNorm's launch (module
        docstring); False merges them in w3's launch (a ticket), as before session 13.
        merge_mods: above MAX_ROWS modulation rows, all D + 1 modulation GEMMs as one cuBLAS GEMM over a
        stacked copy of their weights (module docstring); False: one GEMM per block. None (default): with FP8
        weights only, whose fp16 copy exists either way; bf16 would add a 0.7 GB copy for ~30 us a token."""
        super().__init__()
        self.deferred_residual = deferred_residual
        self.merge_mods = weights == "fp8" if merge_mods is None else bool(merge_mods)
        self.chain, self.chain_config = chain, None
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        self.hoisted = FastFlowHead(model, time_shift=time_shift, renorm=renorm)  # vis_head, temb, dts
        net = self.hoisted.net
        self.weights, self.renorm, self.eps = weights, renorm, model.cfg.flow_head.norm_eps
        self.blocks = [dict(ln=(b.in_ln.weight.detach().float(), b.in_ln.bias.detach().float()),
                            w12=PackedLinear(b.mlp.w12, weights), w3=PackedLinear(b.mlp.w3, weights),
                            ada=PackedLinear(b.adaLN_modulation[1], weights)) for b in net.res_blocks]
        self.final = PackedLinear(net.final_layer.linear, weights)
        self.final_ada = PackedLinear(net.final_layer.adaLN_modulation[1], weights)
        self.input_proj = PackedLinear(net.input_proj, weights)
        # modulation rows above which cuBLAS computes them (module docstring)
        self.cublas_mods_above = MAX_ROWS if MM_FP32_OUT else sys.maxsize
        self._scratch: dict[tuple, dict] = {}
        self._wide: dict | None = None  # the modulation weights as cuBLAS takes them, made on first use

    def set_chain(self, on: bool, config: dict | None = None) -> None:
        """Switch the experimental one-launch Euler step on or off (config: FlowChain's launch overrides); the
        scratch (and any captured graph using it: GraphImageGenerator.reset_graphs) must be made again."""
        self.chain, self.chain_config = bool(on), config
        self._scratch.clear()

    def chains(self) -> list:
        """The FlowChain of each row count run so far (chain=True): its barrier, error flag and grid."""
        return [buf["chain"] for buf in self._scratch.values() if "chain" in buf]

    def nbytes_per_step(self) -> int:
        """Weight bytes one Euler step streams (the floor's numerator, mods excluded)."""
        return sum(b["w12"].nbytes + b["w3"].nbytes for b in self.blocks) + self.final.nbytes + self.input_proj.nbytes

    def _scratch_for(self, m: int, dev, dtype) -> dict:
        """Per-row-count scratch, made on the first (warm-up) call so that a captured graph allocates nothing."""
        key = (m, dev)
        if key not in self._scratch:
            w = self.hoisted.temb.shape[1]
            hidden = self.blocks[0]["w3"].weight.shape[1]
            c = self.final.weight.shape[0]
            s = self.hoisted.temb.shape[0]
            rows_dtype = torch.float16 if self.weights == "fp8" else torch.bfloat16  # see kernels._triton.mma
            d = len(self.blocks)
            cublas = s * m > self.cublas_mods_above
            if cublas and self.merge_mods:  # one GEMM's output (S*M, D*3W + 2W); the blocks' and final's are views
                flat = torch.empty(s * m, d * 3 * w + 2 * w, dtype=torch.float32, device=dev)
                mods = dict(mods_flat=flat, mods_all=flat[:, :d * 3 * w].view(s * m, d, 3 * w).transpose(0, 1),
                            fmod=flat[:, d * 3 * w:])  # (D, S*M, 3W) and (S*M, 2W), row stride D*3W + 2W
            else:
                mods = dict(mods_all=torch.empty(d, s * m, 3 * w, dtype=torch.float32, device=dev),
                            fmod=torch.empty(s * m, 2 * w, dtype=torch.float32, device=dev))
            self._scratch[key] = dict(
                h=torch.empty(m, w, dtype=torch.float32, device=dev),
                xn=torch.empty(m, w, dtype=rows_dtype, device=dev),
                act=torch.empty(m, hidden, dtype=rows_dtype, device=dev),
                v=torch.empty(m, c, dtype=torch.float32, device=dev),
                cublas=cublas, **mods,
                ws_up=Workspace(hidden, m, dev), ws_down=Workspace(w, m, dev), ws_in=Workspace(w, m, dev),
                ws_final=Workspace(c, m, dev),
                parts=torch.empty(MAX_SPLIT_K, m, w, dtype=torch.float32, device=dev),  # w3's split-K sums (deferred)
            )
            if cublas:  # the modulations go to cuBLAS: their weights, not a workspace
                self._wide_mods()
            else:
                self._scratch[key]["ws_mod"] = Workspace(3 * w, min(s * m, MAX_ROWS), dev)
            if self.chain:
                from kernels.flow_chain import FlowChain

                self._scratch[key]["chain"] = FlowChain(self.blocks, m, dev, config=self.chain_config)
        return self._scratch[key]

    def _gemm_rows(self, x, lin: PackedLinear, out, ws):
        """out = x @ W^T + b for any number of rows, MAX_ROWS at a time."""
        for i in range(0, x.shape[0], MAX_ROWS):
            skinny_gemm(x[i:i + MAX_ROWS], lin.weight, out[i:i + MAX_ROWS], w_scale=lin.scale, bias=lin.bias,
                        workspace=ws)

    @torch.no_grad()
    def _wide_mods(self) -> dict:
        """The modulation weights for `_mods_cublas`: bf16 as packed, or FP8 widened exactly to fp16 with the
        per-output-channel scale kept apart (applied after the product, with the bias); with merge_mods the D + 1
        matrices stacked into one (D*3W + 2W, W) copy, with their biases and scales. Made with the scratch, at
        warm-up: never inside a CUDA graph capture."""
        if self._wide is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("KernelFlowHead: run a row count once before capturing it (warm-up)")
            lins = [blk["ada"] for blk in self.blocks] + [self.final_ada]
            fp8 = self.weights == "fp8"
            wide_dtype = torch.float16 if fp8 else lins[0].weight.dtype
            bias = [torch.zeros(lin.weight.shape[0], dtype=torch.float32, device=lin.weight.device)
                    if lin.bias is None else lin.bias for lin in lins]
            scale = [lin.scale.reshape(-1) for lin in lins] if fp8 else None
            if self.merge_mods:  # filled matrix by matrix: no second copy at warm-up (FP8 widens exactly)
                copy = torch.empty(sum(lin.weight.shape[0] for lin in lins), lins[0].weight.shape[1], dtype=wide_dtype,
                                   device=lins[0].weight.device)
                row = 0
                for lin in lins:
                    copy[row:row + lin.weight.shape[0]].copy_(lin.weight)
                    row += lin.weight.shape[0]
                self._wide = dict(fp8=fp8, weight=copy, bias=torch.cat(bias), scale=torch.cat(scale) if fp8 else None)
                copied = copy.numel() * copy.element_size()
            else:
                weights = [lin.weight.to(wide_dtype) for lin in lins]  # bf16: the packed weights themselves
                self._wide = dict(fp8=fp8, weights=weights, bias=torch.stack(bias[:-1])[:, None],
                                  fbias=bias[-1])  # (D, 1, 3W), (2W,)
                if fp8:  # the per-output-channel scales, stacked as the biases
                    self._wide.update(scale=torch.stack(scale[:-1])[:, None], fscale=scale[-1])
                copied = sum(w.numel() * w.element_size() for w in weights) if fp8 else 0  # bf16: no copy
            if copied:
                logger.info("flow head: %.0f MiB %s copy of the modulation weights for cuBLAS (> %d rows)",
                            copied / 2**20, "fp16" if fp8 else "stacked bf16", self.cublas_mods_above)
        return self._wide

    def _mods_cublas(self, sy, buf) -> None:
        """mods_all (D, S*M, 3W) and fmod (S*M, 2W), fp32, = sy @ W^T * scale + bias with cuBLAS (many rows):
        with merge_mods one GEMM into their shared (S*M, D*3W + 2W) buffer and one pass for scale and bias."""
        wide = self._wide_mods()
        # FP8: sy is fp16 already (forward rounds it); bf16: the kernel's operand type
        if self.merge_mods:
            x = sy if interpreting() else sy.to(wide["weight"].dtype)
            flat = buf["mods_flat"]
            _mm_fp32(x, wide["weight"], flat)
            if wide["fp8"]:  # per-output-channel weight scale, then bias
                torch.addcmul(wide["bias"], flat, wide["scale"], out=flat)
            else:
                flat.add_(wide["bias"])
            return
        x = sy if interpreting() else sy.to(wide["weights"][0].dtype)
        for w, out in zip(wide["weights"], list(buf["mods_all"]) + [buf["fmod"]]):
            _mm_fp32(x, w, out)
        mods = buf["mods_all"]
        if wide["fp8"]:  # per-output-channel weight scale, then bias: one pass over all blocks
            torch.addcmul(wide["bias"], mods, wide["scale"], out=mods)
            torch.addcmul(wide["fbias"], buf["fmod"], wide["fscale"], out=buf["fmod"])
        else:
            mods.add_(wide["bias"])
            buf["fmod"].add_(wide["fbias"])

    def modulation_rows(self, condition_hidden: torch.Tensor) -> torch.Tensor:
        """silu(temb + cond_embed(vis_head(hidden))) for every step and row: (B, R, H) -> (S*B*R, W), the operand of
        the modulation GEMMs (rounded to fp16 next to FP8 weights)."""
        fh = self.hoisted
        s, w = fh.temb.shape
        z = fh.vis_head(condition_hidden).reshape(condition_hidden.shape[0] * condition_hidden.shape[1], -1)  # (M, Z)
        sy = F.silu(fh.temb[:, None] + fh.net.cond_embed(z)[None]).reshape(-1, w)  # (S*M, W)
        if self.weights == "fp8":  # once per token, not in every program of the D + 1 modulation GEMMs
            sy = fp16_rows(sy)
        return sy

    @torch.no_grad()  # inference only (the kernels have no backward); the cuBLAS modulations write out=
    def forward(self, condition_hidden, noise, text_cfg, image_cfg, temperature):
        """condition_hidden (B, R, H) LLM hidden of the CFG rows; noise (B, C) -> latent (B, C) fp32."""
        b, r, _ = condition_hidden.shape
        m = b * r
        fh = self.hoisted
        s, w = fh.temb.shape
        buf = self._scratch_for(m, condition_hidden.device, condition_hidden.dtype)
        sy = self.modulation_rows(condition_hidden)  # (S*M, W)
        if buf["cublas"]:
            self._mods_cublas(sy, buf)
        else:
            for blk, mods in zip(self.blocks, buf["mods_all"]):
                self._gemm_rows(sy, blk["ada"], mods, buf["ws_mod"])
            self._gemm_rows(sy, self.final_ada, buf["fmod"], buf["ws_mod"])
        h, xn, act, v = buf["h"], buf["xn"], buf["act"], buf["v"]
        x = noise.float() * temperature  # (B, C)
        for k in range(s):
            skinny_gemm(x, self.input_proj.weight, h, w_scale=self.input_proj.scale, bias=self.input_proj.bias,
                        row_div=r, workspace=buf["ws_in"])  # (M, W): each prompt's rows share its state
            mods_k = buf["mods_all"][:, k * m:(k + 1) * m]  # (D, M, 3W) = [shift | scale | gate] per block
            pending = None  # (deferred_residual) the last w3's partials, merged into h by the next LayerNorm
            if self.chain:  # every block in one launch
                buf["chain"].step(h, xn, mods_k, self.eps)
            else:
                for blk, mk in zip(self.blocks, mods_k):
                    ln_modulate(h, mk[:, :w], mk[:, w:2 * w], xn, weight=blk["ln"][0], bias=blk["ln"][1], eps=self.eps,
                                residual=pending)
                    skinny_gemm(xn, blk["w12"].weight, act, w_scale=blk["w12"].scale, bias=blk["w12"].bias,
                                epilogue=SWIGLU, workspace=buf["ws_up"])
                    w3 = blk["w3"]
                    if self.deferred_residual:
                        splits = skinny_partials(act, w3.weight, buf["parts"])
                        pending = PendingResidual(buf["parts"], splits, mk[:, 2 * w:], w3.scale, w3.bias)
                    else:
                        skinny_gemm(act, w3.weight, h, w_scale=w3.scale, bias=w3.bias, gate=mk[:, 2 * w:],
                                    epilogue=GATED_RESIDUAL, workspace=buf["ws_down"])
            fk = buf["fmod"][k * m:(k + 1) * m]
            ln_modulate(h, fk[:, :w], fk[:, w:], xn, eps=self.eps, residual=pending)
            skinny_gemm(xn, self.final.weight, v, w_scale=self.final.scale, bias=self.final.bias,
                        workspace=buf["ws_final"])
            guide_euler_(x, v, fh.dts, k, text_cfg, image_cfg, self.renorm)
        return x


__all__ = ["WEIGHT_FORMATS", "KernelFlowHead", "PackedLinear"]
