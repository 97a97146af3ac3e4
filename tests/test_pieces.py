"""The exported-piece modules compute what the reference model computes; static caches equal concat caches."""
import pytest
import torch

from conftest import assert_close
from models.contract import PIECE_NAMES, piece_specs
from models.pieces import LLMStatic, SemanticDecoderStatic, build_pieces

ATOL = 1e-5


@pytest.fixture(scope="module")
def pieces(tiny_model):
    return build_pieces(tiny_model)


def test_contract_covers_every_piece(tiny_model, pieces):
    specs = piece_specs(tiny_model.cfg)
    assert set(specs) == set(PIECE_NAMES) == set(pieces)
    llm = specs["llm_step"]
    assert llm.input_names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "image_mask"]
    assert llm.input_names[4:6] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert llm.output_names[2:4] == ["present.0.key", "present.0.value"]
    assert llm.dynamic_axes["past_key_values.0.key"] == {0: "batch_size", 2: "past_sequence_length"}
    assert specs["flow_head"].dynamic_axes["condition_hidden"] == {0: "batch_size", 1: "cfg_rows"}


@torch.no_grad()
def test_encoder_piece(tiny_model, pieces):
    img = torch.rand(2, 3, 128, 128) * 2 - 1
    latents, feats, embeds = pieces["encoder"](img)
    ref = tiny_model.vision.encode(img)
    assert latents.shape == (2, 17, 16) and feats.shape == (2, 16, 128) and embeds.shape == (2, 16, 256)
    assert_close("pieces/encoder_latents", latents, ref["latent"], ATOL)
    assert_close("pieces/encoder_embeds", embeds, tiny_model.linear_proj(ref["features"]), ATOL)
    assert torch.equal(tiny_model.vision.encode_latents(img), ref["latent"])  # the latents alone, same ops


@torch.no_grad()
@pytest.mark.parametrize("size", [(128, 128), (96, 160), (70, 100)])
def test_patch_embed_gemm_form_equals_the_convolution(size):
    """The GPU's form of the patch embedding (one GEMM over the patches) is the checkpoint's convolution:
    same shape and raster order, sums equal to fp32 rounding; a size off the patch grid drops the remainder."""
    from models.mingtok import PatchEmbed

    torch.manual_seed(0)
    m = PatchEmbed(16, 64)
    img = torch.randn(2, 3, *size)
    ref = m(img)  # on the CPU: the convolution
    assert ref.shape == (2, (size[0] // 16) * (size[1] // 16), 64)
    assert_close(f"pieces/patch_embed_gemm_{size[0]}x{size[1]}", m.as_gemm(img), ref, 1e-5)
    moved = img.clone()
    moved[0, 0, 0, 0] += 1.0  # one pixel of image 0's first patch: only its token 0 changes
    diff = (m.as_gemm(moved) - m.as_gemm(img)).abs().amax(dim=-1)
    assert diff[0, 0] > 0 and torch.all(diff[0, 1:] == 0) and torch.all(diff[1] == 0)


@torch.no_grad()
def test_semantic_decoder_piece_step_and_prefill(tiny_model, pieces):
    piece = pieces["semantic_decoder"]
    depth = len(tiny_model.vision.semantic_decoder.blocks)
    z = torch.randn(2, 16, 16)
    empty = tuple(torch.zeros(2, 2, 0, 64) for _ in range(2 * depth))
    prefill = piece(z, *empty)
    assert_close("pieces/semdec_prefill", prefill[0], tiny_model.vision.decode_features(z), ATOL)
    past = empty
    steps = []
    for i in range(16):
        out = piece(z[:, i:i + 1], *past)
        steps.append(out[0])
        past = out[2:]
    assert past[0].shape == (2, 2, 16, 64)
    assert_close("pieces/semdec_steps_vs_prefill", torch.cat(steps, 1), prefill[0], ATOL)
    assert_close("pieces/semdec_cache", past[-1], prefill[-1], ATOL)
    # prefill half, then step the rest on its cache
    half = piece(z[:, :8], *empty)
    rest = piece(z[:, 8:], *half[2:])
    assert_close("pieces/semdec_split_prefill", rest[0], prefill[0][:, 8:], ATOL)


@torch.no_grad()
def test_semantic_decoder_static_equals_concat(tiny_model, pieces):
    static = SemanticDecoderStatic(tiny_model)
    depth = len(tiny_model.vision.semantic_decoder.blocks)
    z = torch.randn(1, 16, 16)
    caches = tuple(torch.zeros(1, 2, 24, 64) for _ in range(2 * depth))  # max_len 24 > 16 used
    outs = [static(z[:, i:i + 1], torch.tensor([i]), *caches)[0] for i in range(16)]
    ref = pieces["semantic_decoder"](z, *(torch.zeros(1, 2, 0, 64) for _ in range(2 * depth)))
    assert_close("pieces/semdec_static", torch.cat(outs, 1), ref[0], ATOL)
    assert_close("pieces/semdec_static_cache", caches[0][:, :, :16], ref[2], ATOL)


def _llm_inputs(model, b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = model.cfg.llm.hidden_size
    embeds = torch.randn(b, n, h, generator=g) * 0.5
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 2:5] = 0  # an uncond-like row
    image_mask = torch.zeros(b, n, dtype=torch.bool)
    image_mask[2, 1:4] = True
    return embeds, mask, image_mask


@pytest.mark.parametrize("piece_name", ["llm_prefill", "llm_step"])
@torch.no_grad()
def test_llm_piece_matches_reference(tiny_model, pieces, piece_name):
    embeds, mask, image_mask = _llm_inputs(tiny_model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keys, values = tiny_model.llm.empty_cache(3)
    hidden, ref_k, ref_v = tiny_model.llm(embeds, mask, positions, keys, values, image_mask=image_mask)
    past = tuple(t for kv in zip(keys, values) for t in kv)
    out = pieces[piece_name](embeds, mask, positions, image_mask, *past)
    assert_close(f"pieces/{piece_name}_hidden", out[0], hidden[:, -1:], ATOL)
    assert_close(f"pieces/{piece_name}_logits", out[1], tiny_model.model.logits(hidden[:, -1:]), ATOL)
    assert_close(f"pieces/{piece_name}_cache", out[2], ref_k[0], ATOL)


@torch.no_grad()
def test_llm_static_equals_concat(tiny_model, pieces):
    """Prefill then three decode steps, once through grown caches and once through fixed buffers."""
    embeds, mask, image_mask = _llm_inputs(tiny_model)
    b, n, h = embeds.shape
    layers = tiny_model.cfg.llm.num_layers
    s_max = 16
    static = LLMStatic(tiny_model)
    caches = tuple(torch.zeros(b, 1, s_max, 128) for _ in range(2 * layers))
    full_mask = torch.zeros(b, s_max, dtype=torch.long)
    full_mask[:, :n] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out_s = static(embeds, full_mask, positions, image_mask, torch.arange(n), *caches)
    past = tuple(torch.zeros(b, 1, 0, 128) for _ in range(2 * layers))
    out_c = pieces["llm_prefill"](embeds, mask, positions, image_mask, *past)
    assert_close("pieces/llm_static_prefill", out_s[0], out_c[0], ATOL)
    cur_mask, past = mask, out_c[2:]
    for step in range(3):
        x = torch.randn(b, 1, h) * 0.5
        cur_mask = torch.cat([cur_mask, torch.ones(b, 1, dtype=torch.long)], 1)
        pos = (cur_mask.cumsum(-1) - 1)[:, -1:]
        full_mask[:, n + step] = 1
        no_image = torch.zeros(b, 1, dtype=torch.bool)
        out_c = pieces["llm_step"](x, cur_mask, pos, no_image, *past)
        past = out_c[2:]
        out_s = static(x, full_mask, pos, no_image, torch.tensor([n + step]), *caches)
        assert_close(f"pieces/llm_static_step{step}", out_s[0], out_c[0], ATOL)
        assert_close(f"pieces/llm_static_step{step}_logits", out_s[1], out_c[1], ATOL)


@pytest.mark.parametrize("rows", [1, 2, 3])
@torch.no_grad()
def test_flow_head_piece(tiny_model, pieces, rows):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(2, rows, 256, generator=g)
    noise = torch.randn(2, 16, generator=g)
    scal = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    out = pieces["flow_head"](hidden, noise, scal(2.5), scal(1.3), scal(0.9))
    z = tiny_model.model.vis_head(hidden).reshape(2 * rows, -1)
    ref = tiny_model.flow_head.sample(z, noise, text_cfg=2.5, image_cfg=1.3, temperature=0.9)
    assert_close(f"pieces/flow_head_rows{rows}", out, ref, ATOL)
    if rows == 2:  # the one-formula guidance is upstream's two-row formula exactly
        z2 = z.view(2, 2, -1)
        for b in range(2):
            one = tiny_model.flow_head.sample(z2[b], noise[b:b + 1], text_cfg=2.5, image_cfg=1.3, temperature=0.9)
            assert_close(f"pieces/flow_head_rows2_prompt{b}", out[b:b + 1], one, ATOL)


@torch.no_grad()
def test_pixel_decoder_piece(tiny_model, pieces):
    feats = torch.randn(1, 16, 128)
    img = pieces["pixel_decoder"](feats)
    assert img.shape == (1, 3, 128, 128) and img.min() >= -1 and img.max() <= 1
    assert_close("pieces/pixel_decoder", img, tiny_model.vision.decode_pixels(feats), ATOL)


def test_fast_init_allocates_in_the_target_dtype_with_the_same_weights():
    """build(fast_init=True) (the full model on a GPU) casts on the meta device before allocating, so the
    full model never exists in fp32; the weights equal the plain path's bit for bit."""
    from models import build, tiny_config

    fast = build(tiny_config(), seed=3, dtype=torch.bfloat16, fast_init=True)
    plain = build(tiny_config(), seed=3, dtype=torch.bfloat16, fast_init=False)
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_router_takes_the_lower_expert_id_among_ties():
    """Tied router scores (frequent with bf16 logits) pick and order experts by id, the same on every call
    and in ONNX (TopK's rule); untied scores route as torch.topk does."""
    from models.config import tiny_config
    from models.llm import Router

    cfg = tiny_config().llm  # 8 experts, top 2
    r = Router(cfg)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0, 3.0, -1.0, 2.0])
    idx, w, _ = r(torch.eye(cfg.hidden_size)[:1])  # logits = weight[:, 0]
    assert idx.tolist() == [[1, 3]]  # three experts tie at 3.0: ids 1 and 3, in that order
    assert torch.equal(w, torch.full((1, 2), 0.5))  # renormalised over the two
    torch.manual_seed(0)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(64, cfg.hidden_size)
    idx, w, logits = r(x)
    ref_w, ref_idx = torch.topk(logits.softmax(-1, dtype=torch.float32), 2, dim=-1)
    assert torch.equal(idx, ref_idx) and torch.allclose(w, ref_w / ref_w.sum(-1, keepdim=True))


def test_attention_leaves_out_the_cudnn_backend(monkeypatch):
    """The LLM's and MingTok's attention run with torch's cuDNN backend switched off (it did not repeat
    bit for bit on an H200 for masked calls; on CPU tensors it is never on), and switch it back on afterwards."""
    import torch.nn.functional as F

    from models import build, tiny_config

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    from models.vit_layers import SelfAttention

    m = build(tiny_config(), seed=0)
    llm = m.cfg.llm
    past = [torch.zeros(1, llm.num_kv_heads, 0, llm.head_dim)] * llm.num_layers
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        m.model.model(torch.randn(1, 5, llm.hidden_size), torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None],
                      past, past)
        SelfAttention(128, 64)(torch.randn(1, 4, 128), causal=True)
    assert len(seen) == llm.num_layers + 1 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_cudnn_attention_only_for_unmasked_full_passes_on_a_gpu():
    """cuDNN leads the backend list only for a GPU call with several queries and no mask (MingTok's full
    passes); masked calls, one-query calls and CPU calls keep the repeatable list."""
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    from models.sdpa import MASKLESS_BACKENDS, REPEATABLE_BACKENDS, backends_for

    def q(cuda, n):
        return SimpleNamespace(is_cuda=cuda, shape=(1, 16, n, 64))

    assert MASKLESS_BACKENDS[0] == SDPBackend.CUDNN_ATTENTION and SDPBackend.CUDNN_ATTENTION not in REPEATABLE_BACKENDS
    assert backends_for(q(True, 1024), None) is MASKLESS_BACKENDS
    assert backends_for(q(True, 1024), torch.ones(1024, 1024, dtype=torch.bool)) is REPEATABLE_BACKENDS
    assert backends_for(q(True, 1), None) is REPEATABLE_BACKENDS
    assert backends_for(q(False, 1024), None) is REPEATABLE_BACKENDS


def test_unmasked_full_passes_run_with_cudnn_first_and_restore_the_order(monkeypatch):
    """When backends_for picks the maskless list, attention() enables cuDNN and puts it first for the call,
    then puts torch's order and switches back as they were; other calls run with cuDNN off."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    import models.sdpa as sdpa

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch._C._get_sdp_priority_order()[0], torch.backends.cuda.cudnn_sdp_enabled()))
        return real(*args, **kwargs)

    order, cudnn_on = torch._C._get_sdp_priority_order(), torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 5, 8)
    monkeypatch.setattr(sdpa, "backends_for", lambda q, mask: sdpa.MASKLESS_BACKENDS)  # as on a GPU
    sdpa.attention(q, q, q, is_causal=True)
    monkeypatch.undo()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    sdpa.attention(q, q, q, is_causal=True)  # on the CPU: the repeatable list, cuDNN off
    assert seen == [(int(SDPBackend.CUDNN_ATTENTION), True), (seen[1][0], False)]
    assert torch._C._get_sdp_priority_order() == order and torch.backends.cuda.cudnn_sdp_enabled() == cudnn_on
