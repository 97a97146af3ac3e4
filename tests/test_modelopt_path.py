"""The ModelOpt quantization path (runs where nvidia-modelopt is installed; CI installs only our path)."""
import json

import onnx
import pytest

from export.build import BuildError, main, parse_args
from quant.modelopt_path import modelopt_available

needs_modelopt = pytest.mark.skipif(not modelopt_available(), reason="nvidia-modelopt is not installed")


def test_modelopt_available_is_a_bool():
    assert modelopt_available() in (True, False)


@pytest.mark.skipif(modelopt_available(), reason="checks the message shown without ModelOpt")
def test_missing_modelopt_is_a_clear_error():
    with pytest.raises(BuildError, match=r"mingrt\[quant\]"):
        parse_args(["--precision", "int8", "--quantizer", "modelopt"])
    from quant.modelopt_path import quantize_module

    with pytest.raises(ImportError, match=r"mingrt\[quant\]"):
        quantize_module(None, [], "int8")


@needs_modelopt
def test_int8_pixel_decoder_through_modelopt(tmp_path):
    assert main(["--precision", "int8", "--quantizer", "modelopt", "--pieces", "pixel_decoder,flow_head",
                 "--out", str(tmp_path), "--device", "cpu", "--calib-images", "1"]) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    pd, fh = man["pieces"]["pixel_decoder"], man["pieces"]["flow_head"]
    assert pd["quantization"]["method"].startswith("nvidia-modelopt")
    # its row axis must stay dynamic: ModelOpt calibrates, our pass writes the graph
    assert fh["quantization"]["method"].startswith("nvidia-modelopt calibration")
    assert pd["verification"]["passed"] and pd["verification"]["worst"]["rel_l2"] < 0.1
    graph = onnx.load(str(tmp_path / "pixel_decoder.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and "DequantizeLinear" in ops
    assert sum(r["quantized"] for r in pd["quantization"]["layers"]) == pd["quantization"]["quantized_layers"] > 0


@needs_modelopt
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_modelopt_calibration_drives_our_qdq_for_the_other_pieces(tmp_path, precision):
    """FP8 anywhere, and the KV-cache pieces and the encoder: ModelOpt's ranges, our standard Q/DQ."""
    pieces = ["encoder", "semantic_decoder", "llm_step"]
    assert main(["--precision", precision, "--quantizer", "modelopt", "--pieces", ",".join(pieces),
                 "--out", str(tmp_path), "--device", "cpu", "--calib-images", "1"]) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    for piece in pieces:
        e = man["pieces"][piece]
        assert e["quantization"]["method"].startswith("nvidia-modelopt calibration"), piece
        assert e["quantization"]["quantized_layers"] > 0 and e["verification"]["passed"], piece
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{piece}.onnx")).graph.node]
        assert not [o for o in ops if o.startswith("TRT_")] and ops.count("QuantizeLinear") >= 2, piece


@needs_modelopt
def test_modelopt_ranges_equal_our_max_calibration():
    """Both are "max" calibration over the same tensors: the ranges must agree, layer by layer."""
    import torch

    from models import build, tiny_config
    from models.pieces import build_pieces
    from quant.calibrate import linear_input_amax
    from quant.modelopt_path import calibrated_amax
    from quant.policy import LayerPolicy

    model = build(tiny_config(), seed=0)
    piece = build_pieces(model)["flow_head"]
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(1, 2, 256, generator=g), torch.randn(1, 16, generator=g), torch.tensor([3.0]),
              torch.tensor([1.1]), torch.tensor([1.0])) for _ in range(2)]
    ours, theirs = linear_input_amax(piece, calls), calibrated_amax(piece, calls, "fp8")
    kept = {n for n in ours if LayerPolicy().reason_to_keep(n) is not None}
    assert theirs and set(theirs) == set(ours) - kept
    for name, value in theirs.items():
        assert abs(value - ours[name]) <= 1e-5 * ours[name], name
