"""Tiny end-to-end text-to-image and editing against upstream's generate_image (fixture noise, fp32)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_close, load_case
from models.hf_config import from_upstream
from models.pipeline import ReferencePipeline
from models.prompting import cfg_masks
from models.univision import MingUniVision, load_parts

CASES = sorted(d.name for d in FIXTURES.glob("e2e_*") if (d / "case.json").exists())
SINGLE = 1e-5  # one forward pass
AUTOREGRESSIVE = 1e-4  # outputs fed back through 17 steps (fixtures README)


def _weights_path(case_dir, spec: str):
    return case_dir / spec.split()[0]


def _build(meta, case_dir):
    w = meta["weights"]
    mt_path, llm_path = _weights_path(case_dir, w["mingtok"]), _weights_path(case_dir, w["llm"])
    mt_meta = json.loads((mt_path.parent / "case.json").read_text())
    llm_meta = json.loads((llm_path.parent / "case.json").read_text())
    llm_cfg = dict(llm_meta["config"], **meta.get("config_overrides", {}))
    lay = meta["prompt_layout"]
    cfg = from_upstream(mt_meta["config"], llm_cfg, llm_meta["vishead"], mlp_depth=2,
                        user_prefix=lay["user_prefix_ids"], assistant_prefix=lay["assistant_prefix_ids"], name="fixture",
                        image_end=lay["image_end_token"])
    model = MingUniVision(cfg).eval()
    load_parts(model, mingtok=load_file(str(mt_path)), llm=load_file(str(llm_path)),
               linear_proj=load_file(str(_weights_path(case_dir, w["linear_proj"]))))
    return model


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_generate_image(name):
    meta, t = load_case(name)
    case_dir = FIXTURES / name
    model = _build(meta, case_dir)
    pipe = ReferencePipeline(model)
    lay = meta["prompt_layout"]
    ids = t["prompt_input_ids"]
    assert ids[0].tolist() == lay["ids"]

    # The processor's CFG-mask rule reproduces upstream's masks from the ids alone.
    image_ids = [lay["image_start_token"], lay["image_patch_token"], lay["image_end_token"]]
    uncond, text_uncond = cfg_masks(lay["ids"], lay["user_prefix_ids"], lay["assistant_prefix_ids"], image_ids)
    assert uncond == t["uncond_attention_mask"][0].tolist()
    assert text_uncond == t["text_uncond_attention_mask"][0].tolist()

    embeds, image_mask = pipe.prompt_embeds(ids, t.get("source_image"))
    assert_close(f"{name}/prompt_inputs_embeds", embeds, t["prompt_inputs_embeds"], SINGLE)
    if "prefill_image_mask" in t:
        assert torch.equal(image_mask, t["prefill_image_mask"])
    state = pipe.prefill(embeds, image_mask=image_mask if image_mask.any() else None)

    cfg = meta["cfg_effective_in_sample"]
    # Our pipeline honours the caller's values; upstream's effective ones are what produced the fixture.
    result = pipe.generate_image(state, uncond_mask=t["uncond_attention_mask"],
                                 text_uncond_mask=t["text_uncond_attention_mask"], noise=t["noise"][:, None, :],
                                 text_cfg=cfg["text_cfg"], image_cfg=cfg["image_cfg"], temperature=cfg["temperature"],
                                 record=True)
    assert result.row_masks.shape[1] == meta["num_cfg_branches"]
    assert torch.equal(result.debug["position_ids"], t["step_position_ids"])
    assert torch.equal(result.row_masks[0].long(), t["final_attention_mask"])
    assert_close(f"{name}/step_vis_head_in", result.debug["hidden"], t["step_vis_head_in"], AUTOREGRESSIVE)
    assert_close(f"{name}/step_vis_head_out", result.debug["condition"], t["step_vis_head_out"], AUTOREGRESSIVE)
    assert_close(f"{name}/latents", result.latents, t["latents"], AUTOREGRESSIVE)
    assert_close(f"{name}/sem_feats", result.features, t["sem_feats"], AUTOREGRESSIVE)
    assert_close(f"{name}/image", result.image, t["image"], AUTOREGRESSIVE)
    assert_close(f"{name}/final_last_hidden_state", result.state.last_hidden, t["final_last_hidden_state"], AUTOREGRESSIVE)
    assert_close(f"{name}/final_logits", result.state.logits, t["final_logits"], AUTOREGRESSIVE)
    for i in range(len(result.state.keys)):
        assert_close(f"{name}/final_cache_key_l{i}", result.state.keys[i], t[f"final_cache_key_l{i}"], AUTOREGRESSIVE)
        assert_close(f"{name}/final_cache_value_l{i}", result.state.values[i], t[f"final_cache_value_l{i}"], AUTOREGRESSIVE)
    # The parallel causal pass over the generated latents equals the incremental features.
    assert_close(f"{name}/parallel_semantic_decode", model.vision.decode_features(result.latents), result.features, SINGLE)


def test_tiny_preset_is_the_fixture_model():
    """The built-in tiny model has exactly the fixture models' configuration."""
    from models.config import tiny_config

    meta, _ = load_case("e2e_t2i")
    built = _build(meta, FIXTURES / "e2e_t2i").cfg
    tiny = tiny_config()
    assert built.mingtok == tiny.mingtok
    assert built.llm == tiny.llm
    assert built.flow_head == tiny.flow_head
    assert built.connector == tiny.connector
