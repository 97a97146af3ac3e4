"""kernels/fused_mlp.py: the flow head's block in two launches (SwiGLU MLP to partials; residual + next LayerNorm)
against the three-launch path it replaces, kernel by kernel and in the whole flow head.

Without a GPU the kernels run in Triton's interpreter (fp32 products); on a GPU the bounds allow for the
operands' rounding and w3's different split of its sum.
"""
import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (the 'kernels' extra)")

from conftest import assert_close

from kernels import interpreting
from kernels.fused_mlp import FUSED_MLP_MAX_ROWS, FusedMLPScratch, default_config, residual_ln_modulate, swiglu_partials
from kernels.layernorm import ln_modulate
from kernels.skinny import GATED_RESIDUAL, SWIGLU, skinny_gemm
from models import build, tiny_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REL = 2e-5 if interpreting() else 8e-3


def _blocks(g, w, hid, depth, fmt):
    from runtime.fast.kernel_flow_head import PackedLinear

    def lin(n_in, n_out):
        layer = torch.nn.Linear(n_in, n_out)
        torch.nn.init.normal_(layer.weight, std=n_in ** -0.5, generator=g)
        torch.nn.init.normal_(layer.bias, std=0.1, generator=g)
        return layer.to(DEV)

    return [dict(ln=(1 + 0.1 * torch.randn(w, generator=g).to(DEV), 0.1 * torch.randn(w, generator=g).to(DEV)),
                 w12=PackedLinear(lin(w, 2 * hid), fmt), w3=PackedLinear(lin(hid, w), fmt)) for _ in range(depth)]


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("m", [1, 3])
@torch.no_grad()
def test_fused_blocks_match_the_launches(fmt, m):
    """Two blocks and the final LayerNorm (no affine) at a size where hidden (688) leaves a partial BLOCK_H
    tile and W (256) spans several residual programs: h and every block's next rows equal the launches'
    (ln_modulate, SwiGLU GEMM, gated-residual GEMM), and the row tickets are re-armed (a second pass gives
    the same bits)."""
    g = torch.Generator().manual_seed(21)
    w, hid, depth = 256, 688, 2
    blocks = _blocks(g, w, hid, depth, fmt)
    mods = (0.3 * torch.randn(depth, 5 * m, 3 * w, generator=g)).to(DEV)[:, m:2 * m]  # a step's rows of a bigger buffer
    fmod = (0.3 * torch.randn(m, 2 * w, generator=g)).to(DEV)
    rows = torch.float16 if fmt == "fp8" else torch.bfloat16
    h0 = torch.randn(m, w, generator=g).to(DEV)

    ref, xn, act = h0.clone(), torch.empty(m, w, dtype=rows, device=DEV), torch.empty(m, hid, dtype=rows, device=DEV)
    ref_rows = []
    for b, mk in zip(blocks, mods):
        ln_modulate(ref, mk[:, :w], mk[:, w:2 * w], xn, weight=b["ln"][0], bias=b["ln"][1], eps=1e-6)
        ref_rows.append(xn.clone())
        skinny_gemm(xn, b["w12"].weight, act, w_scale=b["w12"].scale, bias=b["w12"].bias, epilogue=SWIGLU)
        skinny_gemm(act, b["w3"].weight, ref, w_scale=b["w3"].scale, bias=b["w3"].bias, gate=mk[:, 2 * w:],
                    epilogue=GATED_RESIDUAL)
    ln_modulate(ref, fmod[:, :w], fmod[:, w:], xn, eps=1e-6)
    ref_rows.append(xn.clone())

    scratch = FusedMLPScratch(m, w, hid, DEV)
    results = []
    for _ in range(2):
        h, xn = h0.clone(), torch.empty(m, w, dtype=rows, device=DEV)
        b0, mk0 = blocks[0], mods[0]
        ln_modulate(h, mk0[:, :w], mk0[:, w:2 * w], xn, weight=b0["ln"][0], bias=b0["ln"][1], eps=1e-6)
        got_rows = [xn.clone()]
        for j, (b, mk) in enumerate(zip(blocks, mods)):
            parts = swiglu_partials(xn, b["w12"].weight, b["w3"].weight, scratch, s12=b["w12"].scale, b12=b["w12"].bias)
            assert parts == -(-hid // default_config(w, hid, fmt == "fp8")["BLOCK_H"])
            if j + 1 < depth:
                nxt, (lw, lb) = mods[j + 1], blocks[j + 1]["ln"]
            else:
                nxt, (lw, lb) = fmod, (None, None)
            residual_ln_modulate(scratch, parts, h, mk[:, 2 * w:], nxt[:, :w], nxt[:, w:2 * w], xn,
                                 s3=b["w3"].scale, b3=b["w3"].bias, weight=lw, bias=lb, eps=1e-6)
            got_rows.append(xn.clone())
        assert int(scratch.tickets.abs().sum()) == 0  # re-armed for the next launch
        results.append((h, got_rows))
        # the two paths sum w12's products in other orders, so an activation may round to the neighbouring
        # value of the rows' type (one such flip was 2.4e-4 here): the bound is one ulp of it, not fp32's
        scale = max(1.0, ref.abs().max().item())
        assert_close(f"kernels/fused_mlp_h_{fmt}_m{m}", h, ref, max(REL, torch.finfo(rows).eps) * scale)
        for j, (got, want) in enumerate(zip(got_rows, ref_rows)):
            # the next rows are LayerNorm'd (unit scale) and rounded to the rows' type: within 2 of its ulps
            tol = max(2 * torch.finfo(rows).eps, 0 if interpreting() else 3e-2)
            assert_close(f"kernels/fused_mlp_rows{j}_{fmt}_m{m}", got.float(), want.float(),
                         tol * max(1.0, want.float().abs().max().item()))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@torch.no_grad()
def test_fused_mlp_refuses_bad_operands():
    g = torch.Generator().manual_seed(3)
    w, hid = 64, 96
    (b,) = _blocks(g, w, hid, 1, "bf16")
    scratch = FusedMLPScratch(2, w, hid, DEV)
    x = torch.randn(FUSED_MLP_MAX_ROWS + 1, w, generator=g).to(DEV, torch.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        swiglu_partials(x, b["w12"].weight, b["w3"].weight, scratch)
    with pytest.raises(ValueError, match="bad weights"):  # w3 given as (hidden, W)
        swiglu_partials(x[:2], b["w12"].weight, b["w3"].weight.t().contiguous(), scratch)
    with pytest.raises(ValueError, match="scratch"):  # more rows than the scratch's tickets
        swiglu_partials(x[:3], b["w12"].weight, b["w3"].weight, scratch)
    h = torch.zeros(2, w, device=DEV)
    mod = torch.zeros(2, 3 * w, device=DEV)
    with pytest.raises(ValueError, match="both LayerNorm"):
        residual_ln_modulate(scratch, 1, h, mod[:, 2 * w:], mod[:, :w], mod[:, w:2 * w], h, weight=b["ln"][0])
    with pytest.raises(ValueError, match="fp32"):
        residual_ln_modulate(scratch, 1, h.half(), mod[:, 2 * w:], mod[:, :w], mod[:, w:2 * w], h)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.no_grad()
def test_kernel_flow_head_fused_mlp(fmt):
    """The whole tiny flow head with fused_mlp: the launches' latent within rounding at 2 and 4 rows (1 and 2
    prompts), the same bits on a second call; above FUSED_MLP_MAX_ROWS rows (3 prompts) it runs the launches."""
    from runtime.fast.kernel_flow_head import KernelFlowHead

    model = build(tiny_config(), seed=0, device=DEV)
    g = torch.Generator().manual_seed(5)
    hid = torch.randn(3, 2, model.cfg.llm.hidden_size, generator=g).to(DEV)
    noise = torch.randn(3, model.cfg.flow_head.latent_dim, generator=g).to(DEV)
    s = [torch.tensor([v], device=DEV) for v in (2.5, 1.2, 0.8)]
    launches, fused = KernelFlowHead(model, weights=fmt), KernelFlowHead(model, weights=fmt, fused_mlp=True)
    for b in (1, 2):
        assert fused.uses_fused_mlp(2 * b)
        ref, got = launches(hid[:b], noise[:b], *s), fused(hid[:b], noise[:b], *s)
        assert torch.equal(fused(hid[:b], noise[:b], *s), got)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < (1e-5 if interpreting() else 2e-2), f"fused MLP ({fmt}, {b} prompts): rel L2 {rel:.2e}"
        assert all("fused" in buf for (m, _), buf in fused._scratch.items() if m == 2 * b)  # the path ran
    assert not fused.uses_fused_mlp(6)
    assert torch.equal(fused(hid, noise, *s), launches(hid, noise, *s))
    fused.set_fused_mlp(False)
    assert torch.equal(fused(hid[:1], noise[:1], *s), launches(hid[:1], noise[:1], *s))
