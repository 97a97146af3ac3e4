"""Configs validate, round-trip, and the full preset has the released key names and shapes."""
import json

import pytest

from conftest import FIXTURES
from models import build_meta, full_config, get_config, tiny_config
from models.checkpoint import upstream_to_ours
from models.config import ModelConfig
from models.univision import PREFIXES


def test_full_config_key_names_and_shapes_match_upstream():
    """Every key and shape of the released models, on the meta device (no memory)."""
    shapes = json.loads((FIXTURES / "full_state_dict_shapes.json").read_text())
    expected = {}
    for component, prefix in (("mingtok", PREFIXES["vision"]), ("llm", PREFIXES["llm"]), ("linear_proj", PREFIXES["linear_proj"])):
        for key, shape in shapes["components"][component]["state_dict"].items():
            expected[upstream_to_ours(prefix + key)] = tuple(shape)
    model = build_meta(full_config())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    for component, prefix in (("mingtok", "vision."), ("llm", "model."), ("linear_proj", "linear_proj.")):
        n = sum(v.numel() for k, v in model.state_dict().items() if k.startswith(prefix))
        assert n == shapes["components"][component]["num_params"], component


def test_presets_and_round_trip():
    for name in ("full", "tiny"):
        cfg = get_config(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert tiny_config().num_image_tokens == 16 and full_config().num_image_tokens == 256
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_config("huge")


@pytest.mark.parametrize("field,value,message", [
    ("mingtok.encoder_dim", 100, "multiple of head_dim"),
    ("llm.num_kv_heads", 3, "multiple of num_kv_heads"),
    ("llm.num_experts_per_tok", 99, "num_experts_per_tok"),
    ("flow_head.num_steps", 0, "num_steps"),
    ("flow_head.latent_dim", 8, "flow_head.latent_dim must equal"),
    ("tokens.image_start", 10**9, "outside the vocabulary"),
])
def test_validate_names_the_field(field, value, message):
    cfg = tiny_config()
    part, name = field.split(".")
    setattr(getattr(cfg, part), name, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
