"""Loading checkpoints by upstream key names, in every released layout, and the errors for bad ones."""
import json

import pytest
import torch

from models import CheckpointError, MingUniVision, build, load_checkpoint, tiny_config
from models.checkpoint import read_dir, save_safetensors, upstream_to_ours

UPSTREAM_BLOCK = "vision.semantic_decoder.blocks.0.1.attn.qkv.weight"


def _upstream_state(model):
    """Our state dict renamed to the released layout (MingTok blocks nested under blocks.0.)."""
    out = {}
    for k, v in model.state_dict().items():
        for part in ("low_level_encoder", "semantic_decoder", "pixel_decoder"):
            k = k.replace(f"{part}.blocks.", f"{part}.blocks.0.")
        out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def source():
    return build(tiny_config(), seed=7)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_key_mapping():
    assert upstream_to_ours(UPSTREAM_BLOCK) == "vision.semantic_decoder.blocks.1.attn.qkv.weight"
    assert upstream_to_ours("low_level_encoder.blocks.0.11.mlp.w3.bias") == "low_level_encoder.blocks.11.mlp.w3.bias"
    # the flow head's res_blocks and the LLM's layers are not MingTok chunks
    assert upstream_to_ours("model.diffloss.net.res_blocks.3.in_ln.weight") == "model.diffloss.net.res_blocks.3.in_ln.weight"


def test_single_safetensors(tmp_path, source):
    state = _upstream_state(source)
    assert UPSTREAM_BLOCK in state
    save_safetensors(state, tmp_path / "model.safetensors")
    loaded = load_checkpoint(MingUniVision(tiny_config()), tmp_path)
    assert _same(loaded, source)


def test_sharded_with_index(tmp_path, source):
    state = _upstream_state(source)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_safetensors({k: state[k] for k in keys}, tmp_path / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _same(load_checkpoint(MingUniVision(tiny_config()), tmp_path), source)


def test_bin_weights_only(tmp_path, source):
    torch.save(_upstream_state(source), tmp_path / "pytorch_model.bin")
    assert _same(load_checkpoint(MingUniVision(tiny_config()), tmp_path), source)


class Payload:
    """Any non-tensor object: unpickling it would run arbitrary code paths."""


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_dir(tmp_path)


def test_separate_mingtok_with_overlay(tmp_path, source):
    """MingTok-Vision (bare keys) first, then the composite's vision.* keys laid over it."""
    state = _upstream_state(source)
    mingtok = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}
    other = build(tiny_config(), seed=8)
    mingtok_other = {k[len("vision."):]: v for k, v in _upstream_state(other).items() if k.startswith("vision.")}
    composite = {k: v for k, v in state.items() if not k.startswith("vision.")}
    composite["vision.sem_to_pix.weight"] = state["vision.sem_to_pix.weight"]  # one overlaid key
    (tmp_path / "mt").mkdir()
    (tmp_path / "uv").mkdir()
    save_safetensors(mingtok_other, tmp_path / "mt" / "model.safetensors")
    save_safetensors(composite, tmp_path / "uv" / "model.safetensors")
    model = load_checkpoint(MingUniVision(tiny_config()), tmp_path / "uv", mingtok_checkpoint=tmp_path / "mt")
    assert torch.equal(model.vision.sem_to_pix.weight, source.vision.sem_to_pix.weight)
    assert torch.equal(model.vision.pixel_decoder.head.weight, other.vision.pixel_decoder.head.weight)
    del mingtok


def test_ignored_keys(tmp_path, source):
    state = _upstream_state(source)
    state["model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.zeros(64)
    state["vision.target_backbone.blocks.0.weight"] = torch.zeros(3)
    save_safetensors(state, tmp_path / "model.safetensors")
    assert _same(load_checkpoint(MingUniVision(tiny_config()), tmp_path), source)


def test_one_error_lists_every_bad_key(tmp_path, source):
    state = _upstream_state(source)
    del state["model.lm_head.weight"]
    del state["linear_proj.2.bias"]
    state["model.model.extra_thing.weight"] = torch.zeros(2)
    state["vision.sem_to_pix.bias"] = torch.zeros(3)
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(MingUniVision(tiny_config()), tmp_path)
    msg = str(err.value)
    assert "2 missing" in msg and "model.lm_head.weight" in msg and "linear_proj.2.bias" in msg
    assert "1 unexpected" in msg and "model.model.extra_thing.weight" in msg
    assert "1 mis-shaped" in msg and "vision.sem_to_pix.bias: checkpoint (3,) vs model (512,)" in msg


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard gone.safetensors is missing"):
        read_dir(tmp_path)
