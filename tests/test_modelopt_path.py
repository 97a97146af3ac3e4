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
    assert fh["quantization"]["method"].startswith("ours")  # its row axis must stay dynamic
    assert pd["verification"]["passed"] and pd["verification"]["worst"]["rel_l2"] < 0.1
    graph = onnx.load(str(tmp_path / "pixel_decoder.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and "DequantizeLinear" in ops
    assert sum(r["quantized"] for r in pd["quantization"]["layers"]) == pd["quantization"]["quantized_layers"] > 0


@needs_modelopt
def test_fp8_stays_on_our_qdq(tmp_path):
    assert main(["--precision", "fp8", "--quantizer", "modelopt", "--pieces", "pixel_decoder",
                 "--out", str(tmp_path), "--device", "cpu", "--calib-images", "1"]) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["pieces"]["pixel_decoder"]["quantization"]["method"].startswith("ours")
