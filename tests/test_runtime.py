"""The engine-backed runtime on the tiny model: equals the eager reference, and fails clearly."""
import io
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
from conftest import assert_close
from models import ReferencePipeline, build, tiny_config
from models.prompting import cfg_masks
from runtime.tokenizer import TINY_ASSET, ChatTokenizer


@pytest.fixture(scope="module")
def fp32_dir(tiny_engines):
    return tiny_engines("fp32")


@pytest.fixture(scope="module")
def rt(fp32_dir):
    return runtime.load(fp32_dir, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def reference():
    return ReferencePipeline(build(tiny_config(), seed=0))


def _reference_t2i(reference, rt, prompt, noise, **kw):
    tok = rt.tokenizer
    ids = tok.turn(prompt)
    un, tu = cfg_masks(ids, tok.user_prefix, tok.assistant_prefix, tok.image_ids())
    embeds, _ = reference.prompt_embeds(torch.tensor([ids]))
    state = reference.prefill(embeds)
    return reference.generate_image(state, uncond_mask=torch.tensor([un]), text_uncond_mask=torch.tensor([tu]),
                                    noise=noise, **kw)


def test_t2i_equals_eager_reference(rt, reference):
    noise = rt._noise(1, 5, None)
    out = rt.generate_image("a red bicycle", noise=noise, cfg_text=2.5)
    ref = _reference_t2i(reference, rt, "a red bicycle", noise, text_cfg=2.5)
    assert_close("runtime/ort_fp32/latents", out.latents, ref.latents, 1e-4)
    assert_close("runtime/ort_fp32/features", out.features, ref.features, 1e-4)
    assert_close("runtime/ort_fp32/image", out.pixels, ref.image, 1e-4)
    assert out.image.size == (128, 128) and out.image.mode == "RGB"


def test_seed_is_reproducible_and_cfg_is_honoured(rt):
    a = rt.generate_image("a red bicycle", seed=11)
    b = rt.generate_image("a red bicycle", seed=11)
    c = rt.generate_image("a red bicycle", seed=11, cfg_text=1.5)
    assert torch.equal(a.pixels, b.pixels)
    assert (a.latents - c.latents).abs().max() > 1e-3  # upstream would ignore cfg_text; we must not


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_engines_within_build_error(tiny_engines, reference, precision):
    folder = tiny_engines(precision)
    man = json.loads((folder / "manifest.json").read_text())
    q = runtime.load(folder, backend="onnxruntime", device="cpu")
    noise = q._noise(1, 3, None)
    out = q.generate_image("a red bicycle", noise=noise)
    ref = _reference_t2i(reference, q, "a red bicycle", noise)
    from export.verify import psnr

    floor = man["verification"]["text_to_image"]["psnr_floor"]
    assert psnr(out.pixels, ref.image) >= floor


def test_iterator_and_progress(rt):
    items = list(rt.iter_generate_image("a cat", seed=1))
    progress = [i for i in items if isinstance(i, runtime.Progress)]
    assert [p.done for p in progress] == list(range(1, 17)) and progress[-1].total == 16
    assert isinstance(items[-1], runtime.ImageOutput)
    calls = []
    rt.generate_image("a cat", seed=1, on_token=lambda d, t: calls.append((d, t)))
    assert calls[0] == (1, 16) and calls[-1] == (16, 16)


def test_batch_equals_single(rt):
    both = rt.generate_image(["a red bicycle", "two cats on a long sofa"], seed=[4, 9])
    one = rt.generate_image("a red bicycle", seed=4)
    two = rt.generate_image("two cats on a long sofa", seed=9)
    assert_close("runtime/batch0", both.pixels[0], one.pixels[0], 1e-4)
    assert_close("runtime/batch1", both.pixels[1], two.pixels[0], 1e-4)
    assert len(both.images) == 2


def test_describe_equals_eager(rt, reference):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    answer_rt = rt.describe(img, "what is this?", max_new_tokens=6, stop_ids=())
    from models.image_io import understanding_tensor

    ids = rt.tokenizer.turn("what is this?", image_tokens=(256 // 32) ** 2)
    tokens = reference.describe(torch.tensor([ids]), understanding_tensor(img, 256), max_new_tokens=6, stop_ids=())
    assert answer_rt == rt.tokenizer.decode(tokens)
    assert len(tokens) == 6


def test_two_round_session_equals_eager(rt, reference):
    """generate, then edit: the edit sees the first image through the cache (no pixel round trip)."""
    s = rt.session()
    first = s.generate_image("a cat", seed=1, reply_tokens=0)
    second = s.edit("make it black", seed=2, reply_tokens=0)
    assert s.length == 2 * (16 + 1) + len(rt.tokenizer.turn("a cat")) + len(rt.tokenizer.turn("make it black"))
    # eager: same two rounds by hand with upstream's DROP masks
    tok = rt.tokenizer
    ids1, ids2 = tok.turn("a cat"), tok.turn("make it black")
    u1, t1 = cfg_masks(ids1, tok.user_prefix, tok.assistant_prefix, tok.image_ids())
    u2, t2 = cfg_masks(ids2, tok.user_prefix, tok.assistant_prefix, tok.image_ids())
    st = reference.prefill(reference.prompt_embeds(torch.tensor([ids1]))[0])
    r1 = reference.generate_image(st, uncond_mask=torch.tensor([u1]), text_uncond_mask=torch.tensor([t1]),
                                  noise=rt._noise(1, 1, None))
    gen = 17
    past_u = [1] * len(ids1) + [0] * gen
    past_t = [1] * len(ids1) + [1] * gen
    st2 = reference.prefill(reference.prompt_embeds(torch.tensor([ids2]))[0], state=r1.state)
    r2 = reference.generate_image(st2, uncond_mask=torch.tensor([past_u + u2]), text_uncond_mask=torch.tensor([past_t + t2]),
                                  noise=rt._noise(1, 2, None))
    assert r2.row_masks.shape[1] == 3  # the past makes text-uncond differ from uncond: 3 rows
    assert_close("runtime/session_round1", first.pixels, r1.image, 1e-4)
    assert_close("runtime/session_round2", second.pixels, r2.image, 1e-4)


def test_threads_equal_serial(rt):
    prompts = [f"prompt number {i}" for i in range(8)]
    serial = [rt.generate_image(p, seed=i).pixels for i, p in enumerate(prompts)]
    results = [None] * 8
    errors = []

    def work(i):
        try:
            results[i] = rt.generate_image(prompts[i], seed=i).pixels
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        assert torch.equal(results[i], serial[i]), i


def test_cancel_leaves_runtime_and_session_usable(rt):
    token = runtime.CancelToken()

    def stop_after(done, total):
        if done == 5:
            token.cancel()

    with pytest.raises(runtime.Cancelled, match="after 5 of 16"):
        rt.generate_image("a cat", seed=1, cancel=token, on_token=stop_after)
    s = rt.session()
    s.generate_image("a cat", seed=1, reply_tokens=0)
    before = s.length
    with pytest.raises(runtime.Cancelled):
        tok2 = runtime.CancelToken()
        tok2.cancel()
        s.edit("make it black", cancel=tok2)
    assert s.length == before and len(s.images) == 1
    assert rt.generate_image("a cat", seed=1).image.size == (128, 128)


@pytest.mark.parametrize("prompt,match", [("", "empty"), ("   ", "empty"), ("x" * 5000, "at most")])
def test_bad_prompts(rt, prompt, match):
    with pytest.raises(runtime.PromptError, match=match):
        rt.generate_image(prompt)


def test_bad_images(rt):
    with pytest.raises(runtime.ImageInputError, match="cannot read image"):
        rt.describe(io.BytesIO(b"garbage"), "what?")
    with pytest.raises(runtime.ImageInputError, match=r"\(1, 3, 256, 256\)"):
        rt.describe(torch.zeros(1, 3, 100, 100), "what?")
    with pytest.raises(runtime.PromptError):
        rt.describe(Image.new("RGB", (64, 64)), "")
    gray = Image.new("L", (90, 40), 128)  # any mode and size is converted as upstream does
    assert isinstance(rt.describe(gray, "what?", max_new_tokens=2), str)


def test_session_memory_bound(rt):
    s = rt.session(max_tokens=40)
    s.generate_image("a cat", seed=1, reply_tokens=0)
    with pytest.raises(runtime.SessionFullError, match="Start a new session"):
        s.edit("make it black")
    with pytest.raises(runtime.PromptError, match="nothing to edit"):
        rt.session().edit("make it black")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_engine_folder_errors(fp32_dir, tmp_path):
    with pytest.raises(runtime.EngineError, match="does not exist"):
        runtime.load(tmp_path / "nope")
    with pytest.raises(runtime.EngineError, match="no manifest.json"):
        runtime.load(tmp_path)
    d = _copy(fp32_dir, tmp_path / "a")
    (d / "flow_head.onnx").unlink()
    with pytest.raises(runtime.EngineError, match="flow_head.onnx is missing.*python -m export.build"):
        runtime.load(d, backend="onnxruntime", device="cpu")
    d = _copy(fp32_dir, tmp_path / "b")
    with open(d / "llm_step.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(runtime.EngineError, match="altered or truncated"):
        runtime.load(d, backend="onnxruntime", device="cpu")
    with pytest.raises(runtime.EngineError, match="does not match its manifest hash"):
        runtime.load(d, backend="onnxruntime", device="cpu", verify_hashes=True) if False else \
            runtime.engines.check_files(json.loads((d / "manifest.json").read_text()), d, "onnx", ["llm_step"], True)
    d = _copy(fp32_dir, tmp_path / "c")
    man = json.loads((d / "manifest.json").read_text())
    man["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(runtime.EngineError, match="schema version 99"):
        runtime.load(d)
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(runtime.EngineError, match="corrupted"):
        runtime.load(d)
    d = _copy(fp32_dir, tmp_path / "e")
    man = json.loads((d / "manifest.json").read_text())
    man["pieces"]["llm_step"]["io"]["inputs"][0]["name"] = "input_ids"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(runtime.EngineError, match="another piece contract"):
        runtime.load(d, backend="onnxruntime", device="cpu")


def test_precision_the_device_lacks(fp32_dir, monkeypatch):
    from runtime.engines import check_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(runtime.PrecisionUnsupportedError, match="FP8.*A100-SXM4-80GB is 8.0"):
        check_device({"precision": "fp8"}, torch.device("cuda"), "onnxruntime")
    with pytest.raises(runtime.PrecisionUnsupportedError, match="no bf16 kernels"):
        check_device({"precision": "bf16"}, torch.device("cpu"), "onnxruntime")
    check_device({"precision": "fp8"}, torch.device("cpu"), "onnxruntime")  # FP8 Q/DQ runs on the CPU


def test_torch_backend_equals_onnxruntime(fp32_dir, rt):
    t = runtime.load(fp32_dir, backend="torch", device="cpu")
    a, b = rt.generate_image("a cat", seed=3), t.generate_image("a cat", seed=3)
    assert_close("runtime/torch_vs_ort", b.pixels, a.pixels, 1e-4)


def test_tiny_tokenizer_asset_is_reproducible():
    from runtime.tokenizer import make_tiny_tokenizer

    assert json.loads(make_tiny_tokenizer().to_str()) == json.loads(TINY_ASSET.read_text())
    tok = ChatTokenizer.from_file(TINY_ASSET, tiny_config())
    assert tok.turn("hi") == [490, 71, 72, 492]  # byte-level ids (sorted alphabet) between the role tokens
    assert tok.decode(tok.encode("a red bicycle")) == "a red bicycle"


def test_cli_generate_and_doctor(fp32_dir, tmp_path, capsys):
    from runtime import doctor, generate

    png = tmp_path / "out.png"
    assert generate.main(["--engines", str(fp32_dir), "--prompt", "a red bicycle", "--out", str(png), "--device", "cpu"]) == 0
    assert Image.open(png).size == (128, 128)
    assert generate.main(["--engines", str(tmp_path / "none"), "--prompt", "x", "--out", str(png)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert doctor.main(["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["torch"] == torch.__version__ and "onnxruntime" in rep["backends"]


def test_fp8_decode_weights_need_the_gpu_torch_path(fp32_dir):
    with pytest.raises(ValueError, match="decode_weights must be one of"):
        runtime.load(fp32_dir, "onnxruntime", "cpu", decode_weights="int4")
    with pytest.raises(ValueError, match="needs the torch backend on a CUDA GPU"):
        runtime.load(fp32_dir, "onnxruntime", "cpu", decode_weights="fp8")
    with pytest.raises(ValueError, match="needs the torch backend on a CUDA GPU"):
        runtime.load(fp32_dir, "torch", "cpu", decode_weights="fp8")


def test_auto_backend_choice(monkeypatch):
    """auto: the torch fast path on a GPU that onnxruntime cannot use, or where compiled steps suit."""
    from runtime import engines

    man = {"pieces": {"llm_step": {"targets": {"onnx": {}}}}, "model": {"builtin": "tiny", "seed": 0}}
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(engines, "ort_has_cuda", lambda: False)
    assert engines.choose_backend("auto", cuda, man) == "torch"
    assert engines.choose_backend("auto", cpu, man) == "onnxruntime"
    assert engines.choose_backend("onnxruntime", cuda, man) == "onnxruntime"
    gone = {**man, "model": {"checkpoint": "/nonexistent/Ming-UniVision"}}
    assert engines.choose_backend("auto", cuda, gone) == "onnxruntime"  # no weights for the torch path
    monkeypatch.setattr(engines, "ort_has_cuda", lambda: True)
    assert engines.choose_backend("auto", cuda, man) == "onnxruntime"
    compiled = {**man, "compiled": {"device": "cpu", "torch": torch.__version__}}
    assert engines.choose_backend("auto", cpu, compiled) == "torch"
    assert engines.choose_backend("auto", cpu, {**compiled, "compiled": {"device": "cpu", "torch": "0.1"}}) == "onnxruntime"
