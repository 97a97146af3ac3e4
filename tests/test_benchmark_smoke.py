"""benchmarks/speed.py in its CPU smoke mode: runs end to end and writes JSON with an environment block."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.speed import token_bytes
from models import build, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_speed_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--out", str(tmp_path),
                           "--only", "pieces,e2e,batch"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "speed_smoke.json").read_text())
    assert res["env"]["torch"] and res["config"] == "tiny"
    step = res["pipelines"]["image-token step: one CUDA graph"]
    assert step["runs"] == 3 and 0 < step["median_ms"] <= step["p90_ms"]
    assert res["pieces"]["flow_head hoisted invariants"]["median_ms"] > 0
    size = tiny_config().mingtok.image_size  # the tokenizer's encode timed whole and to the latents alone
    assert res["pieces"][f"encoder {size}px"]["median_ms"] > 0 and res["pieces"][f"encoder to latents {size}px"]["median_ms"] > 0
    assert res["floor"]["bytes_per_token"]["total"] > 0
    assert "| pipelines |" in (tmp_path / "speed_smoke.md").read_text()
    # the batch of 2 prompts (smoke size): routed experts measured, the floor raised by exactly that
    llm = tiny_config().llm
    b = res["batch"]
    e1, e2 = b["distinct_experts_per_layer"]["1"], b["distinct_experts_per_layer"]["2"]
    assert b["prompts"] == 2 and 1 <= e1 <= min(llm.num_experts, 2 * llm.num_experts_per_tok)
    assert e1 < e2 <= min(llm.num_experts, 4 * llm.num_experts_per_tok)
    f = b["formats"]["float32"]
    model = build(tiny_config(), seed=0)  # the floors' bytes again, from the counted experts
    bytes_at = {n: token_bytes(model, 2 * n, experts=ex)["total"] for n, ex in ((1, e1), (2, e2))}
    assert f["floor_ratio"] == pytest.approx(bytes_at[2] / bytes_at[1]) and f["floor_ratio"] > 1
    assert f["floor_ms"]["2"] / f["floor_ms"]["1"] == pytest.approx(f["floor_ratio"])
    assert f["step_ratio"] == pytest.approx(res["pipelines"]["image-token step: one CUDA graph, batch 2"]["median_ms"] / step["median_ms"])
    assert "Batch of 2 prompts" in (tmp_path / "speed_smoke.md").read_text()


def test_speed_times_the_exported_engines(tmp_path, tiny_engines):
    """--engines: onnxruntime per piece and end to end; TensorRT listed with the reason it cannot run."""
    folder = tiny_engines("fp32")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--out", str(tmp_path),
                           "--only", "engines", "--engines", str(folder)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "speed_smoke.json").read_text())
    eng = res["engines"]
    for piece in ("llm_prefill", "llm_step", "flow_head", "semantic_decoder", "pixel_decoder"):
        assert eng[f"{piece} (onnxruntime-cpu fp32)"]["median_ms"] > 0, piece
    e2e = eng["text-to-image (onnxruntime-cpu fp32)"]
    assert e2e["runs"] == 1 and e2e["median_ms"] > eng["llm_step (onnxruntime-cpu fp32)"]["median_ms"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "TensorRT is not installed" in res["engines_skipped"]["tensorrt"]
        assert "tensorrt: not run here" in (tmp_path / "speed_smoke.md").read_text()


@torch.no_grad()
def test_sdvae_latent_pipeline_on_tiny():
    """The SD-VAE comparison pipeline: 1 latent token per 2x2x4 SD-VAE patch, decoded by AutoencoderKL."""
    pytest.importorskip("diffusers", reason="the SD-VAE comparison needs diffusers")
    from benchmarks.sdvae_ar import SDVAELatentGenerator, sd_vae
    from models import build, tiny_config
    from models.flow_head import draw_noise
    from models.prompting import cfg_masks
    from runtime import loop
    from runtime.backends.torch_eager import TorchBackend

    model = build(tiny_config(), seed=0)
    backend, cfg = TorchBackend(model), model.cfg
    ids = [490, 5, 6, 7, 492]
    un, tu = cfg_masks(ids, (490,), (492,), [500, 501, 502])
    cache = loop.prefill(backend, cfg, backend.embed(torch.tensor([ids])))
    gen = SDVAELatentGenerator(model, sd_vae("cpu", torch.float32), image_size=128, use_graph=False)
    n = gen.cfg.num_image_tokens
    assert n == (128 // 8 // 2) ** 2
    out = gen.generate(cache, uncond_mask=torch.tensor([un]), text_uncond_mask=torch.tensor([tu]),
                       noise=draw_noise(torch.Generator().manual_seed(0), 1, n, 16), text_cfg=2.0, image_cfg=1.0,
                       temperature=1.0)
    assert out.image.shape == (1, 3, 128, 128) and out.latents.shape == (1, n, 16)
    assert torch.isfinite(out.image).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("script", ["pdl_check.py", "determinism_check.py", "attention_check.py", "fp8_gemv_variants.py",
                                    "fp8_widen.py", "step_batches.py", "table_ab.py --old kernels/configs/NVIDIA_H200.json",
                                    "router_ab.py", "tokenizer_layers.py", "moe_tiles_ab.py", "moe_down_groups.py",
                                    "flow_mods_ab.py"])
def test_gpu_only_benchmarks_refuse_a_cpu_machine(tmp_path, script):
    name, *args = script.split()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]


def _ir_check(expr: str):
    """json of `expr`, evaluated in a fresh process (real compiles, not Triton's interpreter) with
    benchmarks/kernel_ir_check.py imported as c and t = the sm_90 target."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'benchmarks'); sys.path.insert(0, '.');"
            "import json, kernel_ir_check as c; from triton.backends.compiler import GPUTarget;"
            f"t = GPUTarget('cuda', 90, 32); print(json.dumps({expr}, default=str))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernel_ir_check_compiles_the_decode_kernels():
    """kernel_ir_check passes every constexpr a kernel declares (a compile from source takes no defaults):
    an FP8 skinny GEMM (32-row tiles: mma.sync) and a grouped MoE kernel (64-row tiles: wgmma) compile for Hopper,
    pipelined, with the FP8 converts in the code."""
    want = ("skinny fp8 epilogue 1 split 1", "moe grouped gate_up fp8 2 rows")
    got = _ir_check(f"{{n: c.inspect(fn, sig, k, o, t) for n, fn, sig, k, o in c.cases() if n in {want!r}}}")
    assert set(got) == {"skinny fp8 epilogue 1 split 1", "moe grouped gate_up fp8 2 rows"}
    skinny = got["skinny fp8 epilogue 1 split 1"]
    assert skinny["pipelined"] and skinny["mma_sync"] > 0 and skinny["fp8_cvt"] > 0
    grouped = got["moe grouped gate_up fp8 2 rows"]
    assert grouped["pipelined"] and grouped["wgmma"] > 0 and grouped["fp8_cvt"] > 0


def test_kernel_ir_check_compiles_with_the_jit_alignment_facts():
    """Compiled for Hopper without a GPU, the control matmul's K loop is software-pipelined (cp.async into
    several shared buffers) only when the compile gets the 16-byte alignment facts the JIT specializes on:
    a bare compile reports nothing pipelined, which is what misled the first version of the check."""
    m = "c.textbook_matmul()"
    aligned, bare = _ir_check(f"[c.inspect(*{m}[1:], t), c.inspect(*{m}[1:], t, odd=tuple({m}[2]))]")
    assert aligned["pipelined"] and aligned["cp_async"] > 0 and aligned["shared_bytes"] > bare["shared_bytes"]
    assert not bare["pipelined"] and bare["cp_async"] == 0


def test_profile_step_smoke(tmp_path):
    """profile_step.py on the tiny model (CPU ops): each part of the token step with its ops, counted per
    step, busy time within the part's span."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--smoke", "--out", str(tmp_path),
                           "--replays", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "profile_step.json").read_text())
    assert set(res["parts"]) == {"LLM step", "flow head", "semantic decoder step + connector"}
    for part in res["parts"].values():
        assert part["kernels_per_replay"] > 10 and 0 < part["busy_us"] <= part["span_us"]
        assert abs(sum(r["count"] for r in part["rows"]) - part["kernels_per_replay"]) < 1e-6
    from models import tiny_config

    llm = {r["kernel"]: r["count"] for r in res["parts"]["LLM step"]["rows"]}
    assert llm["aten::scaled_dot_product_attention"] == tiny_config().llm.num_layers  # one attention per layer
    # a batch of prompts: the same parts on a bucket of that batch
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--smoke", "--out",
                           str(tmp_path / "b2"), "--replays", "1", "--prompts", "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res2 = json.loads((tmp_path / "b2" / "profile_step.json").read_text())
    assert res2["prompts"] == 2 and "2 prompts" in (tmp_path / "b2" / "profile_step.md").read_text()
    assert res2["parts"]["flow head"]["kernels_per_replay"] > 10


def test_kernels_benchmark_rejects_a_batch_it_cannot_time():
    """benchmarks/kernels.py --prompts: more prompts than the skinny kernel's rows, or with the MoE-only
    mode (whose table has no row key), is an argument error before anything is built."""
    for args, message in ((["--prompts", "33"], "--prompts must be 1 to 32"),
                          (["--prompts", "0"], "--prompts must be 1 to 32"),
                          (["--prompts", "8", "--only-moe"], "the fused-MoE rows are batch 1's")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-500:])


def test_sdvae_table_is_rendered_from_the_results(tmp_path):
    """speed.py --render rewrites a saved JSON's markdown; the SD-VAE/MingTok table reads its cells by label."""
    t = lambda ms: {"median_ms": ms, "p90_ms": ms, "runs": 20}
    sd = {"SD-VAE encode 512px fp16 eager": t(11.0), "SD-VAE encode 512px fp16 torch.compile": t(4.0),
          "SD-VAE decode 512px fp16 eager": t(22.0), "SD-VAE decode 1024px fp16 eager": t(86.0),
          "MingTok pixel decoder 512px bf16 CUDA graph": t(2.5), "MingTok pixel decoder 512px bf16 eager": t(9.5),
          "MingTok encode to latents 1024px bf16 CUDA graph": t(1.25), "compile_seconds": {"encode 512px": 20.0}}
    pipe = {"text-to-image, CUDA graph + kernels fp8 (batch 1)": t(2090.0),
            "text-to-image via SD-VAE latents (1024 tokens) + SD-VAE decode, CUDA graph + kernels fp8": t(7960.0),
            "text-to-image, eager pieces (baseline)": t(28215.0), "text-to-image, CUDA graph + kernels fp8 (batch 8)": t(2800.0),
            "image-token step: static caches, eager": t(88.0), "image-token step: CUDA graph + kernels (fp8)": t(8.0),
            "image-token step: CUDA graph + kernels (fp8), batch 8": t(11.0),
            "image-token step: CUDA graph + kernels (fp8), without PDL": t(8.8)}
    res = {"env": {"torch": "x", "device": "cuda", "gpu": "G"}, "config": "full", "dtype": "torch.bfloat16",
           "pipelines": pipe, "sdvae": sd}
    path = tmp_path / "speed.json"

    def render(res: dict) -> str:
        path.write_text(json.dumps(res))
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--render", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return (tmp_path / "speed.md").read_text()

    md = render(res)
    assert "| | 512 px | 1024 px |" in md
    assert "| SD-VAE encode, fp16 eager / torch.compile | 11.00 / 4.00 | - / - |" in md
    assert "| SD-VAE decode, fp16 eager / torch.compile | 22.00 / - | 86.00 / - |" in md
    assert "| MingTok pixel decoder, bf16 CUDA graph (eager) | 2.50 (9.50) | - (-) |" in md
    assert "| MingTok encoder to latents, bf16 CUDA graph (eager) | - (-) | 1.25 (-) |" in md
    assert "| text-to-image fp8 (s): MingTok 256 tokens / SD-VAE latents 1024 tokens + SD-VAE decode | 2.09 / 7.96 | |" in md
    assert "text-to-image bf16" not in md  # no bf16 pipeline timed: no row
    # every batch-1 step and text-to-image against the eager reference of the same run; batches are not
    ratios = md.split("Against the eager reference")[1].split("\n\n")[0]
    assert "- image-token step: CUDA graph + kernels (fp8): 11.0x" in ratios
    assert "- text-to-image, CUDA graph + kernels fp8 (batch 1): 13.5x" in ratios
    # not the SD-VAE-latent pipeline (another token count), a batch, an A/B variant or the baseline itself
    assert "via SD-VAE" not in ratios and "batch 8" not in ratios and "without PDL" not in ratios
    assert "eager pieces (baseline):" not in ratios and ratios.count("\n- ") == 2
    # without the kernels (--no-kernels) the SD-VAE-latent pipeline runs on the cuBLAS graph: so does MingTok's row
    res["pipelines"] = {"text-to-image, CUDA graph per token (batch 1)": t(6700.0),
                        "text-to-image via SD-VAE latents (1024 tokens) + SD-VAE decode, CUDA graph": t(20000.0)}
    del res["env"], res["config"]  # an older or hand-made JSON still renders
    md = render(res)
    assert "| text-to-image CUDA graph (s): MingTok 256 tokens / SD-VAE latents 1024 tokens + SD-VAE decode | 6.70 / 20.00 | |" in md


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="the SIGSEGV handler is built with a C compiler")
def test_segv_backtrace_names_the_frames(tmp_path):
    """benchmarks/aoti_crash_trace.py --self-test: the handler it installs before a crashing call prints the native
    stack of a deliberate segfault (the handler itself, then libc's strlen under ctypes.string_at) and the process
    still dies of the signal."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aoti_crash_trace.py"), str(tmp_path), "--self-test"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "aoti_crash_trace.log").read_text()
    assert "self-test rc=-11" in log
    frames = [line for line in log.splitlines() if line.startswith("#")]
    assert frames[0].startswith("#0 ") and "segv_backtrace.so" in frames[0] and "on_segv" in frames[0]
    assert any("libc.so" in f for f in frames[1:4]) and any("_ctypes" in f for f in frames)
    assert "faulthandler after ours: True" in log  # the replaced handler (Python's) still ran
