"""MingTok against the upstream golden outputs (fp32, CPU)."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_close, fixture_dir, load_case
from models.checkpoint import load_into
from models.hf_config import mingtok_from_upstream
from models.mingtok import MingTok

CASES = sorted(d.name for d in FIXTURES.glob("mingtok*") if (d / "case.json").exists()) or ["mingtok"]
ATOL = 1e-5  # single forward passes of O(1) values


@pytest.fixture(scope="module", params=CASES)
def case(request):
    meta, t = load_case(request.param)
    model = MingTok(mingtok_from_upstream(meta["config"])).eval()
    load_into(model, load_file(str(fixture_dir(request.param) / "weights.safetensors")))
    return request.param, model, t


@torch.no_grad()
def test_encoder(case):
    name, m, t = case
    assert_close(f"{name}/encoder_tokens_in", m.low_level_encoder.tokens(t["image"]), t["encoder_tokens_in"], ATOL)
    assert_close(f"{name}/encoder_out_raw", m.low_level_encoder(t["image"]), t["encoder_out_raw"], ATOL)
    enc = m.encode(t["image"])
    assert_close(f"{name}/latent", enc["latent"], t["latent"], ATOL)
    assert_close(f"{name}/x_norm_patchtokens", enc["features"], t["x_norm_patchtokens"], ATOL)


@torch.no_grad()
def test_pixel_decoder(case):
    name, m, t = case
    tokens = m.features_to_pixel_tokens(t["x_norm_patchtokens"])
    assert_close(f"{name}/pixel_decoder_out_preclamp", m.pixel_decoder.head_tokens(tokens), t["pixel_decoder_out_preclamp"], ATOL)
    assert_close(f"{name}/pixel_image", m.decode_pixels(t["x_norm_patchtokens"]), t["pixel_image"], ATOL)


@torch.no_grad()
def test_incremental_semantic_decoder(case):
    """The intended (cache-honouring) incremental decode, token by token, and its final cache."""
    name, m, t = case
    sem = m.semantic_decoder
    keys, values = sem.empty_cache(t["latent"].shape[0])
    outs = []
    n = t["incremental_x_norm_patchtokens"].shape[1]
    for i in range(n):
        f, keys, values = sem.forward_cached(m.denormalize(t["latent"][:, i:i + 1]), keys, values)
        outs.append(f)
    assert_close(f"{name}/incremental_x_norm_patchtokens", torch.cat(outs, 1), t["incremental_x_norm_patchtokens"], ATOL)
    for i in range(len(keys)):
        assert_close(f"{name}/semdec_cache_key_l{i}", keys[i], t[f"semdec_cache_key_l{i}"], ATOL)
        assert_close(f"{name}/semdec_cache_value_l{i}", values[i], t[f"semdec_cache_value_l{i}"], ATOL)
    # And it is NOT upstream's CPU-fallback result, which drops the cache (a known upstream bug).
    bug = t["incremental_x_norm_patchtokens_cpu_default"]
    assert (torch.cat(outs, 1) - bug).abs().max() > 1e-2


@torch.no_grad()
def test_parallel_equals_incremental(case):
    name, m, t = case
    z = t["latent"][:, :-1]  # patch latents, no cls
    parallel = m.decode_features(z)
    keys, values = m.semantic_decoder.empty_cache(z.shape[0])
    outs = []
    for i in range(z.shape[1]):
        f, keys, values = m.semantic_decoder.forward_cached(m.denormalize(z[:, i:i + 1]), keys, values)
        outs.append(f)
    assert_close(f"{name}/parallel_vs_incremental", torch.cat(outs, 1), parallel, ATOL)
