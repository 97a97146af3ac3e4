"""The Triton decode kernels against plain PyTorch.

Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), where the dot
products are fp32: errors are then at fp32 level. On a GPU the operands are rounded to bf16 as the
kernels do, so the references round the same operands and the bounds allow for rounding flips.
The GPU-only checks (determinism of split-K across many launches, default launch configs at the
released shapes) are marked `gpu`.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the kernels need triton (the 'kernels' extra)")

from conftest import assert_close

from kernels import interpreting
from kernels.fp8 import dequantize_rows_fp8, quantize_rows_fp8
from kernels.guidance import guide_euler_
from kernels.layernorm import PendingResidual, ln_modulate
from kernels.skinny import GATED_RESIDUAL, SWIGLU, Workspace, skinny_gemm, skinny_partials
from models import build, tiny_config
from models.flow_head import guide
from models.pieces import FlowHeadPiece

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# relative bound on max error: fp32 products in the interpreter, bf16 operands on a GPU
REL = 2e-5 if interpreting() else 8e-3


def _act(x, fmt="bf16"):
    """What the kernel multiplies: fp32 in the interpreter; on a GPU, rows rounded to bf16 (bf16
    weights) or fp16 (FP8 weights, see kernels._triton.mma)."""
    if interpreting():
        return x.float()
    return x.to(torch.float16 if fmt == "fp8" else torch.bfloat16).float()


def _check(name, got, ref):
    assert_close(name, got.float(), ref.float(), REL * max(1.0, ref.abs().max().item()))


def _cfg(split):
    return None if split is None else {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split}


SPLITS = [1, 2, 3] if interpreting() else [None, 1, 2, 4]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_skinny_store(split, fmt):
    g = torch.Generator().manual_seed(1)
    m, n, k = 3, 40, 160
    x = torch.randn(m, k, generator=g).to(DEV)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g).to(DEV)
    if fmt == "fp8":
        wq, s = quantize_rows_fp8(w)
        wq, s, wref = wq.to(DEV), s.to(DEV), dequantize_rows_fp8(wq, s).to(DEV)
    else:
        wq, s = w.to(torch.bfloat16).to(DEV), None
        wref = wq.float()
    out = torch.empty(2 * m, n, device=DEV)
    skinny_gemm(x, wq, out, w_scale=s, bias=b, row_div=2, config=_cfg(split))  # rows 2i, 2i+1 read x[i]
    ref = (_act(x, fmt) @ wref.T + b).repeat_interleave(2, dim=0)
    _check(f"kernels/skinny_{fmt}_split{split}", out, ref)


@pytest.mark.parametrize("affine", [True, False])
def test_ln_modulate(affine):
    g = torch.Generator().manual_seed(2)
    m, k = 3, 200
    h = torch.randn(m, k, generator=g).to(DEV) * 3 + 1
    lnw, lnb = torch.randn(k, generator=g).to(DEV), torch.randn(k, generator=g).to(DEV)
    mods = torch.randn(m, 3 * k, generator=g).to(DEV) * 0.5
    out = torch.empty(m, k, device=DEV)
    ln_modulate(h, mods[:, :k], mods[:, k:2 * k], out, **(dict(weight=lnw, bias=lnb) if affine else {}), eps=1e-6)
    ref = F.layer_norm(h, (k,), lnw if affine else None, lnb if affine else None, 1e-6) * (1 + mods[:, k:2 * k]) + mods[:, :k]
    assert_close(f"kernels/ln_modulate_affine{int(affine)}", out, ref, 1e-5 * ref.abs().max().item())
    with pytest.raises(ValueError, match="both"):
        ln_modulate(h, mods[:, :k], mods[:, k:2 * k], out, weight=lnw)


@pytest.mark.parametrize("split", SPLITS)
def test_skinny_swiglu(split):
    g = torch.Generator().manual_seed(2)
    m, k, hid = 2, 96, 48
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
    w12 = torch.randn(2 * hid, k, generator=g).to(torch.bfloat16).to(DEV)
    b12 = torch.randn(2 * hid, generator=g).to(DEV)
    out = torch.empty(m, hid, device=DEV)
    skinny_gemm(x, w12, out, bias=b12, epilogue=SWIGLU, config=_cfg(split))
    gate, value = (x.float() @ w12.float().T + b12).chunk(2, dim=-1)
    _check(f"kernels/skinny_swiglu_split{split}", out, F.silu(gate) * value)


@pytest.mark.parametrize("split", SPLITS)
def test_skinny_gated_residual_in_place(split):
    g = torch.Generator().manual_seed(3)
    m, n, k = 4, 48, 128
    h = torch.randn(m, n, generator=g).to(DEV)
    act = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
    wq, s = quantize_rows_fp8(torch.randn(n, k, generator=g))
    wq, s = wq.to(DEV), s.to(DEV)
    b = torch.randn(n, generator=g).to(DEV)
    mods = torch.randn(m, 3 * n, generator=g).to(DEV)
    ref = h + mods[:, 2 * n:] * (act.float() @ dequantize_rows_fp8(wq, s).T + b)
    skinny_gemm(act, wq, h, w_scale=s, bias=b, gate=mods[:, 2 * n:], epilogue=GATED_RESIDUAL, config=_cfg(split))
    _check(f"kernels/skinny_gated_residual_split{split}", h, ref)


@pytest.mark.parametrize("split", [s for s in SPLITS if s is not None])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_deferred_residual_equals_the_gemms_own_merge(split, fmt):
    """w3 storing raw split-K partials (skinny_partials) and the next LayerNorm merging them (ln_modulate's
    residual) give the gated-residual GEMM's h and the LayerNorm's rows: the same sums in the same order
    (bit for bit in the interpreter; on a GPU within a rounding of fp32, in case the compiler contracts
    differently). Checked against plain PyTorch too, and a merge that skipped a split would fail."""
    g = torch.Generator().manual_seed(4)
    m, n, k = 3, 48, 160
    h0 = torch.randn(m, n, generator=g).to(DEV)
    act = torch.randn(m, k, generator=g).to(torch.float16 if fmt == "fp8" else torch.bfloat16).to(DEV)
    if fmt == "fp8":
        wq, s = quantize_rows_fp8(torch.randn(n, k, generator=g))
        wq, s = wq.to(DEV), s.to(DEV)
        wref = dequantize_rows_fp8(wq, s)
    else:
        wq, s = torch.randn(n, k, generator=g).to(torch.bfloat16).to(DEV), None
        wref = wq.float()
    b = torch.randn(n, generator=g).to(DEV)
    mods = torch.randn(m, 3 * n, generator=g).to(DEV) * 0.5
    lnw, lnb = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    cfg = _cfg(split)

    h_ref, xn_ref = h0.clone(), torch.empty(m, n, device=DEV)
    skinny_gemm(act, wq, h_ref, w_scale=s, bias=b, gate=mods[:, 2 * n:], epilogue=GATED_RESIDUAL, config=cfg)
    ln_modulate(h_ref, mods[:, :n], mods[:, n:2 * n], xn_ref, weight=lnw, bias=lnb)

    parts = torch.full((split + 1, m, n), float("nan"), device=DEV)  # the row beyond the splits is never read
    assert skinny_partials(act, wq, parts, config=cfg) == split
    h, xn = h0.clone(), torch.empty(m, n, device=DEV)
    ln_modulate(h, mods[:, :n], mods[:, n:2 * n], xn, weight=lnw, bias=lnb,
                residual=PendingResidual(parts, split, mods[:, 2 * n:], s, b))
    if interpreting():
        assert torch.equal(h, h_ref) and torch.equal(xn, xn_ref)
    else:
        assert_close(f"kernels/deferred_residual_{fmt}_split{split}_h", h, h_ref, 1e-6 * h_ref.abs().max().item())
        assert_close(f"kernels/deferred_residual_{fmt}_split{split}_xn", xn, xn_ref, 1e-5 * xn_ref.abs().max().item())
    _check(f"kernels/deferred_residual_{fmt}_split{split}_vs_torch", h,
           h0 + mods[:, 2 * n:] * (_act(act, fmt) @ wref.T + b))
    assert torch.isnan(parts[split:]).all()
    if split > 1:  # the merge reads the splits it is given: with the first one zeroed h differs
        h_short, zeroed = h0.clone(), parts.clone()
        zeroed[0] = 0
        ln_modulate(h_short, mods[:, :n], mods[:, n:2 * n], xn, weight=lnw, bias=lnb,
                    residual=PendingResidual(zeroed, split, mods[:, 2 * n:], s, b))
        assert not torch.allclose(h_short, h_ref)


def test_deferred_residual_rejects_bad_operands():
    from kernels.skinny import PARTIALS

    x = torch.randn(3, 32, device=DEV)
    w = torch.randn(8, 32, device=DEV).to(torch.bfloat16)
    with pytest.raises(ValueError, match="skinny_partials"):  # its layout is not `out`'s
        skinny_gemm(x, w, torch.empty(3, 8, device=DEV), epilogue=PARTIALS)
    with pytest.raises(ValueError, match="partials"):
        skinny_partials(x, w, torch.empty(2, 3, 8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="bad operands"):
        skinny_partials(x[:2], w, torch.empty(2, 3, 8, device=DEV))
    with pytest.raises(ValueError, match="splits K 4 ways"):
        skinny_partials(x, w, torch.empty(2, 3, 8, device=DEV), config={"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 4})
    h, mods = torch.randn(3, 8, device=DEV), torch.randn(3, 24, device=DEV)
    parts = torch.zeros(2, 3, 8, device=DEV)
    for bad in (PendingResidual(parts, 3, mods[:, 16:]), PendingResidual(parts, 1, mods[:2, 16:]),
                PendingResidual(parts[:, :2], 1, mods[:, 16:])):
        with pytest.raises(ValueError, match="pending residual"):
            ln_modulate(h, mods[:, :8], mods[:, 8:16], torch.empty(3, 8, device=DEV), residual=bad)
    with pytest.raises(ValueError, match="pending residual"):  # x must be the fp32 residual stream
        ln_modulate(h.half(), mods[:, :8], mods[:, 8:16], torch.empty(3, 8, device=DEV),
                    residual=PendingResidual(parts, 1, mods[:, 16:]))


def test_skinny_rejects_bad_operands():
    x = torch.randn(3, 16, device=DEV)
    w = torch.randn(8, 32, device=DEV).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bad operands"):
        skinny_gemm(x, w, torch.empty(3, 8, device=DEV))
    with pytest.raises(ValueError, match="rows"):
        skinny_gemm(torch.randn(65, 32, device=DEV), w, torch.empty(65, 8, device=DEV))
    with pytest.raises(ValueError, match="row_div"):
        skinny_gemm(torch.randn(3, 32, device=DEV), w, torch.empty(4, 8, device=DEV), row_div=2)
    with pytest.raises(ValueError, match="gate"):
        skinny_gemm(torch.randn(3, 32, device=DEV), w, torch.empty(3, 8, device=DEV), epilogue=GATED_RESIDUAL)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("renorm", [False, True])
def test_guide_euler_matches_guide(rows, renorm):
    g = torch.Generator().manual_seed(4)
    b, c = 2, 16
    v = torch.randn(b * rows, c, generator=g).to(DEV)
    x = torch.randn(b, c, generator=g).to(DEV)
    dts = torch.rand(4, generator=g).to(DEV)
    tc, ic = torch.tensor([2.5], device=DEV), torch.tensor([1.3], device=DEV)
    ref = x + guide(v.view(b, rows, c), tc, ic, renorm) * dts[2]
    guide_euler_(x, v, dts, 2, tc, ic, renorm)
    assert_close(f"kernels/guide_euler_r{rows}_renorm{int(renorm)}", x, ref, 1e-5)


@torch.no_grad()
def test_fp8_linear_streams_fp8_for_decode_rows_only():
    """Decode rows (<= 64) take the FP8 copy; a prefill keeps the exact original layer."""
    from kernels.skinny import MAX_ROWS
    from runtime.fast.decode_weights import FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, device=DEV, dtype=torch.bfloat16)
    fp8 = FP8Linear(lin)
    prefill = torch.randn(2, MAX_ROWS, 256, device=DEV, dtype=torch.bfloat16)  # 128 rows
    assert torch.equal(fp8(prefill), lin(prefill))
    decode = torch.randn(2, 1, 256, device=DEV, dtype=torch.bfloat16)
    w = dequantize_rows_fp8(fp8.weight_fp8, fp8.scale)  # what the kernel streams
    ref = (decode.float() @ w.float().T + lin.bias.float()).to(torch.bfloat16)
    got = fp8(decode)
    assert got.shape == (2, 1, 96) and not torch.equal(got, lin(decode))
    assert_close("kernels/fp8_linear_decode", got.float(), ref.float(), 0.05)


@pytest.mark.parametrize("kind", ["expert_mlp", "swiglu_ffn"])
@torch.no_grad()
def test_fused_swiglu_decode_equals_its_fp8_reference(kind):
    """One SwiGLU-epilogue launch over [gate; up] + the FP8 down projection = the MLP on the FP8 weights;
    a prefill runs the original module exactly."""
    from kernels.skinny import MAX_ROWS
    from models.llm import ExpertMLP
    from models.vit_layers import SwiGLUFFN
    from runtime.fast.decode_weights import FP8Linear, FusedSwiGLUDecode

    torch.manual_seed(0)
    mlp = (ExpertMLP(256, 96) if kind == "expert_mlp" else SwiGLUFFN(256, 1.0)).to(DEV, torch.bfloat16)
    fused = FusedSwiGLUDecode(mlp)
    assert isinstance(fused.down, FP8Linear) and fused.reference is mlp
    prefill = torch.randn(2, MAX_ROWS, 256, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(fused(prefill), mlp(prefill))
    x = torch.randn(3, 1, 256, device=DEV, dtype=torch.bfloat16)
    w12 = dequantize_rows_fp8(fused.w12_fp8, fused.scale12)
    y = _act(x, "fp8") @ w12.T + (0 if fused.bias12 is None else fused.bias12)
    gate, up = y.chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(torch.float16).float()  # the epilogue stores fp16 for the FP8 down GEMM
    down = fused.down
    ref = act @ dequantize_rows_fp8(down.weight_fp8, down.scale).T + (0 if down.bias is None else down.bias)
    got = fused(x)
    assert got.shape == (3, 1, 256) and got.dtype == torch.bfloat16
    assert_close(f"kernels/fused_swiglu_{kind}", got.float(), ref.float(), 0.02)


@pytest.mark.parametrize("fmt", ["fp32", "fp8"])
def test_fused_moe_equals_reference_moe(fmt, monkeypatch):
    from models.llm import MoE
    from runtime.fast.decode_weights import SHARED_IN_MOE_ENV, FusedMoEDecode

    monkeypatch.delenv(SHARED_IN_MOE_ENV, raising=False)  # the default: FP8 shared experts as slots

    model = build(tiny_config(), seed=0, device=DEV)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(1, 5, model.cfg.llm.hidden_size, device=DEV)
    if fmt == "fp8":  # the reference runs on the dequantized weights, the shared experts' too
        fused = FusedMoEDecode(moe, "fp8")
        n_sh, e = fused.shared_slots, moe.num_experts
        assert n_sh == model.cfg.llm.num_shared_experts and fused.wg.shape[0] == e + n_sh
        sh = moe.shared_experts
        with torch.no_grad():
            deq = [dequantize_rows_fp8(q, s) for q, s in zip((fused.wg, fused.wu, fused.wd), (fused.sg, fused.su, fused.sd))]
            for p, d in zip((moe.w_gate, moe.w_up, moe.w_down), deq):
                p.copy_(d[:e])
            sh.gate_proj.weight.copy_(deq[0][e:].reshape(-1, deq[0].shape[-1]))
            sh.up_proj.weight.copy_(deq[1][e:].reshape(-1, deq[1].shape[-1]))
            sh.down_proj.weight.copy_(deq[2][e:].transpose(0, 1).reshape(deq[2].shape[1], -1))
    else:
        fused = FusedMoEDecode(moe, "bf16")  # keeps the model's own (here fp32) tensors: no copy
        assert fused.wg.data_ptr() == moe.w_gate.data_ptr()
    moe.fused_decode = fused
    with torch.no_grad():
        got, ref = moe(x, mode="fused"), moe(x, mode="loop")
    # FP8: the SwiGLU activations between the two GEMMs are kept in fp16 (11 significant bits)
    rel = 2e-3 if fmt == "fp8" else 2e-5
    assert_close(f"kernels/moe_fused_{fmt}", got, ref, rel * max(1.0, ref.abs().max().item()))


@torch.no_grad()
def test_fp8_moe_runs_the_shared_experts_as_slots(monkeypatch):
    """With FP8 the shared experts ride in the MoE kernels as extra slots of weight 1: the fused MoE's
    output equals routed + shared computed apart (both from the same FP8 weights), the separate shared
    MLP is not called, and MINGRT_MOE_SHARED=0 (or shared=False) keeps it separate."""
    from models.llm import MoE
    from runtime.fast.decode_weights import SHARED_IN_MOE_ENV, FusedMoEDecode, FusedSwiGLUDecode

    monkeypatch.delenv(SHARED_IN_MOE_ENV, raising=False)  # the default: FP8 shared experts as slots
    model = build(tiny_config(), seed=0, device=DEV)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(1, 4, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(9)).to(DEV)
    apart = FusedMoEDecode(moe, "fp8", shared=False)
    folded = FusedMoEDecode(moe, "fp8")
    assert apart.shared_slots == 0 and folded.shared_slots == model.cfg.llm.num_shared_experts
    assert torch.equal(folded.wg[:moe.num_experts], apart.wg) and torch.equal(folded.wd[:moe.num_experts], apart.wd)
    shared_mlp = moe.shared_experts
    # the shared MLP with the folded FP8 weights (dequantized), called apart
    fp8_shared = type(shared_mlp)(shared_mlp.gate_proj.in_features, shared_mlp.gate_proj.out_features).to(DEV)
    e = moe.num_experts
    fp8_shared.gate_proj.weight.copy_(dequantize_rows_fp8(folded.wg[e:], folded.sg[e:]).reshape(-1, x.shape[-1]))
    fp8_shared.up_proj.weight.copy_(dequantize_rows_fp8(folded.wu[e:], folded.su[e:]).reshape(-1, x.shape[-1]))
    fp8_shared.down_proj.weight.copy_(dequantize_rows_fp8(folded.wd[e:], folded.sd[e:]).transpose(0, 1).reshape(x.shape[-1], -1))
    calls = []
    fp8_shared.register_forward_hook(lambda *_: calls.append(1))
    moe.shared_experts = fp8_shared
    moe.fused_decode = apart
    ref = moe(x, mode="fused")
    assert len(calls) == 1
    moe.fused_decode = folded
    got = moe(x, mode="fused")
    assert len(calls) == 1  # not called again: the kernel ran it
    assert_close("kernels/moe_shared_as_slots", got.float(), ref.float(), 2e-3 * max(1.0, ref.abs().max().item()))
    flat = x.reshape(-1, x.shape[-1])
    routed_only = apart(flat, *moe.route(flat, None)[:2]).view_as(got)
    assert not torch.allclose(got.float(), routed_only, atol=1e-3)  # the shared experts' share is in there
    # forward takes the ids routed only (width k: it appends the shared slots) or already with them (k + n)
    ids, w = moe.route(flat, None)[:2]
    n = folded.shared_slots
    with_shared = (torch.cat([ids, folded.shared_ids.to(ids.dtype).expand(len(ids), -1)], 1),
                   torch.cat([w, w.new_ones(len(w), n)], 1))
    assert torch.equal(folded(flat, ids, w), folded(flat, *with_shared))
    with pytest.raises(ValueError, match=f"width {ids.shape[1] - 1}: expected {ids.shape[1]} routed or {ids.shape[1] + n}"):
        folded(flat, ids[:, 1:], w[:, 1:])
    with pytest.raises(ValueError, match="weights of the ids' shape"):
        folded(flat, ids, w[:, 1:])
    monkeypatch.setenv(SHARED_IN_MOE_ENV, "0")
    assert FusedMoEDecode(moe, "fp8").shared_slots == 0
    assert FusedMoEDecode(moe, "bf16", shared=True).shared_slots == 0  # bf16 reads the stacked parameters in place
    monkeypatch.setenv(SHARED_IN_MOE_ENV, "2")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        FusedMoEDecode(moe, "fp8")
    monkeypatch.delenv(SHARED_IN_MOE_ENV)
    moe.shared_experts = FusedSwiGLUDecode(shared_mlp)  # prepared for FP8 before: the original weights are found
    assert torch.equal(FusedMoEDecode(moe, "fp8").wg, folded.wg)


def test_table_lookups_for_the_new_launch_forms(monkeypatch):
    """The launch-config tables as a GPU reads them (not the interpreter's fixed configs): the partials GEMM
    (e3) takes its own entry, else the gated-residual GEMM's (e2); the MoE with 8 slots a row takes its _k8
    entry, else the 6-slot entry with DOWN_SPLIT lowered to a divisor of 8; 6 slots keep theirs."""
    from kernels import moe as moe_module
    from kernels import skinny as skinny_module
    from kernels.skinny import PARTIALS, config_key

    monkeypatch.setattr(skinny_module, "interpreting", lambda: False)
    monkeypatch.setattr(moe_module, "interpreting", lambda: False)
    e2 = {"BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 4, "num_warps": 2}
    e3 = {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4}
    six = {"BLOCK_N": 32, "BLOCK_K": 256, "DOWN_SPLIT": 6}
    table = {"skinny": {config_key(2, 3072, 8192, True, GATED_RESIDUAL): e2},
             "moe": {"h2048_i1408_fp8": six}}
    monkeypatch.setattr(skinny_module, "_TUNED", table)
    assert skinny_module.pick_config(2, 3072, 8192, True, PARTIALS) == e2
    table["skinny"][config_key(2, 3072, 8192, True, PARTIALS)] = e3
    assert skinny_module.pick_config(2, 3072, 8192, True, PARTIALS) == e3
    assert skinny_module.pick_config(2, 3072, 8192, True, GATED_RESIDUAL) == e2
    assert moe_module.pick_config(2048, 1408, True, k=6) == six
    assert moe_module.pick_config(2048, 1408, True, k=8) == dict(six, DOWN_SPLIT=4)
    assert moe_module.pick_config(2048, 1408, True, k=7) == dict(six, DOWN_SPLIT=1)
    table["moe"]["h2048_i1408_fp8_k8"] = dict(six, DOWN_SPLIT=8)
    assert moe_module.pick_config(2048, 1408, True, k=8)["DOWN_SPLIT"] == 8
    assert table["moe"]["h2048_i1408_fp8"] == six  # the lookups copy, never change the table


def test_a_swapped_or_edited_launch_table_reaches_the_next_launch(monkeypatch):
    """The A/B scripts' hook (kernels.skinny.launch_table / use_launch_table): a swapped table and an entry added in
    place are what the next pick_config reads, per-slot and grouped apart; the swap hands back the old table."""
    from kernels import moe as moe_module
    from kernels import skinny as skinny_module

    monkeypatch.setattr(skinny_module, "_TUNED", {})  # the machine's table, whatever it is, comes back afterwards
    monkeypatch.setattr(moe_module, "interpreting", lambda: False)
    per_slot = {"BLOCK_N": 32, "BLOCK_K": 256, "DOWN_SPLIT": 2}
    table = {"moe": {"h2048_i1408_fp8_k8": per_slot}}
    assert skinny_module.use_launch_table(table) == {} and skinny_module.launch_table() is table
    assert moe_module.pick_config(2048, 1408, True, k=8) == per_slot
    assert moe_module.pick_config(2048, 1408, True, grouped=True, k=8) == moe_module.GROUPED_DEFAULT
    skinny_module.launch_table().setdefault("moe_grouped", {})["h2048_i1408_fp8_k8"] = dict(per_slot, num_warps=2)
    assert moe_module.pick_config(2048, 1408, True, grouped=True, k=8) == dict(per_slot, num_warps=2)
    two_rows = dict(per_slot, BLOCK_N=16)  # an entry for one row-count bucket serves that bucket only
    table["moe"]["h2048_i1408_fp8_k8_m2"] = two_rows
    assert moe_module.pick_config(2048, 1408, True, k=8, rows=2) == two_rows
    assert moe_module.pick_config(2048, 1408, True, k=8, rows=3) == per_slot  # bucket 4: the k8 entry
    assert moe_module.pick_config(2048, 1408, True, k=8) == per_slot
    assert moe_module.pick_config(2048, 1408, True, grouped=True, k=8, rows=2) == dict(per_slot, num_warps=2)
    assert skinny_module.use_launch_table({}) is table
    assert "DOWN_SPLIT" not in moe_module.pick_config(2048, 1408, True, k=8)  # the untabled default again


def test_moe_decode_asks_for_its_row_count_config(monkeypatch):
    """moe_decode looks its launch config up with its row count (the table's row-bucket entries)."""
    from kernels import moe as moe_module

    asked = []
    real = moe_module.pick_config

    def recording(*args, **kw):
        asked.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(moe_module, "pick_config", recording)
    x, ids, w, wg, wu, wd = _small_moe([[4, 0, 2], [4, 1, 3], [5, 6, 7]], e=8, h=40, seed=6)
    moe_module.moe_decode(x, ids, w, wg, wu, wd, grouped=False)
    assert asked == [((40, 48, False, False, 3), {"rows": 3})]


def test_grouped_by_default_bounds(monkeypatch):
    """grouped_by_default (what moe_tiles_ab.py times): grouped from grouped_min_rows rows up to MAX_TICKET_ROWS, where
    the grouped kernels are supported. (That moe_decode launches what it says: the grouped-vs-reference test.)"""
    from kernels import moe as moe_module

    monkeypatch.setattr(moe_module, "grouped_supported", lambda: True)
    fp8_min, bf16_min = moe_module.grouped_min_rows(True), moe_module.grouped_min_rows(False)
    assert not moe_module.grouped_by_default(fp8_min - 1, True) and moe_module.grouped_by_default(fp8_min, True)
    assert not moe_module.grouped_by_default(bf16_min - 1, False) and moe_module.grouped_by_default(bf16_min, False)
    assert not moe_module.grouped_by_default(moe_module.MAX_TICKET_ROWS + 1, True)
    monkeypatch.setattr(moe_module, "grouped_supported", lambda: False)
    assert not moe_module.grouped_by_default(16, True)


def test_moe_down_kernel_takes_its_own_tile_and_expert_split(monkeypatch):
    """DOWN_BLOCK_N / DOWN_BLOCK_K retile only the down kernel and DOWN_SPLIT spreads each row's experts
    over programs: the same sums as one shared tile, the gate_up kernel's launch untouched, and the
    split's tickets re-armed (a second call gives the same bits)."""
    from kernels import moe as moe_module
    from kernels.moe import down_candidates, moe_decode, split_config

    x, ids, w, wg, wu, wd = _small_moe([[4, 0, 2], [1, 4, 5]], e=6, h=40, seed=0)
    t, k = ids.shape
    shared = {"BLOCK_N": 32, "BLOCK_K": 32}
    own = dict(shared, DOWN_BLOCK_N=16, DOWN_BLOCK_K=64)
    split = dict(own, DOWN_SPLIT=3)
    assert split_config(own) == (shared, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_E": 1})
    assert split_config(split)[1]["SPLIT_E"] == 3
    cands = down_candidates({"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4})
    assert all("DOWN_BLOCK_N" in c and 6 % c["DOWN_SPLIT"] == 0 for c in cands)
    assert {c["DOWN_SPLIT"] for c in cands} == {1, 2, 3, 6}
    assert len({tuple(sorted(c.items())) for c in cands}) == len(cands) and all(c["num_warps"] == 4 for c in cands)
    tiles = moe_module.candidate_configs()  # every tile at 2 and at 4 warps (2 won with FP8 on the H200)
    assert {c["num_warps"] for c in tiles} == {2, 4} and len(tiles) == 2 * len(moe_module.candidate_configs((4,)))
    launches = []

    class Recorder:  # what the down kernel is launched with
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*a, **kw):
                launches.append((grid, kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_E"]))
                return self.kernel[grid](*a, **kw)
            return run

    monkeypatch.setattr(moe_module, "_down_kernel", Recorder(moe_module._down_kernel))
    per_slot = functools.partial(moe_decode, grouped=False)  # 2 rows would take the grouped kernels
    a, b = per_slot(x, ids, w, wg, wu, wd, config=shared), per_slot(x, ids, w, wg, wu, wd, config=own)
    c1, c2 = (per_slot(x, ids, w, wg, wu, wd, config=split) for _ in range(2))
    # H=40: 2 blocks of 32, 3 of 16; the split: 3 programs per block
    assert launches == [((t, 2, 1), 32, 32, 1), ((t, 3, 1), 16, 64, 1), ((t, 3, 3), 16, 64, 3), ((t, 3, 3), 16, 64, 3)]
    ref = torch.stack([sum(w[r, j] * F.linear(F.silu(F.linear(x[r], wg[ids[r, j]])) * F.linear(x[r], wu[ids[r, j]]),
                                              wd[ids[r, j]]) for j in range(k)) for r in range(t)])
    _check("kernels/moe_down_own_tile", b, ref)
    _check("kernels/moe_down_own_tile_vs_shared", b, a)
    _check("kernels/moe_down_expert_split", c1, ref)
    assert torch.equal(c1, c2)
    with pytest.raises(ValueError, match="divide"):
        per_slot(x, ids, w, wg, wu, wd, config=dict(own, DOWN_SPLIT=2))


@pytest.mark.parametrize("fmt", ["fp32", "fp8"])
@pytest.mark.parametrize("rows", [1, 2, 5, 20])
def test_grouped_moe_equals_the_reference_and_the_per_slot_kernels(fmt, rows, monkeypatch):
    """The grouped kernels (one program per expert, its rows in one tile): the reference sums with rows
    that share every expert (a prompt's CFG rows), experts no row chose (1, 2 and 5 rows) and more rows than
    a 16-wide tile (20); a program per slot (1 row; 2 rows: 6 slots, 8 experts, each chosen twice) and per expert (5 and 20 rows); the tickets re-armed (all zero after, a second call gives the same bits); the
    per-slot kernels' result (to fp32 rounding in the interpreter); moe_decode choosing them from
    grouped_min_rows(fp8) rows on, and a config's "GROUPED" choosing without reaching the launch."""
    from kernels import _triton
    from kernels import moe as moe_module
    from kernels.moe import grouped_min_rows, grouped_supported, moe_decode

    if not grouped_supported():
        pytest.skip("the grouped MoE kernels need triton >= 3.5 on a GPU")
    g = torch.Generator().manual_seed(2)
    e, i, h, k = 8, 48, 40, 3
    ws = [torch.randn(e, i, h, generator=g) * 0.1, torch.randn(e, i, h, generator=g) * 0.1, torch.randn(e, h, i, generator=g) * 0.1]
    scales = None
    if fmt == "fp8":
        q = [quantize_rows_fp8(w) for w in ws]
        ws, scales = [w.to(DEV) for w, _ in q], tuple(sc.to(DEV) for _, sc in q)
        ref_ws = [dequantize_rows_fp8(w, sc) for w, sc in zip(ws, scales)]
    else:
        ws = ref_ws = [w.to(DEV) for w in ws]
    ids = torch.tensor([[4, 0, 2], [4, 0, 2], [1, 4, 5], [7, 6, 3], [2, 1, 0]][:rows])  # expert 3 only in row 3
    ids = torch.cat([ids, *(torch.randperm(e, generator=g)[None, :k] for _ in range(rows - len(ids)))]).to(DEV)
    x = torch.randn(rows, h, generator=g).to(DEV)
    w = torch.rand(rows, k, generator=g).to(DEV)
    wg, wu, wd = (t.float() for t in ref_ws)
    act = lambda r, j: F.silu(F.linear(_act(x[r], fmt), wg[ids[r, j]])) * F.linear(_act(x[r], fmt), wu[ids[r, j]])
    ref = torch.stack([sum(w[r, j] * F.linear(_act(act(r, j), fmt), wd[ids[r, j]]) for j in range(k)) for r in range(rows)])
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(moe_module, name)

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append((self.name, grid))
                assert "GROUPED" not in kw
                return self.kernel[grid](*args, **kw)
            return run

    for name in ("_gate_up_grouped_kernel", "_down_grouped_kernel", "_gate_up_kernel"):
        monkeypatch.setattr(moe_module, name, Recorder(name))
    cfg = {"BLOCK_N": 32, "BLOCK_K": 32}
    a, b = (moe_decode(x, ids, w, *ws, scales, config=cfg, grouped=True) for _ in range(2))
    tix = _triton._BUFFERS[("tickets", "moe_decode", _triton.device_key(DEV))]
    assert not tix.any()  # every ticket re-armed
    per_slot = moe_decode(x, ids, w, *ws, scales, config=cfg, grouped=False)
    programs = rows * k if rows * k < e else e  # a program per slot where there are fewer slots than experts
    assert launches == [("_gate_up_grouped_kernel", (programs, 2)), ("_down_grouped_kernel", (programs, 2))] * 2 + [("_gate_up_kernel", (rows * k, 2))]
    launches.clear()
    min_rows = grouped_min_rows(fmt == "fp8")
    assert torch.equal(moe_decode(x, ids, w, *ws, scales, config=dict(cfg, GROUPED=rows < min_rows)),
                       a if rows < min_rows else per_slot)
    assert launches[0][0] == ("_gate_up_grouped_kernel" if rows < min_rows else "_gate_up_kernel")
    rel = 2e-3 if fmt == "fp8" else REL
    assert_close(f"kernels/moe_grouped_{fmt}_{rows}", a, ref, rel * max(1.0, ref.abs().max().item()))
    assert torch.equal(a, b)
    # the interpreter's fp32 dots: the same products, summed by the CPU's BLAS in an order that can depend on the
    # tile's width (and the CPU: 20 rows parted in the last bit on an AMD EPYC), so fp32 rounding apart
    near = 1e-6 if interpreting() else rel
    assert_close(f"kernels/moe_grouped_vs_per_slot_{fmt}_{rows}", a, per_slot, near * max(1.0, ref.abs().max().item()))
    launches.clear()
    moe_decode(x, ids, w, *ws, scales, config=cfg)
    assert launches[0][0] == ("_gate_up_grouped_kernel" if rows >= min_rows else "_gate_up_kernel")
    assert (launches[0][0] == "_gate_up_grouped_kernel") == moe_module.grouped_by_default(rows, fmt == "fp8")


def _small_moe(ids, e: int, h: int, seed: int, i: int = 48):
    """(x, ids, weights, w_gate, w_up, w_down) of a small MoE on DEV: random rows for the routing `ids` (a list)."""
    g = torch.Generator().manual_seed(seed)
    wg, wu = (torch.randn(e, i, h, generator=g).to(DEV) * 0.1 for _ in range(2))
    wd = torch.randn(e, h, i, generator=g).to(DEV) * 0.1
    ids = torch.tensor(ids, device=DEV)
    t, k = ids.shape
    return torch.randn(t, h, generator=g).to(DEV), ids, torch.rand(t, k, generator=g).to(DEV), wg, wu, wd


@pytest.mark.parametrize("ids", [[[4, 0, 2], [4, 1, 3]], [[1, 2, 3], [4, 5, 6]], [[0, 1, 2], [3, 4, 5], [6, 7, 0]]],
                         ids=["partly shared", "disjoint", "9 of 8 slots"])
def test_grouped_moe_each_expert_once(ids):
    """The grouped grid's per-slot form (fewer slots than experts): only the first slot of an expert works, so a
    row's tickets get exactly k arrivals. Rows sharing some experts, none, and one slot more than experts (the
    per-expert grid): the per-slot kernels' result (bit for bit in the interpreter) and every ticket re-armed."""
    from kernels import _triton
    from kernels.moe import grouped_supported, moe_decode

    if not grouped_supported():
        pytest.skip("the grouped MoE kernels need triton >= 3.5 on a GPU")
    x, ids, w, wg, wu, wd = _small_moe(ids, e=8, h=40, seed=4)
    cfg = {"BLOCK_N": 32, "BLOCK_K": 32}
    got = moe_decode(x, ids, w, wg, wu, wd, config=cfg, grouped=True)
    assert not _triton._BUFFERS[("tickets", "moe_decode", _triton.device_key(DEV))].any()
    ref = moe_decode(x, ids, w, wg, wu, wd, config=cfg, grouped=False)
    if interpreting():
        assert torch.equal(got, ref)
    else:
        _check("kernels/moe_grouped_each_expert_once", got, ref)


@pytest.mark.parametrize("rows", [2, 16])
def test_experimental_expert_group_down_kernel_sums_every_slot(rows):
    """benchmarks/moe_down_groups.py's down kernel (an experiment: a program per H block and group of chosen
    experts, the last group to arrive summing the groups' partials): every row's weighted expert products, FP8
    scales included, for groups of 1 and 3 experts; its tickets re-armed."""
    if not interpreting():
        pytest.skip("checked in the interpreter; the GPU run is benchmarks/moe_down_groups.py itself")
    import triton

    from benchmarks.moe_down_groups import _down_groups_kernel, routing
    from kernels._triton import next_pow2

    routed, k_routed, shared, h, i = 12, 3, 2, 64, 48
    e, k = routed + shared, k_routed + shared
    gen = torch.Generator().manual_seed(rows)
    ids = routing(rows // 2, routed, k_routed, shared, gen)
    topw = torch.rand(rows, k, generator=gen)
    wd, sd = quantize_rows_fp8(torch.randn(e, h, i, generator=gen) * 0.1)
    act = torch.randn(rows * k, i, generator=gen).to(torch.float16)
    ref = torch.stack([sum(topw[r, j] * dequantize_rows_fp8(wd[ids[r, j]], sd[ids[r, j]]) @ act[r * k + j].float()
                           for j in range(k)) for r in range(rows)])
    for group in (1, 3):
        y, tickets = torch.zeros(rows, h), torch.zeros(triton.cdiv(h, 32), dtype=torch.int32)
        part = torch.empty(min(rows * k, e) * rows * h)
        _down_groups_kernel[(triton.cdiv(h, 32), triton.cdiv(min(rows * k, e), group))](
            act, ids, topw, wd, sd, y, part, tickets, rows, h, i, y.stride(0), TOPK=k, BLOCK_J=next_pow2(k),
            BLOCK_E=next_pow2(e), BLOCK_M=max(16, next_pow2(rows)), GROUP=group, BLOCK_N=32, BLOCK_K=32, PDL=0, WIDEN=0)
        assert_close(f"kernels/moe_down_groups_{rows}_{group}", y, ref, 1e-5 * ref.abs().max().item())
        assert not tickets.any()


def test_grouped_min_rows_from_the_environment(monkeypatch):
    import os

    from kernels import moe
    from kernels.moe import GROUPED_MIN_ROWS_ENV, _grouped_min_rows, grouped_min_rows

    if not os.environ.get(GROUPED_MIN_ROWS_ENV):  # the shipped choice (read at import): FP8's 2 CFG rows per slot
        assert (grouped_min_rows(False), grouped_min_rows(True)) == (2, 3)
    monkeypatch.delenv(GROUPED_MIN_ROWS_ENV, raising=False)
    assert (_grouped_min_rows(2), _grouped_min_rows(3)) == (2, 3)
    monkeypatch.setenv(GROUPED_MIN_ROWS_ENV, "4")
    assert (_grouped_min_rows(2), _grouped_min_rows(3)) == (4, 4)
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(GROUPED_MIN_ROWS_ENV, bad)
        with pytest.raises(ValueError, match=GROUPED_MIN_ROWS_ENV):
            _grouped_min_rows(2)
    monkeypatch.setattr(moe, "GROUPED_MIN_ROWS", 5)
    monkeypatch.setattr(moe, "GROUPED_MIN_ROWS_FP8", 7)
    assert (grouped_min_rows(False), grouped_min_rows(True)) == (5, 7)


def test_decode_kernels_reuse_their_scratch(monkeypatch):
    """Eager calls of the MoE and attention kernels hand their kernels activations and partials from one
    reserved buffer each (kernels._triton.scratch), not a fresh allocation each time."""
    from kernels import _triton
    from kernels import attention as attention_module
    from kernels import moe as moe_module
    from kernels.attention import decode_attention
    from kernels.moe import grouped_supported, moe_decode, reserve_scratch

    if not grouped_supported():
        pytest.skip("the grouped MoE kernels need triton >= 3.5 on a GPU")
    seen = []  # (kernel, data_ptr of its scratch argument)

    class Recorder:  # argument 6 is the activations (gate_up kernels) or the partials (down, attention)
        def __init__(self, module, name):
            self.name, self.kernel = name, getattr(module, name)

        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append((self.name, args[6].data_ptr()))
                return self.kernel[grid](*args, **kw)
            return run

    for name in ("_gate_up_grouped_kernel", "_down_grouped_kernel", "_gate_up_kernel", "_down_kernel"):
        monkeypatch.setattr(moe_module, name, Recorder(moe_module, name))
    monkeypatch.setattr(attention_module, "_decode_attention_kernel", Recorder(attention_module, "_decode_attention_kernel"))
    g = torch.Generator().manual_seed(3)
    e, i, h, k, t = 4, 32, 32, 2, 3
    ws = [torch.randn(e, i, h, generator=g).to(DEV), torch.randn(e, i, h, generator=g).to(DEV), torch.randn(e, h, i, generator=g).to(DEV)]
    x, w = torch.randn(t, h, generator=g).to(DEV), torch.rand(t, k, generator=g).to(DEV)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0]], device=DEV)
    reserve_scratch(DEV, h, i, k, x.dtype, rows=8)
    dev = _triton.device_key(DEV)
    act, part = (_triton._BUFFERS[("scratch", name, dev, dt)].data_ptr() for name, dt in (("moe_decode_act", x.dtype),
                                                                               ("moe_decode_part", torch.float32)))
    for grouped in (True, False, True):
        moe_decode(x, ids, w, *ws, config={"BLOCK_N": 16, "BLOCK_K": 32, "DOWN_SPLIT": 2}, grouped=grouped)
    want = [("_gate_up_grouped_kernel", act), ("_down_grouped_kernel", part), ("_gate_up_kernel", act), ("_down_kernel", part)]
    assert seen == want[:2] + want[2:] + want[:2]
    seen.clear()
    q, kv = torch.randn(2, 4, 1, 16, generator=g).to(DEV), torch.randn(2, 2, 96, 16, generator=g).to(DEV)
    mask = torch.ones(2, 96, dtype=torch.bool, device=DEV)
    first = decode_attention(q, kv, kv, mask, 0.25, splits=2)
    assert torch.equal(decode_attention(q, kv, kv, mask, 0.25, splits=2), first)
    ptr = _triton._BUFFERS[("scratch", "decode_attention_part", dev, torch.float32)].data_ptr()
    assert seen == [("_decode_attention_kernel", ptr)] * 2


def test_moe_decode_beyond_the_ticket_rows_runs_per_slot_without_a_split(monkeypatch):
    """More rows than the reserved tickets (MAX_TICKET_ROWS): moe_decode chooses the per-slot kernels and
    drops the expert split (which needs tickets), still equal to the reference; asking for the grouped
    kernels there is a clear error."""
    from kernels import moe as moe_module
    from kernels.moe import MAX_TICKET_ROWS, moe_decode

    g = torch.Generator().manual_seed(4)
    e, i, h, k, t = 4, 16, 16, 2, MAX_TICKET_ROWS + 1
    wg, wu = (torch.randn(e, i, h, generator=g).to(DEV) * 0.1 for _ in range(2))
    wd = torch.randn(e, h, i, generator=g).to(DEV) * 0.1
    x, w = torch.randn(t, h, generator=g).to(DEV), torch.rand(t, k, generator=g).to(DEV)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEV)
    launches = []
    real = moe_module._down_kernel

    class Recorder:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(moe_module, "_down_kernel", Recorder())
    got = moe_decode(x, ids, w, wg, wu, wd, config={"BLOCK_N": 16, "BLOCK_K": 16, "DOWN_SPLIT": 2})
    assert launches == [(t, 1, 1)]
    ref = torch.stack([sum(w[r, j] * F.linear(F.silu(F.linear(x[r], wg[ids[r, j]])) * F.linear(x[r], wu[ids[r, j]]),
                                              wd[ids[r, j]]) for j in range(k)) for r in range(t)])
    _check("kernels/moe_beyond_ticket_rows", got, ref)
    with pytest.raises(ValueError, match="grouped=False"):
        moe_decode(x, ids, w, wg, wu, wd, grouped=True)


def test_fused_moe_mode_without_kernel_is_a_clear_error():
    from models.llm import MoE

    model = build(tiny_config(), seed=0)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    with pytest.raises(RuntimeError, match="prepare_decode"):
        moe(torch.randn(1, 2, model.cfg.llm.hidden_size), mode="fused")


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_kernel_flow_head_close_to_reference(fmt):
    from runtime.fast.kernel_flow_head import KernelFlowHead

    model = build(tiny_config(), seed=0, device=DEV)
    head = KernelFlowHead(model, weights=fmt)
    # the reference computes in fp32 with the weights the kernels stream (rounded to bf16 / FP8)
    net = model.model.diffloss.net
    packed = [net.input_proj, net.final_layer.linear, net.final_layer.adaLN_modulation[1]]
    for blk in net.res_blocks:
        packed += [blk.mlp.w12, blk.mlp.w3, blk.adaLN_modulation[1]]
    for lin in packed:
        lin.weight.copy_(dequantize_rows_fp8(*quantize_rows_fp8(lin.weight)) if fmt == "fp8"
                         else lin.weight.to(torch.bfloat16).float())
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(2, 3, model.cfg.llm.hidden_size, generator=g).to(DEV)
    noise = torch.randn(2, model.cfg.flow_head.latent_dim, generator=g).to(DEV)
    s = [torch.tensor([v], device=DEV) for v in (2.5, 1.2, 0.8)]
    got, ref = head(hid, noise, *s), FlowHeadPiece(model)(hid, noise, *s)
    rel = ((got - ref).norm() / ref.norm()).item()
    # the SwiGLU activations are stored in bf16 (and, on a GPU, every GEMM operand is bf16)
    bound = 5e-3 if interpreting() else 3e-2
    assert rel < bound, f"kernel flow head ({fmt}) rel L2 {rel:.2e} >= {bound}"
    assert head.nbytes_per_step() > 0
    # w3 merging its own splits (a ticket) instead of the next LayerNorm: the same latent (module docstring)
    assert head.deferred_residual
    merged_in_w3 = KernelFlowHead(model, weights=fmt, deferred_residual=False)(hid, noise, *s)
    if interpreting():
        assert torch.equal(merged_in_w3, got)
    else:
        assert_close(f"kernels/flow_head_{fmt}_deferred_residual", got, merged_in_w3, 1e-5 * merged_in_w3.abs().max().item())


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_kernel_flow_head_modulations_through_cublas(fmt):
    """Above 64 modulation rows (S*M = 4 steps x 18 rows here) the adaLN GEMMs go to cuBLAS (fp32 products in
    the interpreter): the modulations equal the skinny kernel's 64-row passes within fp32 rounding (same
    operands), FP8 scales and biases included, and so does the latent; 64 rows stay on the kernel; only
    the cuBLAS head widened the weights, at warm-up. merge_mods (FP8's default) stacks the D + 1 matrices into
    one GEMM whose output holds every block's modulations (views), and equals the one-GEMM-per-block head
    (merge_mods=False). On a GPU a captured graph replays the eager call."""
    from runtime.fast.kernel_flow_head import MM_FP32_OUT, KernelFlowHead

    if not MM_FP32_OUT:
        pytest.skip("the cuBLAS modulations need torch >= 2.8 (mm with an fp32 out_dtype)")
    model = build(tiny_config(), seed=0, device=DEV)
    g = torch.Generator().manual_seed(7)
    hid = torch.randn(6, 3, model.cfg.llm.hidden_size, generator=g).to(DEV)
    noise = torch.randn(6, model.cfg.flow_head.latent_dim, generator=g).to(DEV)
    s = [torch.tensor([v], device=DEV) for v in (2.5, 1.2, 0.8)]
    assert KernelFlowHead(model, weights=fmt).merge_mods == (fmt == "fp8")  # bf16 would need a stacked copy
    cublas, skinny = KernelFlowHead(model, weights=fmt, merge_mods=True), KernelFlowHead(model, weights=fmt)
    skinny.cublas_mods_above = 10**9
    cublas(hid[:4, :2], noise[:4], *s)  # 4 steps x 8 rows = 32: the kernel
    cublas(hid[:, :2].repeat(2, 1, 1)[:8], noise.repeat(2, 1)[:8], *s)  # 64: still the kernel
    assert cublas._wide is None
    got, ref = cublas(hid, noise, *s), skinny(hid, noise, *s)
    assert cublas._wide is not None and skinny._wide is None
    lins = [b["ada"] for b in cublas.blocks] + [cublas.final_ada]
    stacked = cublas._wide["weight"]
    assert stacked.dtype == (torch.float16 if fmt == "fp8" else torch.bfloat16)
    assert torch.equal(stacked.float(), torch.cat([lin.weight.float() for lin in lins]))  # widening FP8 is exact
    (buf_c,) = [v for (m, _), v in cublas._scratch.items() if m == 18]
    (buf_s,) = skinny._scratch.values()
    assert "ws_mod" not in buf_c and "ws_mod" in buf_s
    d, w = len(cublas.blocks), model.cfg.flow_head.width
    flat = buf_c["mods_flat"]
    assert flat.shape == (4 * 18, (3 * d + 2) * w) and buf_c["mods_all"].data_ptr() == flat.data_ptr()
    assert buf_c["fmod"].data_ptr() == flat[:, 3 * d * w:].data_ptr()
    per_block = KernelFlowHead(model, weights=fmt, merge_mods=False)
    per_block_out = per_block(hid, noise, *s)
    (buf_p,) = per_block._scratch.values()
    assert "mods_flat" not in buf_p and len(per_block._wide["weights"]) == d + 1
    for key in ("mods_all", "fmod"):  # same operands, fp32 sums in another order
        assert_close(f"kernels/flow_mods_cublas_{fmt}_{key}", buf_c[key], buf_s[key],
                     (1e-6 if interpreting() else 1e-4) * buf_s[key].abs().max().item())
        assert_close(f"kernels/flow_mods_merged_{fmt}_{key}", buf_c[key], buf_p[key],
                     (1e-6 if interpreting() else 1e-5) * buf_p[key].abs().max().item())
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if interpreting() else 1e-3), f"cuBLAS modulations ({fmt}) against the kernel's: rel L2 {rel:.2e}"
    rel = ((got - per_block_out).norm() / per_block_out.norm()).item()
    assert rel < (1e-5 if interpreting() else 1e-3), f"merged modulations ({fmt}) against per-block: rel L2 {rel:.2e}"
    # the strided views through the other consumers: w3's own gated-residual merge, and the one-launch chain
    for kw, bound in (({"deferred_residual": False}, 1e-3), ({"chain": True}, 2e-2)):
        other = KernelFlowHead(model, weights=fmt, merge_mods=True, **kw)(hid, noise, *s)
        rel = ((other - per_block_out).norm() / per_block_out.norm()).item()
        assert rel < (1e-5 if interpreting() else bound), f"merged modulations ({fmt}, {kw}): rel L2 {rel:.2e}"
    if torch.cuda.is_available() and not interpreting():
        from runtime.fast.graphed import capture_graph

        graph, out = capture_graph(lambda: cublas(hid, noise, *s), hid.device)
        graph.replay()
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)  # cuBLAS may pick another algorithm on the capture stream: close, not equal
        assert_close(f"kernels/flow_mods_cublas_{fmt}_graph", first, got, 1e-5 * got.abs().max().item())


def test_kernel_flow_head_runs_with_autograd_on():
    """A service may call the head without torch.no_grad: the head runs without autograd itself (its cuBLAS
    modulations write into buffers with out=, which autograd refuses while the biases require grad)."""
    from runtime.fast.kernel_flow_head import MM_FP32_OUT, KernelFlowHead

    if not MM_FP32_OUT:
        pytest.skip("the cuBLAS modulations need torch >= 2.8 (mm with an fp32 out_dtype)")
    model = build(tiny_config(), seed=0, device=DEV)
    head = KernelFlowHead(model, weights="fp8", merge_mods=True)
    assert any(p.requires_grad for p in head.parameters())
    g = torch.Generator().manual_seed(3)
    hid = torch.randn(6, 3, model.cfg.llm.hidden_size, generator=g).to(DEV)  # 4 steps x 18 rows: cuBLAS
    noise = torch.randn(6, model.cfg.flow_head.latent_dim, generator=g).to(DEV)
    s = [torch.tensor([v], device=DEV) for v in (2.5, 1.2, 0.8)]
    with torch.enable_grad():
        got = head(hid, noise, *s)
    assert head._wide is not None and not got.requires_grad
    with torch.no_grad():
        assert torch.equal(head(hid, noise, *s), got)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_flow_chain_matches_the_block_launches(fmt):
    """The experimental one-launch Euler step (kernels/flow_chain.py; one program in the interpreter, every
    SM on a GPU) gives the flow head's latent within rounding of the per-block launches, and re-arms its
    barrier (a second call gives the same bits)."""
    from runtime.fast.kernel_flow_head import KernelFlowHead

    model = build(tiny_config(), seed=0, device=DEV)
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(2, 3, model.cfg.llm.hidden_size, generator=g).to(DEV)
    noise = torch.randn(2, model.cfg.flow_head.latent_dim, generator=g).to(DEV)
    s = [torch.tensor([v], device=DEV) for v in (2.5, 1.2, 0.8)]
    ref = KernelFlowHead(model, weights=fmt)(hid, noise, *s)
    chain = KernelFlowHead(model, weights=fmt, chain=True)
    got = chain(hid, noise, *s)
    again = chain(hid, noise, *s)
    assert torch.equal(got, again)
    (fc,) = chain.chains()
    assert not fc.failed() and int(fc.barrier.abs().sum()) == 0
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if interpreting() else 2e-2), f"flow chain ({fmt}) against the launches: rel L2 {rel:.2e}"
    chain.set_chain(False)  # back to the launches: new scratch without the chain, the launches' bits
    assert torch.equal(chain(hid, noise, *s), ref) and chain.chains() == []


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_flow_chain_step_matches_the_block_kernels(fmt):
    """One chain step over 2 blocks at a size where w3's K splits all carry work (W 256, hidden 688, 3 rows,
    biases): h and the next rows equal ln_modulate + the SwiGLU and gated-residual GEMMs, block by block."""
    from kernels.flow_chain import FlowChain
    from runtime.fast.kernel_flow_head import PackedLinear

    g = torch.Generator().manual_seed(11)
    m, w, hid, depth = 3, 256, 688, 2

    def lin(n_in, n_out):
        layer = torch.nn.Linear(n_in, n_out)
        torch.nn.init.normal_(layer.weight, std=n_in ** -0.5, generator=g)
        torch.nn.init.normal_(layer.bias, std=0.1, generator=g)
        return layer.to(DEV)

    blocks = [dict(ln=(1 + 0.1 * torch.randn(w, generator=g).to(DEV), 0.1 * torch.randn(w, generator=g).to(DEV)),
                   w12=PackedLinear(lin(w, 2 * hid), fmt), w3=PackedLinear(lin(hid, w), fmt)) for _ in range(depth)]
    mods = (0.3 * torch.randn(depth, 5 * m, 3 * w, generator=g)).to(DEV)[:, m:2 * m]  # a step's rows of a bigger buffer
    rows = torch.float16 if fmt == "fp8" else torch.bfloat16
    h0 = torch.randn(m, w, generator=g).to(DEV)
    ref, xn, act = h0.clone(), torch.empty(m, w, dtype=rows, device=DEV), torch.empty(m, hid, dtype=rows, device=DEV)
    for b, mk in zip(blocks, mods):
        ln_modulate(ref, mk[:, :w], mk[:, w:2 * w], xn, weight=b["ln"][0], bias=b["ln"][1], eps=1e-6)
        skinny_gemm(xn, b["w12"].weight, act, w_scale=b["w12"].scale, bias=b["w12"].bias, epilogue=SWIGLU)
        skinny_gemm(act, b["w3"].weight, ref, w_scale=b["w3"].scale, bias=b["w3"].bias, gate=mk[:, 2 * w:],
                    epilogue=GATED_RESIDUAL)
    chain = FlowChain(blocks, m, DEV)
    assert -(-hid // chain.config["SPLIT3"]) < hid  # more than one split of w3's K
    for _ in range(2):  # the second launch checks the re-armed barrier
        h = h0.clone()
        chain.step(h, torch.empty(m, w, dtype=rows, device=DEV), mods, 1e-6)
        _check(f"kernels/flow_chain_step_{fmt}", h, ref)
    assert not chain.failed() and int(chain.barrier.abs().sum()) == 0
    with pytest.raises(ValueError, match="rows"):
        chain.step(h[:2], xn[:2], mods[:, :2], 1e-6)
    # launch overrides (flow_chain_check --sweep): the same result with other stages, no prefetch, a register cap
    tuned = FlowChain(blocks, m, DEV, config={"num_stages": 2, "PREFETCH": False, "maxnreg": 128, "programs_per_sm": 2})
    assert tuned.config["num_stages"] == 2 and not tuned.config["PREFETCH"] and "programs_per_sm" not in tuned.config
    h = h0.clone()
    tuned.step(h, torch.empty(m, w, dtype=rows, device=DEV), mods, 1e-6)
    _check(f"kernels/flow_chain_step_{fmt}_tuned", h, ref)
    with pytest.raises(ValueError, match="unknown"):
        FlowChain(blocks, m, DEV, config={"BLOCK_M": 32})


@pytest.mark.gpu
@needs_gpu
def test_split_k_is_deterministic_on_gpu():
    g = torch.Generator().manual_seed(6)
    m, n, k = 2, 3072, 8192
    x = torch.randn(m, k, generator=g).to(DEV, torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(DEV, torch.bfloat16)
    ws = Workspace(n, m, DEV)
    first = torch.empty(m, n, device=DEV)
    skinny_gemm(x, w, first, workspace=ws, config={"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 8})
    for _ in range(50):
        again = torch.empty(m, n, device=DEV)
        skinny_gemm(x, w, again, workspace=ws, config={"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 8})
        assert torch.equal(again, first)
    _check("kernels/gpu_split8_vs_cublas", first, x.float() @ w.float().T)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_graph_with_kernels_close_to_eager_on_gpu(fmt):
    from test_gpu_fast_path import _setup

    from export.verify import IMAGE_PSNR_FLOOR, psnr
    from runtime import loop
    from runtime.fast.graph import GraphImageGenerator

    model, backend, cfg, cache, kw = _setup("cuda")
    ref = loop.generate_image(backend, cfg, cache, **kw)
    gen = GraphImageGenerator(model, kernels=True, weights=fmt)
    out = gen.generate(cache, **kw)
    assert all(k.graph is not None for k in gen._buckets.values())
    assert psnr(out.image.float(), ref.image) > IMAGE_PSNR_FLOOR[fmt]
    assert torch.equal(gen.generate(cache, **kw).image, out.image)  # deterministic replays


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant below captures the graph")
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_token_step_with_kernels_in_interpreter(fmt):
    """The whole image-token step on the kernels (fused MoE, FP8 linears, kernel flow head), run eagerly."""
    from test_gpu_fast_path import _setup

    from export.verify import IMAGE_PSNR_FLOOR, psnr
    from runtime import loop
    from runtime.fast.decode_weights import FP8Linear
    from runtime.fast.graph import GraphImageGenerator

    model, backend, cfg, cache, kw = _setup("cpu", batch=1)
    ref = loop.generate_image(backend, cfg, cache, **kw)
    gen = GraphImageGenerator(model, use_graph=False, kernels=True, weights=fmt)
    assert gen.moe_mode == "fused"
    assert any(isinstance(m, FP8Linear) for m in model.modules()) == (fmt == "fp8")
    out = gen.generate(cache, **kw)
    assert psnr(out.image.float(), ref.image) > IMAGE_PSNR_FLOOR[fmt]
    assert_close(f"kernels/interp_step_{fmt}_latents", out.latents, ref.latents, 0.5)


def _attention_inputs(dtype, b=2, h=8, hkv=2, s=100, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, dtype).transpose(1, 2)  # (B, H, 1, D), strided as the model's
    k, v = (torch.randn(b, hkv, s, d, generator=g).to(DEV, dtype) for _ in range(2))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device=DEV)
    mask[..., s - 10:] = False  # slots not written yet
    mask[1, ..., 5:20] = False  # a CFG row hides the user turn
    mask[0, ..., :70] = False  # row 0 sees nothing in the first split(s): their sums must stay empty
    return q, k, v, mask


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_decode_attention_matches_sdpa(splits, dtype, heads):
    from kernels.attention import decode_attention

    h, hkv = heads
    q, k, v, mask = _attention_inputs(dtype, h=h, hkv=hkv)
    got = decode_attention(q, k, v, mask, 32 ** -0.5, splits=splits)
    rep = h // hkv
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
                                         attn_mask=mask, scale=32 ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    # fp32: exact products (interpreter); bf16: the probabilities are rounded to bf16 for P @ V
    assert_close(f"kernels/decode_attention_{dtype}_{h}x{hkv}_s{splits}", got.float(), ref,
                 2e-5 if dtype == torch.float32 and interpreting() else 2e-2)


def test_decode_attention_splits_agree_and_refuse_bad_inputs():
    from kernels.attention import decode_attention, decode_splits

    q, k, v, mask = _attention_inputs(torch.float32)
    one, three = (decode_attention(q, k, v, mask, 0.2, splits=n) for n in (1, 3))
    assert_close("kernels/decode_attention_split_1_vs_3", three, one, 2e-5 if interpreting() else 1e-4)
    assert [decode_splits(n) for n in (1, 64, 65, 512, 4096, 10 ** 6)] == [1, 1, 2, 8, 16, 16]
    hidden = mask.clone()
    hidden[1] = False  # a row that sees no key: zeros (as torch's math attention), not NaN
    for n in (1, 3):
        out = decode_attention(q, k, v, hidden, 0.2, splits=n)
        assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0], one[0])
    shared = decode_attention(q, k, v, mask[:1], 0.2)  # one mask row for every batch row
    assert torch.equal(shared[0], one[0])
    with pytest.raises(ValueError, match="one query"):
        decode_attention(q.expand(2, 8, 2, 32), k, v, mask, 0.2)
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention(q[:, :7], k, v, mask, 0.2)
    with pytest.raises(ValueError, match="bool"):
        decode_attention(q, k, v, mask.float(), 0.2)
    with pytest.raises(ValueError, match="must bound the keys"):  # no mask: only `last` can make it causal
        decode_attention(q, k, v, None, 0.2)
    with pytest.raises(ValueError, match="one dtype"):
        decode_attention(q, k.double(), v, mask, 0.2)
    with pytest.raises(ValueError, match="last"):
        decode_attention(q, k, v, mask, 0.2, last=torch.tensor([1.0], device=DEV))
    with pytest.raises(ValueError, match="splits"):
        decode_attention(q, k, v, mask, 0.2, splits=0)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_stops_at_the_last_slot(splits):
    """`last` (the query's own slot) skips the later slots the mask hides anyway: the same bits, and the
    same as torch's attention over the cache cut at `last`, whichever split `last` falls in."""
    from kernels.attention import decode_attention

    q, k, v, mask = _attention_inputs(torch.float32, s=300)
    full = decode_attention(q, k, v, mask, 0.2, splits=splits)
    assert torch.equal(decode_attention(q, k, v, mask, 0.2, splits=splits, last=torch.tensor([289], device=DEV)), full)
    # cuts that skip whole 64-slot tiles and (3 splits of 128 slots) whole splits
    for last in (200, 130, 75, 3):
        cut = mask.clone()
        cut[..., last + 1:] = False
        got = decode_attention(q, k, v, cut, 0.2, splits=splits, last=torch.tensor([last], device=DEV))
        assert torch.equal(got, decode_attention(q, k, v, cut, 0.2, splits=splits))  # the skipped slots add nothing
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                             attn_mask=cut, scale=0.2)
        ref[0] = 0 if last < 70 else ref[0]  # row 0 sees no key before slot 70: zeros
        assert_close(f"kernels/decode_attention_last{last}_s{splits}", got, ref, 2e-5 if interpreting() else 1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float32,) * 2, (torch.bfloat16,) * 2,
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("mrope", [False, True])
def test_rope_kv_write_equals_the_attention_projection(dtype, cache_dtype, mrope):
    """kernels.rope.rope_kv_write, one launch from the qkv projection: the rotated query equals
    Attention.project's, the new key (rotated, rounded to the projection's dtype as apply_rope rounds it, then
    to the cache's) and value land in the caches' slot as forward_static's index_copy_ puts them, and every
    other slot is untouched; bad operands are refused."""
    import dataclasses

    from kernels.rope import rope_kv_write
    from models.llm import Attention, rope_cos_sin, rope_inv_freq

    cfg = dataclasses.replace(tiny_config().llm, mrope_section=(4, 2, 2), head_dim=16)
    with torch.random.fork_rng(devices=[]):  # the projection's weights, the same every run
        torch.manual_seed(6)
        attn = Attention(cfg).to(DEV, dtype)
    b, s, slot = 3, 12, 5
    g = torch.Generator().manual_seed(6)
    x = torch.randn(b, 1, cfg.hidden_size, generator=g).to(DEV, dtype)
    positions = torch.tensor([[7], [30], [1000]])
    positions = torch.stack([positions, positions + 1, positions * 2]) if mrope else positions  # (3, B, 1): M-RoPE
    cos, sin = rope_cos_sin(positions.to(DEV), rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(DEV),
                            cfg.mrope_section)
    k_c = torch.randn(b, cfg.num_kv_heads, s, cfg.head_dim, generator=g).to(DEV, cache_dtype)
    v_c = torch.randn(b, cfg.num_kv_heads, s, cfg.head_dim, generator=g).to(DEV, cache_dtype)
    at = torch.tensor([slot], device=DEV)
    q, k, v = attn.project(x, cos, sin)
    ref_k = k_c.clone().index_copy_(2, at, k.to(cache_dtype))
    ref_v = v_c.clone().index_copy_(2, at, v.to(cache_dtype))
    got = rope_kv_write(attn.query_key_value(x), cos, sin, k_c, v_c, at)
    assert got.shape == q.shape and got.dtype == q.dtype
    # fp32: the same products and sums (the GPU may fuse one multiply-add); bf16: at most one rounding step apart
    # (the interpreter truncates to bf16 where torch rounds to nearest): one ulp is at most 2^-7 of the magnitude
    def tol(ref):
        return (1e-6 if dtype == torch.float32 else 2 ** -7) * max(1.0, ref.abs().max().item())

    assert_close(f"kernels/rope_q_{dtype}", got, q, tol(q))
    assert_close(f"kernels/rope_k_{dtype}_{cache_dtype}", k_c, ref_k, tol(ref_k))
    new_k = k_c[:, :, slot]
    assert torch.equal(new_k, new_k.to(dtype).to(cache_dtype))  # rounded to the projection's dtype on the way
    assert torch.equal(k_c[:, :, :slot], ref_k[:, :, :slot]) and torch.equal(k_c[:, :, slot + 1:], ref_k[:, :, slot + 1:])
    assert torch.equal(v_c, ref_v)
    with pytest.raises(ValueError, match="fp32"):
        rope_kv_write(attn.query_key_value(x), cos.to(dtype) if dtype != torch.float32 else cos.half(), sin, k_c, v_c, at)
    with pytest.raises(ValueError, match="one token per row"):
        rope_kv_write(attn.query_key_value(x)[..., :-1], cos, sin, k_c, v_c, at)
    with pytest.raises(ValueError, match="one integer slot"):
        rope_kv_write(attn.query_key_value(x), cos, sin, k_c, v_c, torch.tensor([1, 2], device=DEV))


@torch.no_grad()
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_without_a_mask_is_causal_by_the_query_slot(splits):
    """mask=None: every slot up to `last` is visible (the semantic decoder's causal_mask), the same bits as the
    kernel given that mask built; without `last` nothing would bound the keys, so it is refused."""
    from kernels.attention import decode_attention
    from models.vit_layers import causal_mask

    g = torch.Generator().manual_seed(13)
    b, s, last = 3, 150, 97
    q = torch.randn(b, 8, 1, 32, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(b, 2, s, 32, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(b, 2, s, 32, generator=g).to(DEV, torch.bfloat16)
    at = torch.tensor([last], device=DEV)
    got = decode_attention(q, k, v, None, 0.2, splits=splits, last=at)
    assert torch.equal(got, decode_attention(q, k, v, causal_mask(at, s, DEV), 0.2, splits=splits, last=at))
    assert not torch.equal(got, decode_attention(q, k, v, torch.ones(1, s, dtype=torch.bool, device=DEV), 0.2,
                                                 splits=splits))  # the later slots were hidden
    with pytest.raises(ValueError, match="must bound the keys"):
        decode_attention(q, k, v, None, 0.2)


@torch.no_grad()
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_writes_fp8_rows(splits):
    """fp16_rows=True: the kernel's output is kernels.fp8.fp16_rows of its usual output, bit for bit (rounded to
    q's dtype first, then fp16, clamped to its range: here a value channel beyond fp16's range)."""
    from kernels.attention import decode_attention
    from kernels.fp8 import F16_MAX

    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 8, 1, 32, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(2, 2, 150, 32, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(2, 2, 150, 32, generator=g).to(DEV, torch.bfloat16)
    v[:, :, :, 0] = 1e6  # the output's channel 0 is ~1e6: clamped to 65504
    mask = torch.ones(2, 1, 1, 150, dtype=torch.bool, device=DEV)
    mask[1, ..., 100:] = False
    plain = decode_attention(q, k, v, mask, 0.2, splits=splits)
    rows = decode_attention(q, k, v, mask, 0.2, splits=splits, fp16_rows=True)
    assert plain.dtype == torch.bfloat16 and rows.dtype == torch.float16
    assert torch.equal(rows, plain.float().clamp(-F16_MAX, F16_MAX).half())
    assert (rows[..., 0] == F16_MAX).all() and (plain[..., 0] > F16_MAX).all()


@torch.no_grad()
def test_fp8_preparation_gives_the_attentions_fp8_rows(monkeypatch):
    """prepare_decode with FP8 weights: on a GPU every attention whose output projection became an FP8Linear runs
    the kernel that writes that linear's rows (decode_attention_fp16_rows); in Triton's interpreter (which
    multiplies rows as given), with bf16 weights and with ATTENTION_FP8_ROWS off, the plain kernel."""
    import runtime.fast.decode_weights as dw
    from models.llm import Attention
    from models.vit_layers import SelfAttention

    model = build(tiny_config(), seed=0, device=DEV)
    attns = [m for m in model.modules() if isinstance(m, (Attention, SelfAttention))]
    dw.prepare_decode(model, "fp8")
    decoding = [m for m in attns if hasattr(m, "fused_decode_attention")]
    assert decoding and all(isinstance(m.dense if isinstance(m, Attention) else m.proj, dw.FP8Linear) for m in decoding)
    want = dw.decode_attention_fp16_rows if DEV == "cuda" else dw.decode_attention_op
    assert all(m.fused_decode_attention is want for m in decoding)
    dw.prepare_decode(model, "bf16")
    assert all(m.fused_decode_attention is dw.decode_attention_op for m in decoding)
    monkeypatch.setattr(dw, "ATTENTION_FP8_ROWS", False)  # the switch: the conversion in a launch of its own
    dw.prepare_decode(model, "fp8")
    assert all(m.fused_decode_attention is dw.decode_attention_op for m in decoding)


@torch.no_grad()
def test_compiled_fused_step_writes_the_caches_in_place():
    """Under torch.compile the mutating rope_kv_write op writes the step's cache inputs themselves: Inductor
    re-inplaces it (every call's caches are graph inputs, no copy of a cache per layer), and the compiled step
    matches the eager one, caches included."""
    import re

    from torch._inductor.utils import run_and_get_code

    from runtime.fast.decode_weights import prepare_decode

    model = build(tiny_config(), seed=0, device=DEV)
    llm, cfg = model.model.model, model.cfg.llm
    prepare_decode(model)
    k_c, v_c = llm.empty_cache(2, 16, device=DEV)
    for c in (*k_c, *v_c):
        c.normal_(generator=torch.Generator(DEV).manual_seed(1))
    x = torch.randn(2, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEV)
    mask = torch.ones(2, 16, dtype=torch.long, device=DEV)
    pos, at = torch.full((2, 1), 5, device=DEV), torch.tensor([5], device=DEV)
    image = torch.zeros(2, 1, dtype=torch.bool, device=DEV)
    n = cfg.num_layers

    def step(x, *caches):
        return llm.forward_static(x, mask, pos, list(caches[:n]), list(caches[n:]), at, image_mask=image,
                                  moe_mode="fused")

    eager_caches = [c.clone() for c in (*k_c, *v_c)]
    want = step(x, *eager_caches)
    caches = [c.clone() for c in (*k_c, *v_c)]
    torch._dynamo.reset()
    got, codes = run_and_get_code(torch.compile(step, fullgraph=True), x, *caches)
    calls = [m.groups() for code in codes for m in re.finditer(r"rope_kv_write\.default\(.*, (\w+), (\w+), \w+\)", code)]
    assert len(calls) == n and all(re.fullmatch(r"arg\d+_1", name) for call in calls for name in call), calls
    assert_close("kernels/compiled_fused_step", got, want, 1e-5)
    for a, b in zip(caches, eager_caches):
        assert_close("kernels/compiled_fused_step_caches", a, b, 1e-6)


@torch.no_grad()
def test_llm_decode_uses_the_attention_kernel_once_installed():
    """prepare_decode installs the kernel on every LLM attention; a one-token static step in moe_mode
    "fused" then runs through it and through the RoPE + cache-write kernel (and
    matches the model without them, caches included); a longer step, or a step in another mode (a generator
    without kernels on the same model), keeps torch's attention."""
    import runtime.fast.decode_weights as dw
    from models.llm import Attention
    from runtime.fast.decode_weights import prepare_decode

    model = build(tiny_config(), seed=0, device=DEV)
    llm = model.model.model
    cfg = model.cfg.llm
    s_max = 24
    k_c, v_c = llm.empty_cache(2, s_max, device=DEV)
    for t in (*k_c, *v_c):
        t.normal_()
    mask = torch.zeros(2, s_max, dtype=torch.long, device=DEV)
    mask[:, :11] = 1
    mask[1, 2:5] = 0
    x = torch.randn(2, 1, cfg.hidden_size, device=DEV)
    pos = torch.full((2, 1), 10, device=DEV)
    at = torch.tensor([10], device=DEV)
    ref_k, ref_v = [t.clone() for t in k_c], [t.clone() for t in v_c]
    ref = llm.forward_static(x, mask, pos, ref_k, ref_v, at)
    report = prepare_decode(model)
    assert report["decode_attention_layers"] == cfg.num_layers + model.cfg.mingtok.semantic_depth
    attns = [m for m in llm.modules() if isinstance(m, Attention)]
    assert all(m.fused_decode_attention is dw.decode_attention_op for m in attns)
    assert all(m.fused_kv_write is dw.rope_kv_write_op for m in attns)
    calls, writes = [], []
    for m in attns:  # count the kernels' calls, and what slot bound they get
        m.fused_decode_attention = lambda *a: calls.append(a) or dw.decode_attention_op(*a)
        m.fused_kv_write = lambda *a: writes.append(a[5]) or dw.rope_kv_write_op(*a)
    got = llm.forward_static(x, mask, pos, k_c, v_c, at, moe_mode="fused")
    assert len(calls) == cfg.num_layers and all(c[5] is at for c in calls)  # the query's slot bounds the keys
    assert len(writes) == cfg.num_layers and all(w is at for w in writes)
    for name, caches, want in (("k", k_c, ref_k), ("v", v_c, ref_v)):  # the kernel wrote the new slot, only it
        for i, (c, r) in enumerate(zip(caches, want)):
            assert torch.equal(c[:, :, :10], r[:, :, :10]) and torch.equal(c[:, :, 11:], r[:, :, 11:])
            assert_close(f"kernels/llm_step_rope_cache_{name}", c[:, :, 10], r[:, :, 10], 1e-4 if interpreting() else 3e-2)
    llm.forward_static(x, mask, pos, k_c, v_c, at, moe_mode="gather")
    llm.forward_static(x.expand(2, 3, -1), mask, pos.expand(2, 3) + torch.arange(3, device=DEV), k_c, v_c,
                       at + torch.arange(3, device=DEV), moe_mode="fused")
    assert len(calls) == cfg.num_layers  # the one-token fused step only
    assert_close("kernels/llm_step_with_decode_attention", got, ref, 1e-4 if interpreting() else 3e-2)


@torch.no_grad()
def test_fused_router_routes_as_the_two_routers():
    """prepare_decode stacks the text and image routers: a fused step routes every row as the router its
    image mask picks would (same experts, same weights), in one GEMM."""
    from models.llm import MoE
    from runtime.fast.decode_weights import prepare_decode

    model = build(tiny_config(), seed=0, device=DEV)
    prepare_decode(model)
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    assert moes and all(m.fused_router.shape == (2 * m.num_experts, model.cfg.llm.hidden_size) for m in moes)
    x = torch.randn(5, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(8)).to(DEV)
    image = torch.tensor([[True], [False], [True], [False], [False]], device=DEV)
    for m in moes:
        real_forward = type(m.gate).forward
        type(m.gate).forward = lambda *a: pytest.fail("the fused route ran a router on its own")
        try:
            got = m.route(x, image, fused=True)
        finally:
            type(m.gate).forward = real_forward
        ref = m.route(x, image)
        assert torch.equal(got[0], ref[0])
        assert_close("kernels/fused_router_weights", got[1], ref[1], 1e-6)
        assert_close("kernels/fused_router_logits", got[2].float(), ref[2].float(), 1e-5)
        text = m.gate(x)  # the image rows really took the image router's choice
        assert not torch.equal(text[0][image[:, 0]], got[0][image[:, 0]])


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_gemm_runs_on_the_skinny_kernel_for_decode_rows(monkeypatch, dtype):
    """prepare_decode's router_linear: a fused route of decode rows takes its logits from the skinny kernel,
    as the decode step routes (an image mask given, all False for generated tokens: both routers stacked, 2E
    logits a row) and without a mask (E); the logits match F.linear's, and so do the experts where the two
    agree exactly (fp32 products). More rows than the kernel takes, or a route that is not fused, stay on
    F.linear; ROUTER_ON_KERNEL=False takes the kernel out again."""
    import runtime.fast.decode_weights as dw
    from kernels.skinny import MAX_ROWS
    from models.llm import MoE

    model = build(tiny_config(), seed=0, device=DEV, dtype=dtype)
    dw.prepare_decode(model)
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    assert moes and all(m.router_linear is dw.router_logits for m in moes)
    e = moes[0].num_experts
    calls = []
    real = dw.skinny_linear_op
    monkeypatch.setattr(dw, "skinny_linear_op", lambda *a: calls.append(tuple(a[1].shape)) or real(*a))
    h = model.cfg.llm.hidden_size
    g = torch.Generator().manual_seed(9)
    for rows in (3, MAX_ROWS + 1):
        x = torch.randn(rows, h, generator=g).to(DEV, dtype)
        image = (torch.arange(rows, device=DEV) % 2 == 0)[:, None]  # mixed rows: each router's choice is used
        for mask, n in ((torch.zeros_like(image), 2 * e), (image, 2 * e), (None, e)):
            for m in moes:
                calls.clear()
                got = m.route(x, mask, fused=True)
                ref = m.route(x, mask)  # not fused: F.linear
                assert calls == ([(n, h)] if rows <= MAX_ROWS else [])
                # bf16 logits: the two sums may round to neighbouring values (a bf16 ulp is 2^-8 relative)
                rel = 2.0 ** -7 if dtype == torch.bfloat16 else REL
                assert_close("kernels/router_on_skinny_logits", got[2].float(), ref[2].float(),
                             rel * max(1.0, ref[2].abs().max().item()))
                if dtype == torch.float32 or rows > MAX_ROWS:  # the same products and sums: the same choices
                    assert torch.equal(got[0], ref[0])
                    assert_close("kernels/router_on_skinny_weights", got[1], ref[1], 1e-5)
    monkeypatch.setattr(dw, "ROUTER_ON_KERNEL", False)
    dw.prepare_decode(model)
    assert not any(hasattr(m, "router_linear") for m in moes)


@torch.no_grad()
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("renorm, shared", [(True, 0), (True, 2), (False, 1)])
def test_route_kernel_routes_as_the_routers(groups, renorm, shared):
    """kernels.routing.route_topk, one launch from router logits to the MoE kernel's slots: the experts
    Router.select picks (the image mask choosing the router of each row), in its order with ties to the lower
    id, its weights to fp32 rounding, then the shared experts' slots of weight 1."""
    import dataclasses

    from kernels.routing import route_topk
    from models.llm import Router

    e, k, t = 64, 6, 8
    cfg = dataclasses.replace(tiny_config().llm, num_experts=e, num_experts_per_tok=k, norm_topk_prob=renorm)
    router = Router(cfg)
    g = torch.Generator().manual_seed(3)
    logits = ((torch.randn(t, groups, e, generator=g) * 4).round() / 4).to(torch.bfloat16).to(DEV)  # quarter steps
    top = logits.float().sort(dim=-1, descending=True).values[..., :k + 1]
    assert (top.diff(dim=-1) == 0).any(dim=-1).float().mean() > 0.5  # most rows tie within their top k
    mask = (torch.arange(t, device=DEV) % 3 == 0)[:, None] if groups == 2 else None
    ids, w = route_topk(logits, mask, k, renorm, e, shared)
    assert ids.shape == w.shape == (t, k + shared) and ids.dtype == torch.int64 and w.dtype == torch.float32
    sel_ids, sel_w = router.select(logits)  # (T, G, k): the model's own choice, per router
    pick = mask[:, 0].long() if groups == 2 else torch.zeros(t, dtype=torch.long, device=DEV)
    rows = torch.arange(t, device=DEV)
    # the reference: each row's router's choice, then the shared slots
    ref_ids = torch.cat([sel_ids[rows, pick], torch.arange(e, e + shared, device=DEV).expand(t, -1)], 1)
    ref_w = torch.cat([sel_w[rows, pick], torch.ones(t, shared, device=DEV)], 1)
    assert torch.equal(ids, ref_ids)
    assert_close("kernels/route_weights", w, ref_w, 1e-6)
    assert torch.equal(ids[:, :k], sel_ids[rows, pick])
    assert_close("kernels/route_weights_vs_select", w[:, :k], sel_w[rows, pick], 1e-6)
    assert torch.equal(ids[:, k:], torch.arange(e, e + shared, device=DEV).expand(t, -1))
    assert torch.equal(w[:, k:], torch.ones(t, shared, device=DEV))
    if groups == 2:
        both = torch.cat([mask, ~mask], dim=1)  # (T, 2): its first column is a strided mask
        assert torch.equal(route_topk(logits, both[:, :1], k, renorm, e, shared)[0], ids)
        with pytest.raises(ValueError, match="image mask"):
            route_topk(logits, None, k, renorm)
        with pytest.raises(ValueError, match="must be bool"):
            route_topk(logits, mask.int(), k, renorm)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_fused_route_takes_the_route_kernel(monkeypatch, fmt):
    """prepare_decode installs the route kernel as MoE.fused_route: a fused decode route makes one call of it
    per MoE layer, with FP8 its slots end with the shared experts' (the MoE kernel takes them as they are),
    and the MoE output equals the one routed by PyTorch ops; ROUTE_ON_KERNEL=False takes the kernel out."""
    import runtime.fast.decode_weights as dw
    from models.llm import MoE

    model = build(tiny_config(), seed=0, device=DEV)
    dw.prepare_decode(model, fmt)
    moes = [m for m in model.model.model.modules() if isinstance(m, MoE)]
    calls = []
    real = dw.route_decode_op
    monkeypatch.setattr(dw, "route_decode_op", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(1, 3, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(4)).to(DEV)
    mask = torch.zeros(3, 1, dtype=torch.bool, device=DEV)  # generated tokens: the text router, both stacked
    k = model.cfg.llm.num_experts_per_tok
    for m in moes:
        calls.clear()
        ids, w, _ = m.route(x[0], mask, fused=True)
        assert len(calls) == 1 and calls[0][1] == 2  # both routers' logits, one launch
        slots = m.fused_decode.shared_slots
        assert (slots > 0) == (fmt == "fp8") and ids.shape == (3, k + slots)
        ref_ids, ref_w, _ = m.route(x[0], mask)  # not fused: the routers as modules
        assert torch.equal(ids[:, :k], ref_ids)
        assert_close("kernels/fused_route_weights", w[:, :k], ref_w, 1e-6)
        got = m(x, mask, mode="fused")
        route = m.__dict__.pop("fused_route")
        want = m(x, mask, mode="fused")  # the same MoE kernel, routed by PyTorch ops
        m.fused_route = route
        assert_close(f"kernels/fused_route_moe_{fmt}", got.float(), want.float(), 1e-5 * max(1.0, want.abs().max().item()))
    monkeypatch.setattr(dw, "ROUTE_ON_KERNEL", False)
    dw.prepare_decode(model, fmt)
    assert not any(hasattr(m, "fused_route") for m in moes)


@torch.no_grad()
def test_generators_refuse_a_model_prepared_again():
    """prepare_decode leaves a model prepared the same way as it is (generators share its kernels and copies),
    and the stacked routers stay one buffer across formats. A preparation for the other format, or after a
    weight load, replaces what earlier generators' graphs read: those refuse to run, with an error that says
    why, instead of reading freed weights. A generator without the kernels minds only FP8 preparations."""
    from test_gpu_fast_path import _setup

    from models.llm import MoE
    from runtime.fast import preparation
    from runtime.fast.decode_weights import prepare_decode
    from runtime.fast.graph import GraphImageGenerator

    model, backend, cfg, cache, kw = _setup(DEV, batch=1)
    opts = dict(use_graph=False, compile=False)
    plain = GraphImageGenerator(model, kernels=False, **opts)
    a = GraphImageGenerator(model, kernels=True, **opts)
    prep = preparation.current(model)
    moe = next(m for m in model.model.model.modules() if isinstance(m, MoE))
    router = moe.fused_router
    b = GraphImageGenerator(model, kernels=True, **opts)
    assert preparation.current(model) is prep and moe.fused_router is router
    for gen in (plain, a, b):
        gen._check_preparation()
    fp8 = GraphImageGenerator(model, kernels=True, weights="fp8", **opts)
    assert preparation.current(model) is not prep and moe.fused_router is router  # refreshed in place
    for gen in (plain, a, b):
        with pytest.raises(RuntimeError, match="prepared again for decode weights='fp8'"):
            gen.generate(cache, **kw)
    fp8._check_preparation()
    next(model.parameters()).mul_(1.0)  # a weight written in place: the next preparation is a new one
    prepare_decode(model, "fp8")
    with pytest.raises(RuntimeError, match="prepared again"):
        fp8.generate(cache, **kw)
    prepare_decode(model, "bf16")
    GraphImageGenerator(model, kernels=False, **opts)._check_preparation()
    plain._check_preparation()  # no FP8 linears again: what it was made with
    was = preparation.current(model)
    model.to(torch.bfloat16)  # new storage, as a move gives too: prepared anew, not taken as done
    prepare_decode(model, "bf16")
    assert was is not None and preparation.current(model) is not was


@torch.no_grad()
def test_semantic_decoder_step_uses_the_attention_kernel_when_fused():
    """SemanticDecoderStatic(fused=True) runs one-token steps through the installed kernels (once per block: the
    cache writes, then the attention, causal by the query's slot without a mask) and matches the torch attention
    step by step over a cache it fills itself; fused=False, or a several-token step, keeps torch's attention."""
    from models.pieces import SemanticDecoderStatic
    from models.vit_layers import SelfAttention
    from runtime.fast.decode_weights import decode_attention_op, prepare_decode, rope_kv_write_op

    model = build(tiny_config(), seed=0, device=DEV)
    mt = model.cfg.mingtok
    depth, heads = mt.semantic_depth, mt.semantic_dim // mt.head_dim
    prepare_decode(model)
    calls = []
    attns = [m for m in model.vision.semantic_decoder.modules() if isinstance(m, SelfAttention)]
    assert len(attns) == depth and all(m.fused_decode_attention is decode_attention_op for m in attns)
    assert all(m.fused_kv_write is rope_kv_write_op for m in attns)
    writes = []
    for m in attns:
        m.fused_decode_attention = lambda *a: calls.append(a) or decode_attention_op(*a)
        m.fused_kv_write = lambda *a: writes.append(a) or rope_kv_write_op(*a)
    z = torch.randn(2, 6, mt.latent_dim, generator=torch.Generator().manual_seed(3)).to(DEV)
    caches = {f: tuple(torch.zeros(2, heads, 9, mt.head_dim, device=DEV) for _ in range(2 * depth)) for f in (0, 1)}
    outs = {f: [SemanticDecoderStatic(model, fused=bool(f))(z[:, i:i + 1], torch.tensor([i], device=DEV), *caches[f])
                for i in range(6)] for f in (0, 1)}
    assert len(calls) == len(writes) == 6 * depth  # the fused steps only
    assert [int(c[5]) for c in calls] == [i for i in range(6) for _ in range(depth)]  # each step's own slot
    assert all(c[3] is None for c in calls)  # causal by that slot alone: no mask built
    assert all(w[1] is None and w[2] is None for w in writes)  # no RoPE in the semantic decoder
    for i in range(6):
        assert_close(f"kernels/semantic_step_{i}", outs[1][i][0], outs[0][i][0], 1e-4 if interpreting() else 3e-2)
        assert_close(f"kernels/semantic_step_{i}_connector", outs[1][i][1], outs[0][i][1], 1e-4 if interpreting() else 3e-2)
    for a, b in zip(caches[1], caches[0]):  # the kernel's cache writes
        assert_close("kernels/semantic_step_caches", a, b, 1e-4 if interpreting() else 3e-2)
    SemanticDecoderStatic(model, fused=True)(z[:, :2], torch.tensor([0, 1], device=DEV), *caches[1])
    assert len(calls) == 6 * depth


def test_pdl_settings():
    """PDL is never used by the interpreter or off a GPU; set_pdl validates the prefetch depth and restores."""
    from kernels import pdl_enabled, set_pdl
    from kernels._triton import PDL_PREFETCH_TILES, pdl_prefetch_tiles

    if interpreting() or not torch.cuda.is_available():
        assert pdl_enabled("cpu") is False
        set_pdl(True, 8)  # forcing it on still cannot make the interpreter launch with PDL
        try:
            assert pdl_enabled() is False
            assert pdl_prefetch_tiles() == 8
        finally:
            set_pdl(None)
    assert pdl_prefetch_tiles() == PDL_PREFETCH_TILES
    with pytest.raises(ValueError, match="prefetch_tiles"):
        set_pdl(True, 3)


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_pdl_changes_no_bit_on_gpu():
    """PDL only moves launches in time: the token graph's image with and without it is bit-identical."""
    from test_gpu_fast_path import _setup

    from kernels import pdl_enabled, set_pdl
    from kernels._triton import gdc_available
    from runtime.fast.graph import GraphImageGenerator

    if torch.cuda.get_device_capability() < (9, 0) or not gdc_available():
        pytest.skip("PDL needs SM 9.0+ and a triton with grid-dependency control")
    assert pdl_enabled(DEV), "the PDL self-check failed on this GPU (see the warning logged)"
    model, backend, cfg, cache, kw = _setup("cuda")
    gen = GraphImageGenerator(model, kernels=True, weights="fp8")
    assert gen.pdl
    on = gen.generate(cache, **kw).image
    set_pdl(False)
    try:
        gen.reset_graphs()
        assert not gen.pdl
        off = gen.generate(cache, **kw).image
    finally:
        set_pdl(None)
    assert torch.equal(on, off)


def test_fp16_rows_rounds_as_the_fp8_kernels_do(monkeypatch):
    """fp16_rows: what the FP8 kernels multiply (kernels._triton.mma): through fp32, clamped to fp16's range.
    bf16 holds 65536 and infinities, which fp16 does not; a clamp in bf16 would round 65504 back up to 65536."""
    import kernels.fp8 as fp8
    from kernels.fp8 import F16_MAX, fp16_rows

    x = torch.tensor([1.0, -3.140625, 65536.0, -float("inf"), 1e-9, 6.5e4], dtype=torch.bfloat16)
    monkeypatch.setattr(fp8, "interpreting", lambda: True)  # the interpreter's kernels multiply fp32 rows as given
    assert fp16_rows(x) is x
    monkeypatch.setattr(fp8, "interpreting", lambda: False)
    got = fp16_rows(x)
    assert got.dtype == torch.float16
    assert got.tolist() == [1.0, -3.140625, F16_MAX, -F16_MAX, torch.tensor(1e-9, dtype=torch.bfloat16).half().item(),
                            torch.tensor(6.5e4, dtype=torch.bfloat16).half().item()]
    assert got[4] == 0  # 1e-9 is below fp16's smallest subnormal
    assert fp16_rows(got) is got


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("epilogue", [0, SWIGLU, GATED_RESIDUAL])
def test_fp8_kernels_round_bf16_rows_as_fp16_rows_on_gpu(epilogue):
    """Rounding the rows beforehand (kernels.fp8.fp16_rows, what the runtime now does) keeps every bit of the
    FP8 GEMMs against their in-loop conversion of bf16 rows; so do the other ways of widening the weights
    (kernels._triton.FP8_WIDEN_MODES) and 2 warps instead of 4 at the same tile."""
    from kernels._triton import FP8_WIDEN_MODES, set_fp8_widen
    from kernels.fp8 import fp16_rows

    g = torch.Generator().manual_seed(11)
    m, n, k = 2, 384, 1024
    x = (torch.randn(m, k, generator=g) * 3).to(DEV, torch.bfloat16)
    x[0, :4] = torch.tensor([7e4, -7e4, 1e-9, 65536.0])  # clamped, flushed, the bf16 value above fp16's max
    wq, sc = quantize_rows_fp8(torch.randn(2 * n if epilogue == SWIGLU else n, k, generator=g).to(DEV))
    gate = torch.randn(m, n, generator=g).to(DEV) if epilogue == GATED_RESIDUAL else None
    base = {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3}

    def run(rows, config=base):
        out = torch.zeros(m, n, device=DEV)
        return skinny_gemm(rows, wq, out, w_scale=sc, gate=gate, epilogue=epilogue, config=config)

    ref = run(x)
    assert torch.isfinite(ref).all()
    assert torch.equal(run(fp16_rows(x)), ref)
    assert torch.equal(run(x, dict(base, num_warps=2)), ref)
    try:
        for mode in FP8_WIDEN_MODES:
            set_fp8_widen(mode)
            assert torch.equal(run(x), ref), mode
    finally:
        set_fp8_widen(None)


@pytest.mark.gpu
@needs_gpu
def test_fused_moe_rounds_bf16_rows_as_fp16_rows_on_gpu():
    """The fused MoE, both kernel forms: rows rounded beforehand and every way of widening the weights keep
    every bit of the in-loop conversion of bf16 rows (as the GEMMs above)."""
    from kernels._triton import FP8_WIDEN_MODES, set_fp8_widen
    from kernels.fp8 import fp16_rows
    from kernels.moe import moe_decode

    g = torch.Generator().manual_seed(12)
    e, top, h, i = 8, 2, 256, 128
    wg, wu = (quantize_rows_fp8(torch.randn(e, i, h, generator=g).to(DEV) * 0.1) for _ in range(2))
    wd = quantize_rows_fp8(torch.randn(e, h, i, generator=g).to(DEV) * 0.1)
    xm = (torch.randn(2, h, generator=g) * 3).to(DEV, torch.bfloat16)
    ids = torch.tensor([[1, 5], [1, 5]], device=DEV)
    tw = torch.rand(2, top, generator=g).to(DEV)
    for grouped in (False, True):
        args = (ids, tw, wg[0], wu[0], wd[0], (wg[1], wu[1], wd[1]))
        want = moe_decode(xm, *args, grouped=grouped)
        assert torch.equal(moe_decode(fp16_rows(xm), *args, grouped=grouped), want), grouped
        try:
            for mode in FP8_WIDEN_MODES:
                set_fp8_widen(mode)
                assert torch.equal(moe_decode(xm, *args, grouped=grouped), want), (grouped, mode)
        finally:
            set_fp8_widen(None)


@torch.no_grad()
def test_prepare_decode_bf16_after_fp8_puts_the_original_linears_back():
    """A model prepared for FP8 and then for bf16 (a second generator, a benchmark timing both formats) streams
    bf16 again: no FP8 wrapper is left, the very modules of the checkpoint are back, and FP8 again wraps them anew."""
    from runtime.fast.decode_weights import FP8Linear, FusedSwiGLUDecode, prepare_decode

    model = build(tiny_config(), seed=0)
    before = dict(model.named_modules())
    fp8 = prepare_decode(model, "fp8")
    wrapped = fp8["fp8_linear_params"] + fp8["fp8_fused_swiglu_params"]
    assert wrapped > 0 and fp8["fp8_params_restored"] == 0
    bf16 = prepare_decode(model, "bf16")
    assert bf16["fp8_params_restored"] == wrapped
    assert not any(isinstance(m, (FP8Linear, FusedSwiGLUDecode)) for m in model.modules())
    after = dict(model.named_modules())
    assert all(after.get(k) is m for k, m in before.items())  # (prepare_decode adds the MoEs' fused_decode)
    assert prepare_decode(model, "fp8")["fp8_linear_params"] == fp8["fp8_linear_params"]


@torch.no_grad()
def test_prepare_decode_fp8_leaves_shared_experts_to_the_moe(monkeypatch):
    """With the shared experts as MoE slots (FP8 default) prepare_decode does not wrap them in FusedSwiGLUDecode
    (no second FP8 copy; the MoE's other modes keep them exact) and counts them apart; with MINGRT_MOE_SHARED=0
    they are wrapped, and a later FP8 preparation with the slots unwraps them again."""
    from models.llm import ExpertMLP, MoE
    from runtime.fast.decode_weights import SHARED_IN_MOE_ENV, FusedSwiGLUDecode, prepare_decode

    monkeypatch.delenv(SHARED_IN_MOE_ENV, raising=False)  # the default: FP8 shared experts as slots
    model = build(tiny_config(), seed=0)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    originals = [m.shared_experts for m in moes]
    folded = prepare_decode(model, "fp8")
    per_moe = 3 * model.cfg.llm.hidden_size * model.cfg.llm.moe_intermediate_size * model.cfg.llm.num_shared_experts
    assert folded["fp8_moe_shared_params"] == len(moes) * per_moe
    assert all(m.shared_experts is o and m.fused_decode.shared_slots for m, o in zip(moes, originals))
    monkeypatch.setenv(SHARED_IN_MOE_ENV, "0")
    apart = prepare_decode(model, "fp8")
    assert apart["fp8_moe_shared_params"] == 0
    assert apart["fp8_fused_swiglu_params"] == len(moes) * per_moe  # the only modules not wrapped yet
    assert all(isinstance(m.shared_experts, FusedSwiGLUDecode) for m in moes)
    monkeypatch.delenv(SHARED_IN_MOE_ENV)
    prepare_decode(model, "fp8")
    assert all(m.shared_experts is o and isinstance(o, ExpertMLP) for m, o in zip(moes, originals))
