"""BailingMoe (prefill with and without image routing, one decode step, caches, routing) vs upstream."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_close, fixture_dir, load_case
from models.checkpoint import load_into
from models.hf_config import flow_from_upstream, llm_from_upstream
from models.llm import LanguageModel

CASES = sorted(d.name for d in FIXTURES.glob("llm*") if (d / "case.json").exists()) or ["llm"]
ATOL = 1e-5


@pytest.fixture(scope="module", params=CASES)
def case(request):
    meta, t = load_case(request.param)
    cfg = llm_from_upstream(meta["config"])
    vh = meta["vishead"]
    flow = flow_from_upstream(vh, cfg.hidden_size, vh["image_emb_dim_for_gen"])
    model = LanguageModel(cfg, flow).eval()
    load_into(model, load_file(str(fixture_dir(request.param) / "weights.safetensors")))
    return request.param, meta, model, t


@pytest.mark.parametrize("tag", ["noimg", "img"])
@pytest.mark.parametrize("moe_mode", ["loop", "gather", "dense"])
@torch.no_grad()
def test_prefill_and_decode(case, tag, moe_mode):
    name, meta, m, t = case
    image_mask = t["image_mask"] if tag == "img" else None
    record = {}
    keys, values = m.model.empty_cache(t["inputs_embeds"].shape[0])
    hidden, keys, values = m.model(t["inputs_embeds"], t["attention_mask"], t["position_ids"], keys, values,
                                   image_mask=image_mask, moe_mode=moe_mode, record=record)
    p = f"{name}/{tag}/{moe_mode}"
    assert_close(f"{p}/last_hidden_state", hidden, t[f"{tag}_last_hidden_state"], ATOL)
    assert_close(f"{p}/logits", m.logits(hidden), t[f"{tag}_logits"], ATOL)
    for i in range(len(m.model.layers)):
        assert_close(f"{p}/layer_input_l{i}", record["layer_inputs"][i], t[f"{tag}_layer_input_l{i}"], ATOL)
        assert_close(f"{p}/router_logits_l{i}", record["router_logits"][i], t[f"{tag}_router_logits_l{i}"], ATOL)
        assert torch.equal(record["topk_idx"][i], t[f"{tag}_topk_idx_l{i}"]), f"{p}: layer {i} routed differently"
    hidden, keys, values = m.model(t["decode_inputs_embeds"], t["decode_attention_mask"], t["decode_position_ids"],
                                   keys, values, moe_mode=moe_mode)
    assert_close(f"{p}/decode_last_hidden_state", hidden, t[f"{tag}_decode_last_hidden_state"], ATOL)
    assert_close(f"{p}/decode_logits", m.logits(hidden), t[f"{tag}_decode_logits"], ATOL)
    for i in range(len(keys)):
        assert_close(f"{p}/cache_key_l{i}", keys[i], t[f"{tag}_cache_key_l{i}"], ATOL)
        assert_close(f"{p}/cache_value_l{i}", values[i], t[f"{tag}_cache_value_l{i}"], ATOL)


@torch.no_grad()
def test_two_d_positions_equal_identical_rows(case):
    """(B, L) position ids are the (3, B, L) identical-row form upstream builds."""
    name, meta, m, t = case
    keys, values = m.model.empty_cache(1)
    h2, _, _ = m.model(t["inputs_embeds"], t["attention_mask"], t["position_ids"][0], keys, values)
    assert_close(f"{name}/positions_2d", h2, t["noimg_last_hidden_state"], ATOL)


@torch.no_grad()
def test_mrope_distinct_rows(case):
    name, meta, m, t = case
    keys, values = m.model.empty_cache(1)
    hidden, _, _ = m.model(t["inputs_embeds"], t["attention_mask"], t["mrope_distinct_position_ids"], keys, values)
    assert_close(f"{name}/mrope_distinct_last_hidden_state", hidden, t["mrope_distinct_last_hidden_state"], ATOL)


@torch.no_grad()
def test_vis_head(case):
    name, meta, m, t = case
    assert_close(f"{name}/vis_head_out", m.vis_head(t["noimg_last_hidden_state"][:, -1:]), t["vis_head_out"], ATOL)
