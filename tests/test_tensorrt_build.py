"""What of the TensorRT path runs without TensorRT; the engine test itself needs TensorRT and a GPU."""
import pytest
import torch

from export.tensorrt_build import Profile, build_engine, timing_cache_path, trt_available
from export.shapes import ShapeLimits, trt_profiles
from models import tiny_config
from models.contract import piece_specs


def test_profile_validation():
    Profile({"x": ((1, 4), (2, 4), (8, 4))}).validate()
    with pytest.raises(ValueError, match="min <= opt <= max.*x"):
        Profile({"x": ((1, 4), (9, 4), (8, 4))}).validate()
    with pytest.raises(ValueError, match="different ranks"):
        Profile({"y": ((1,), (2, 4), (8, 4))}).validate()


def test_timing_cache_is_keyed_by_version_and_sm(tmp_path):
    assert timing_cache_path(tmp_path, "10.9.0", "90").name == "timing_trt10.9.0_sm90.cache"
    assert timing_cache_path(tmp_path, "10.9.0", "90") != timing_cache_path(tmp_path, "10.9.0", "89")


def test_profiles_from_the_contract():
    cfg = tiny_config()
    specs = piece_specs(cfg)
    prof = trt_profiles(specs["llm_step"], cfg, ShapeLimits(max_prompts=4, max_sequence=512))[0]
    lo, opt, hi = prof["inputs_embeds"]
    assert lo == (1, 1, 256) and hi == (12, 1, 256)  # 4 prompts x 3 CFG rows, one token
    assert prof["past_key_values.0.key"][2] == (12, 1, 511, 128)
    Profile(prof).validate()
    fh = trt_profiles(specs["flow_head"], cfg, ShapeLimits())[0]
    assert fh["condition_hidden"][0][1] == 1 and fh["condition_hidden"][2][1] == 3


def test_trt_available_is_a_bool():
    assert trt_available() in (True, False)


@pytest.mark.skipif(trt_available(), reason="checks the message shown without TensorRT")
def test_missing_tensorrt_names_the_extra(tmp_path):
    with pytest.raises(ImportError, match=r"mingrt\[tensorrt\]"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", [])


@pytest.mark.tensorrt
@pytest.mark.skipif(not trt_available() or not torch.cuda.is_available(), reason="needs TensorRT and a CUDA GPU")
def test_one_matmul_engine(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.backends.tensorrt_engine import TensorRTEngine

    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(tmp_path / "m.onnx"))
    info = build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", [Profile({"x": ((1, 4), (2, 4), (8, 4))})],
                        timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "m.plan").exists() and info["timing_cache"] == "created"
    eng = TensorRTEngine(tmp_path / "m.plan")
    x = torch.randn(5, 4, device="cuda")
    y = eng.infer(eng.new_context(), {"x": x})["y"]
    torch.cuda.synchronize()
    assert torch.allclose(y.cpu(), x.cpu() @ torch.from_numpy(w), atol=1e-3)
