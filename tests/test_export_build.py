"""python -m export.build on the tiny model: every piece x precision exports, verifies, and is re-usable."""
import json

import numpy as np
import onnx
import pytest
import torch

from export import manifest as mf
from export.build import BuildError, main, parse_args
from models.contract import PIECE_NAMES

PRECISIONS = ["fp32", "fp16", "fp8", "int8"]


@pytest.fixture(scope="module", params=PRECISIONS)
def built(request, tiny_engines):
    out = tiny_engines(request.param)
    return request.param, out, json.loads((out / "manifest.json").read_text())


def test_every_piece_verified_within_bound(built):
    precision, out, man = built
    assert man["schema_version"] == mf.SCHEMA_VERSION and man["precision"] == precision and man["passed"]
    assert set(man["pieces"]) == set(PIECE_NAMES)
    for name, entry in man["pieces"].items():
        v = entry["verification"]
        assert v["passed"] is True, name
        assert v["worst"]["rel_l2"] <= v["bound_rel_l2"], name
        assert v["worst"]["cosine"] > 0.98, name
        onnx_files = entry["targets"]["onnx"]["files"]
        assert (out / onnx_files[0]).exists()
        assert entry["targets"]["onnx"]["sha256"][onnx_files[0]] == mf.sha256_file(out / onnx_files[0])
    t2i = man["verification"]["text_to_image"]
    assert t2i["passed"] and t2i["image"]["psnr"] >= t2i["psnr_floor"]
    if precision == "fp32":
        assert t2i["image"]["psnr"] > 100 and man["pieces"]["llm_step"]["verification"]["worst"]["max_abs"] < 1e-4


def test_manifest_describes_io_and_environment(built):
    precision, out, man = built
    env = man["environment"]
    assert env["torch"] == torch.__version__ and env["onnx"] == onnx.__version__
    llm = man["pieces"]["llm_step"]
    assert [t["name"] for t in llm["io"]["inputs"][:4]] == ["inputs_embeds", "attention_mask", "position_ids", "image_mask"]
    assert llm["profiles"][0]["past_key_values.0.key"][2][2] == man["limits"]["max_sequence"] - 1
    model = onnx.load(str(out / "llm_step.onnx"))
    present = next(o for o in model.graph.output if o.name == "present.0.key")
    assert [d.dim_param or d.dim_value for d in present.type.tensor_type.shape.dim] == \
        ["batch_size", 1, "total_sequence_length", 128]
    assert man["model"]["config"]["name"] == "tiny" and len(man["model"]["weights_sha256"]) == 64


def _initializer_types(model):
    return {i.name: i.data_type for i in model.graph.initializer}


def test_qdq_nodes_follow_the_policy(built):
    precision, out, man = built
    model = onnx.load(str(out / "flow_head.onnx"))
    ops = [n.op_type for n in model.graph.node]
    if precision not in ("fp8", "int8"):
        assert "QuantizeLinear" not in ops and "quantization" not in man["pieces"]["flow_head"]
        return
    want = onnx.TensorProto.FLOAT8E4M3FN if precision == "fp8" else onnx.TensorProto.INT8
    types = _initializer_types(model)
    layers = {r["layer"]: r for r in man["pieces"]["flow_head"]["quantization"]["layers"]}
    assert layers["flow.net.res_blocks.0.mlp.w12"]["quantized"] is True
    assert layers["flow.net.res_blocks.1.adaLN_modulation.1"]["quantized"] is True
    for kept in ("flow.net.final_layer.linear", "flow.net.input_proj", "vis_head.0", "flow.net.time_embed.mlp.0"):
        assert layers[kept]["quantized"] is False and layers[kept]["reason"]
    # quantized weights are stored in the low-precision type, one scale per output channel
    q_weights = [n for n, t in types.items() if t == want and n.endswith("_q")]
    assert q_weights, "no quantized weight initializers"
    dq_axis = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_weights for a in n.attribute]
    assert dq_axis and set(dq_axis) <= {0, 1}
    # every Q feeds a DQ, and every quantized linear reads a DQ'd activation and a DQ'd weight
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul") and node.input[1] in producers and producers[node.input[1]].op_type == "DequantizeLinear":
            assert producers[node.input[0]].op_type == "DequantizeLinear"
    # the LLM keeps its routers and lm_head in high precision
    llm_layers = {r["layer"]: r for r in man["pieces"]["llm_prefill"]["quantization"]["layers"]}
    assert llm_layers["lm.lm_head"]["quantized"] is False
    assert any(r["quantized"] for k, r in llm_layers.items() if "experts" in k)
    # the routed experts (stacked, gathered by the decode step) are stored quantized too, weight-only
    step_layers = {r["layer"]: r for r in man["pieces"]["llm_step"]["quantization"]["layers"]}
    for part in ("w_gate", "w_up", "w_down"):
        r = step_layers[f"lm.model.layers.0.mlp.{part}"]
        assert r["quantized"] and r["weight_rel_error"] < (0.05 if precision == "fp8" else 0.02)
    step = onnx.load(str(out / "llm_step.onnx"))
    assert not [i.name for i in step.graph.initializer if len(i.dims) == 3 and i.data_type == onnx.TensorProto.FLOAT]


def test_rerun_skips_unchanged_and_rebuilds_changed(tmp_path, caplog):
    """Change detection, on a build of its own (the shared builds stay untouched)."""
    caplog.set_level("INFO", logger="export.build")
    args = ["--precision", "int8", "--out", str(tmp_path), "--device", "cpu", "--calib-images", "1",
            "--pieces", "pixel_decoder,flow_head"]
    assert main(args) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    caplog.clear()
    assert main(args) == 0
    assert "pixel_decoder: unchanged since the last build, skipped" in caplog.text
    assert "flow_head: unchanged since the last build, skipped" in caplog.text
    # an altered file is rebuilt, the other piece stays
    (tmp_path / "pixel_decoder.onnx").write_bytes(b"corrupted")
    caplog.clear()
    assert main(args) == 0
    assert "pixel_decoder: unchanged" not in caplog.text and "flow_head: unchanged" in caplog.text
    assert onnx.load(str(tmp_path / "pixel_decoder.onnx")).graph.node
    # other weights: rebuilt, with a new fingerprint
    caplog.clear()
    assert main(args + ["--seed", "1"]) == 0
    assert "flow_head: unchanged" not in caplog.text
    new = json.loads((tmp_path / "manifest.json").read_text())
    assert new["pieces"]["flow_head"]["fingerprint"] != man["pieces"]["flow_head"]["fingerprint"]


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp8", "--pieces", "encoder,bogus"], "unknown piece"),
    (["--precision", "fp8", "--targets", "onnx,tensorrt"], "TensorRT is not installed"),
    (["--precision", "fp8", "--targets", "coreml"], "unknown target"),
    (["--precision", "fp8", "--mingtok-checkpoint", "."], "only makes sense with --checkpoint"),
    (["--precision", "fp8", "--checkpoint", "/nonexistent"], "is not a directory"),
    (["--precision", "fp16", "--model", "full", "--device", "cpu"], "--model full"),
    (["--precision", "int8", "--targets", "aoti"], "aoti compiles the fp32, bf16 or fp8 fast path"),
    (["--precision", "fp16", "--quant-base", "bf16"], "use it with --precision fp8 or int8"),
    (["--precision", "fp8", "--keep-high-precision", "blocks.[0-"], "is not a regular expression"),
    (["--precision", "bf16", "--keep-high-precision", "blocks"], "use it with those precisions"),
    (["--precision", "fp8", "--targets", "aoti", "--device", "cpu"], "needs --device cuda and triton"),
])
def test_bad_flag_combinations(argv, message):
    with pytest.raises(BuildError, match=message):
        parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(capsys):
    assert main(["--precision", "fp16", "--device", "cuda"]) == 2
    assert "PyTorch sees no CUDA GPU" in capsys.readouterr().err


def test_fp8_refuses_old_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX A6000")
    with pytest.raises(BuildError, match=r"FP8 needs compute capability 8.9.*RTX A6000 is 8.6"):
        parse_args(["--precision", "fp8", "--device", "cuda", "--targets", "onnx"])


def test_qdq_weight_quantization_roundtrip():
    from quant.qdq import dequantize, quantize_weight

    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    w[3] *= 100  # a loud channel must not crush the others: per-channel scales
    for fmt, bound in (("int8", 0.01), ("fp8", 0.05)):
        q, scale = quantize_weight(w, 0, fmt)
        assert scale.shape == (16,)
        err = np.linalg.norm(dequantize(q, scale, 0) - w, axis=1) / np.linalg.norm(w, axis=1)
        assert err.max() < bound, (fmt, err.max())


def test_qdq_torch_quantizer_equals_numpy_arithmetic():
    """The torch quantizer (threads or GPU, for the full LLM) gives numpy/ml_dtypes' bits exactly,
    ties and saturation included; bf16 initializers are read without numpy's bf16 path."""
    import ml_dtypes
    from onnx import numpy_helper

    from quant.qdq import _quantize, initializer_tensor

    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 40, 96)).astype(np.float32) * rng.uniform(1e-3, 10, size=(3, 40, 1)).astype(np.float32)
    w[0, 1] = 0.0  # an all-zero channel: scale 1
    w[1, 2, :8] = np.array([0.5, 1.5, 2.5, -2.5, 4.5, 127.0, 3.0, 1.0]) * (127.0 / 127)  # int8 ties
    for fmt in ("int8", "fp8"):
        for axis in (0, 1):
            qmax = 127.0 if fmt == "int8" else 448.0
            amax = np.abs(w).max(axis=tuple(i for i in range(3) if i != axis)).astype(np.float32)
            scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = -1
            scaled = w / scale.reshape(shape)
            ref = (np.clip(np.rint(scaled), -127, 127).astype(np.int8) if fmt == "int8"
                   else np.clip(scaled, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn))
            deq = ref.astype(np.float32) * scale.reshape(shape)
            for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):  # GPU builds quantize on it
                q, s, err = _quantize(w, axis, fmt, device)
                assert np.array_equal(s, scale), (fmt, axis, device)
                assert np.array_equal(q.view(np.uint8), ref.view(np.uint8)), (fmt, axis, device)
                assert err == pytest.approx(np.linalg.norm(deq - w) / np.linalg.norm(w), rel=1e-4) and err > 0
    b = torch.randn(5, 7, dtype=torch.bfloat16)
    init = numpy_helper.from_array(b.float().numpy().astype(ml_dtypes.bfloat16), "w")
    assert torch.equal(initializer_tensor(init), b)


def test_graph_dtype_per_piece():
    from export.build import piece_dtype

    assert piece_dtype("fp8", "llm_step", "full") == torch.bfloat16  # 67 GB as fp32
    assert piece_dtype("int8", "llm_prefill", "full") == torch.bfloat16
    assert piece_dtype("fp8", "flow_head", "full") == torch.float32  # verifiable on the CPU provider
    assert piece_dtype("fp8", "llm_step", "tiny") == torch.float32
    assert piece_dtype("fp8", "llm_step", "full", "fp32") == torch.float32
    assert piece_dtype("int8", "encoder", "tiny", "bf16") == torch.bfloat16
    assert piece_dtype("bf16", "encoder", "tiny") == torch.bfloat16 and piece_dtype("fp16", "llm_step", "full") == torch.float16


def test_fp8_around_a_bf16_graph(tmp_path):
    """--quant-base bf16 (the full LLM's form): FP8 weights and activations dequantized to bf16."""
    from onnx import TensorProto

    assert main(["--precision", "fp8", "--quant-base", "bf16", "--pieces", "llm_step", "--out", str(tmp_path),
                 "--device", "cpu", "--calib-images", "1"]) == 0
    man = json.loads((tmp_path / "manifest.json").read_text())
    entry = man["pieces"]["llm_step"]
    assert entry["graph_dtype"] == "bfloat16" and entry["verification"]["passed"] is None  # no bf16 on the CPU provider
    assert "text_to_image" not in man["verification"]
    model = onnx.load(str(tmp_path / "llm_step.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and {inits[n.input[1]].data_type for n in dq} == {TensorProto.BFLOAT16}
    fp8 = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]
    stacked = [r for r in entry["quantization"]["layers"] if "weight-only" in r.get("activation", "")]
    assert len(fp8) >= 10 and len(stacked) == 3 * man["model"]["config"]["llm"]["num_layers"] - 3 * (
        man["model"]["config"]["llm"]["first_k_dense_replace"])
    # the exporter's renamed stacked initializers are matched back to their parameters by value (bf16 graph,
    # fp32 reference: compared in the graph's dtype)
    assert all(r["layer"].startswith("lm.model.layers.") and r["layer"].endswith(("w_gate", "w_up", "w_down"))
               for r in stacked), [r["layer"] for r in stacked]
    # what stays high precision is bf16 and what the policy keeps (routers, lm_head), nothing fp32 and 2-D
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2]


def test_keep_high_precision_extends_the_policy(tmp_path):
    """--keep-high-precision: the matching linears stay unquantized, with the reason in the report."""
    args = ["--precision", "fp8", "--pieces", "encoder", "--t2i-check", "off", "--device", "cpu", "--calib-images", "1",
            "--quantizer", "ours"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--keep-high-precision", r"blocks\.0\."]) == 0
    layers = {d: json.loads((tmp_path / d / "manifest.json").read_text())["pieces"]["encoder"]["quantization"]["layers"]
              for d in "ab"}
    kept = [r["layer"] for r in layers["b"] if r.get("reason") == "kept by --keep-high-precision"]
    assert kept and all(".blocks.0." in k for k in kept)
    assert sum(r["quantized"] for r in layers["b"]) == sum(r["quantized"] for r in layers["a"]) - len(kept)

    def fp8_weights(d):  # one E4M3 2-D initializer per quantized linear
        graph = onnx.load(str(tmp_path / d / "encoder.onnx")).graph
        return sum(i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) == 2 for i in graph.initializer)

    assert fp8_weights("b") == fp8_weights("a") - len(kept) > 0


def test_large_graphs_are_sized_without_serialising_them():
    """save_onnx picks external data from the weights' and nodes' sizes: protobuf cannot size (or write)
    one message past 2 GB, which the full LLM piece is many times over."""
    from onnx import TensorProto, helper, numpy_helper

    from export.runner import _serialized_over

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")  # 16 KB
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((32, 64), np.float32)))  # 8 KB
    g = helper.make_graph([c, helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    m = helper.make_model(g)
    assert _serialized_over(m, 20_000) and not _serialized_over(m, 30_000)  # 16 KB + 8 KB (+ a few bytes)
    assert not _serialized_over(m, 1 << 30)
