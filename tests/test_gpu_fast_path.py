"""The fast path: hoisted-invariant flow head and the per-token graph equal the reference.

The CPU tests run the same step function eagerly; the GPU tests capture and replay the CUDA graph.
"""
import pytest
import torch

from conftest import assert_close
from models import build, tiny_config
from models.flow_head import draw_noise
from models.pieces import FlowHeadPiece
from models.prompting import cfg_masks
from runtime import loop
from runtime.backends.torch_eager import TorchBackend
from runtime.fast.flow_head import FastFlowHead
from runtime.fast.graph import GraphImageGenerator

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(device, dtype=torch.float32, batch=2):
    model = build(tiny_config(), seed=0, device=device, dtype=dtype)
    backend, cfg = TorchBackend(model), model.cfg
    ids = [[490, 5, 6, 7, 8, 492], [490, 9, 10, 11, 12, 492]][:batch]
    masks = [cfg_masks(i, (490,), (492,), [500, 501, 502]) for i in ids]
    cache = loop.prefill(backend, cfg, backend.embed(torch.tensor(ids, device=device)))
    kw = dict(uncond_mask=torch.tensor([m[0] for m in masks], device=device),
              text_uncond_mask=torch.tensor([m[1] for m in masks], device=device),
              noise=draw_noise(torch.Generator().manual_seed(0), batch, 16, 16).to(device),
              text_cfg=2.0, image_cfg=1.3, temperature=0.9)
    return model, backend, cfg, cache, kw


@pytest.mark.parametrize("rows", [1, 2, 3])
@torch.no_grad()
def test_fast_flow_head_equals_piece(rows):
    model = build(tiny_config(), seed=0)
    h = torch.randn(2, rows, 256)
    n = torch.randn(2, 16)
    s = [torch.tensor([v]) for v in (2.5, 1.2, 0.8)]
    assert_close(f"fast/flow_head_rows{rows}", FastFlowHead(model)(h, n, *s), FlowHeadPiece(model)(h, n, *s), 1e-5)


@torch.no_grad()
def test_static_step_equals_loop_on_cpu():
    model, backend, cfg, cache, kw = _setup("cpu")
    ref = loop.generate_image(backend, cfg, cache, **kw)
    gen = GraphImageGenerator(model, use_graph=False)
    out = gen.generate(cache, **kw)
    assert_close("fast/cpu_static_latents", out.latents, ref.latents, 1e-5)
    assert_close("fast/cpu_static_image", out.image, ref.image, 1e-5)
    assert_close("fast/cpu_static_cache", out.cache.kv[-1], ref.cache.kv[-1], 1e-5)
    assert torch.equal(out.row_masks, ref.row_masks)
    again = gen.generate(cache, **kw)  # buffers are reloaded: a second call gives the same image
    assert torch.equal(again.image, out.image)


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_cuda_graph_equals_eager_on_gpu():
    model, backend, cfg, cache, kw = _setup("cuda")
    ref = loop.generate_image(backend, cfg, cache, **kw)
    gen = GraphImageGenerator(model, kernels=False)  # exact: the kernels' bf16 operands are tested apart
    out = gen.generate(cache, **kw)
    assert gen._buckets and all(k.graph is not None for k in gen._buckets.values())
    assert_close("gpu/graph_latents", out.latents, ref.latents, 1e-4)
    assert_close("gpu/graph_image", out.image, ref.image, 1e-4)
    again = gen.generate(cache, **kw)
    assert torch.equal(again.image, out.image)


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_cuda_graph_bf16_close_to_fp32_reference():
    model32, backend32, cfg, cache32, kw = _setup("cuda")
    ref = loop.generate_image(backend32, cfg, cache32, **kw)
    model, backend, cfg, cache, kw16 = _setup("cuda", torch.bfloat16)
    out = GraphImageGenerator(model, kernels=False).generate(cache, **kw16)
    from export.verify import psnr

    assert psnr(out.image.float(), ref.image) > 25


def test_inductor_pdl_follows_our_pdl_unless_turned_off(monkeypatch):
    """torch.compile gets Inductor's PDL switch wherever our kernels use PDL (and this torch has the switch),
    unless MINGRT_INDUCTOR_PDL=0."""
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("MINGRT_INDUCTOR_PDL", raising=False)
    gen = GraphImageGenerator(build(tiny_config(), seed=0), kernels=False, compile=False)
    assert gen.pdl is False and gen._inductor_options() is None  # our kernels do not launch with PDL here
    gen.pdl = True
    want = {"triton.enable_pdl": True} if hasattr(inductor_config.triton, "enable_pdl") else None
    assert gen._inductor_options() == want
    monkeypatch.setenv("MINGRT_INDUCTOR_PDL", "1")
    assert gen._inductor_options() == want
    monkeypatch.setenv("MINGRT_INDUCTOR_PDL", "0")
    assert gen._inductor_options() is None


@torch.no_grad()
def test_graphed_backend_on_cpu_is_the_backend():
    """Off the GPU the graphed pieces run directly: the same outputs, and other pieces pass through."""
    from runtime.fast.graphed import GRAPHED_PIECES, GraphedBackend

    model = build(tiny_config(), seed=0)
    inner = TorchBackend(model)
    be = GraphedBackend(inner)
    assert be.name == "torch" and be.model is model and set(be._calls) == set(GRAPHED_PIECES)
    feats = torch.randn(1, 16, model.cfg.mingtok.semantic_dim)
    assert torch.equal(be.run("pixel_decoder", feats)[0], inner.run("pixel_decoder", feats)[0])
    img = torch.rand(1, 3, model.cfg.mingtok.image_size, model.cfg.mingtok.image_size) * 2 - 1
    for a, b in zip(be.run("encoder", img), inner.run("encoder", img)):
        assert torch.equal(a, b)
    assert not be._calls["pixel_decoder"]._graphs  # nothing captured on the CPU
    import copy

    assert copy.copy(be).inner is inner  # no __getattr__ recursion on an instance without its fields yet


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_graphed_pieces_replay_the_eager_kernels_on_gpu():
    """The encoders and pixel decoder never sync with the host (so they can be captured); replayed from
    CUDA graphs they give the eager outputs bit for bit, for fresh inputs on every call; evicted
    signatures recapture."""
    from runtime.fast.graphed import GRAPHED_PIECES, GraphedBackend

    model = build(tiny_config(), seed=0, device="cuda", dtype=torch.bfloat16)
    inner = TorchBackend(model)
    s, d = model.cfg.mingtok.image_size, model.cfg.mingtok.semantic_dim
    u = model.cfg.understanding_image_size
    inputs = {"encoder": torch.zeros(1, 3, s, s, device="cuda", dtype=torch.bfloat16),
              "encoder_understanding": torch.zeros(1, 3, u, u, device="cuda", dtype=torch.bfloat16),
              "pixel_decoder": torch.zeros(1, 16, d, device="cuda", dtype=torch.bfloat16)}
    assert set(inputs) == set(GRAPHED_PIECES)
    for piece, x in inputs.items():  # first calls may set up handles and caches
        inner.run(piece, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside a piece raises here
    try:
        for piece, x in inputs.items():
            inner.run(piece, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    be = GraphedBackend(inner)
    be._calls["pixel_decoder"].max_graphs = 1
    for batch in (1, 2, 1):  # the third call recaptures batch 1 (max_graphs=1 dropped it)
        feats = torch.randn(batch, 16, d, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(be.run("pixel_decoder", feats)[0], inner.run("pixel_decoder", feats)[0])
        img = (torch.rand(batch, 3, s, s, device="cuda") * 2 - 1).to(torch.bfloat16)
        for a, b in zip(be.run("encoder", img), inner.run("encoder", img)):
            assert torch.equal(a, b)
    assert len(be._calls["pixel_decoder"]._graphs) == 1 and len(be._calls["encoder"]._graphs) == 2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("form", ["models.sdpa", "kernel"])
def test_llm_decode_attention_repeats_bit_for_bit_on_gpu(form):
    """The LLM's decode attention at the released shapes (GQA 16/4 heads of 128, key mask, 320 slots),
    replayed 100 times from a CUDA graph on fixed inputs: every output equals the first (torch's cuDNN
    backend, which models.sdpa leaves out, differed in 47 of 200 such replays on an H200), and both forms
    are close to an fp32 reference."""
    from benchmarks.speed import capture
    from kernels.attention import decode_attention
    from models.sdpa import attention

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, 16, 1, 128, device=dev, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 4, 320, 128, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 1, 1, 320, dtype=torch.bool, device=dev)
    mask[:, :, :, 280:] = False
    mask[1, :, :, 5:20] = False
    out = torch.empty_like(q)
    if form == "kernel":
        fn = lambda: decode_attention(q, k, v, mask, 128 ** -0.5)  # noqa: E731
    else:
        fn = lambda: attention(q, k, v, attn_mask=mask, scale=128 ** -0.5, enable_gqa=True)  # noqa: E731
    replay = capture(lambda: out.copy_(fn()))
    replay()
    first = out.clone()
    differing = 0
    for _ in range(100):
        replay()
        differing += not torch.equal(out, first)
    assert differing == 0
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                                           v.float().repeat_interleave(4, 1), attn_mask=mask,
                                                           scale=128 ** -0.5)
    assert (first.float() - ref).abs().max() < 2e-2


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_patch_embedding_runs_as_a_gemm_on_the_gpu():
    """On a GPU MingTok's patch embedding is the GEMM form (bit for bit), which agrees with the checkpoint's
    convolution up to bf16 rounding."""
    from models.mingtok import PatchEmbed

    torch.manual_seed(0)
    m = PatchEmbed(32, 768).cuda().to(torch.bfloat16)
    img = (torch.rand(2, 3, 512, 512, device="cuda") * 2 - 1).to(torch.bfloat16)
    got = m(img)
    assert torch.equal(got, m.as_gemm(img))
    conv = m.proj(img).flatten(2).transpose(1, 2)
    assert got.shape == conv.shape == (2, 256, 768)
    assert (got.float() - conv.float()).abs().max().item() <= 2e-2 * conv.float().abs().max().item()
    # an export keeps the convolution on the GPU too: the graph does not depend on the device it was made on
    targets = {str(n.target) for n in torch.export.export(m, (img,)).graph.nodes if n.op == "call_function"}
    # (torch.export keeps the pre-dispatch op, aten.conv2d; a decomposed graph would say aten.convolution)
    assert any("conv2d" in t or "convolution" in t for t in targets), targets
    assert not any("linear" in t or ".mm" in t or "matmul" in t for t in targets), targets
