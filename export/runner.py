"""The build itself: model -> per piece (export, quantize, build engines, verify) -> manifest -> summary."""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.config import get_config
from models.contract import piece_specs
from models.pieces import build_pieces

from . import manifest as mf
from .build import FLOAT_DTYPE, BuildConfig, BuildError, layer_policy, piece_dtype
from .shapes import ShapeLimits, trt_profiles
from .verify import IMAGE_PSNR_FLOOR, REL_L2_BOUND, metrics, within_bound, worst

logger = logging.getLogger("export.build")

VERIFY_CALLS = 3  # fresh calls per piece compared with the reference


def load_model(bc: BuildConfig):
    """The fp32 reference model on the build device, and a description for the manifest."""
    from models import build, load_checkpoint
    from models.hf_config import from_checkpoint_dir
    from models.univision import MingUniVision

    if bc.checkpoint is not None:
        cfg = from_checkpoint_dir(bc.checkpoint, bc.mingtok_checkpoint)
        model = load_checkpoint(MingUniVision(cfg), bc.checkpoint, bc.mingtok_checkpoint)
        source = {"checkpoint": str(bc.checkpoint), "mingtok_checkpoint": str(bc.mingtok_checkpoint or "")}
        model = model.to(bc.device).eval()
    else:
        cfg = get_config(bc.model)
        logger.info("building the %s model with seeded random weights (seed %d)", bc.model, bc.seed)
        # The full model is judged in bf16: 18.8 B parameters in fp32 do not fit next to the export.
        model = build(cfg, seed=bc.seed, device=bc.device, dtype=torch.bfloat16 if bc.model == "full" else torch.float32)
        source = {"builtin": bc.model, "seed": bc.seed}
    return cfg, model, source


def fingerprint(bc: BuildConfig, piece: str, model_hash: str, src_hash: str, env: dict, limits: ShapeLimits) -> str:
    return mf.sha256_json({
        "piece": piece, "precision": bc.precision, "targets": sorted(bc.targets), "opset": bc.opset,
        "weights": model_hash, "source": src_hash, "limits": vars(limits),
        "calibration": [bc.calib_images, bc.calib_seed, str(bc.calib_image_dir), bc.quantizer, bc.quant_base,
                        bc.keep_high_precision]
        if bc.precision in ("fp8", "int8") else None,
        "versions": {k: env.get(k) for k in ("torch", "onnx", "tensorrt", "modelopt", "sm")},
    })


def _user_images(bc: BuildConfig, cfg):
    if bc.calib_image_dir is None:
        return None
    from models.image_io import edit_tensor

    files = sorted(p for p in Path(bc.calib_image_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not files:
        raise BuildError(f"--calib-image-dir {bc.calib_image_dir} holds no images")
    return torch.cat([edit_tensor(f, cfg.mingtok.image_size) for f in files])


def copy_tokenizer(bc: BuildConfig, cfg, out: Path) -> None:
    """The runtime reads tokenizer.json from the artifact folder: the checkpoint's, or the tiny one."""
    import shutil

    from runtime.tokenizer import TINY_ASSET

    src = Path(bc.checkpoint) / "tokenizer.json" if bc.checkpoint else (TINY_ASSET if cfg.name == "tiny" else None)
    if src is not None and src.exists():
        shutil.copyfile(src, out / "tokenizer.json")
    else:
        logger.warning("no tokenizer.json to copy; the runtime will need tokenizer=<path>")


def _serialized_over(model, limit: int) -> bool:
    """Whether the proto is larger than `limit` bytes. Asked first of its weights and nodes one by one:
    protobuf cannot size a message past 2 GB (ByteSize() raises EncodeError), and the full LLM piece
    holds 17-34 GB."""
    parts = sum(t.ByteSize() for t in model.graph.initializer) + sum(n.ByteSize() for n in model.graph.node)
    return parts > limit or model.ByteSize() > limit


def save_onnx(model, path: Path) -> list[str]:
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if _serialized_over(model, 1 << 30):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path.name, data.name]
    onnx.save_model(model, str(path))
    return [path.name]


# ModelOpt's route goes through torch's TorchScript exporter, which bakes Python-level sizes into the
# graph: of our pieces only the pixel decoder (fixed token count, batch the one dynamic axis) survives it
# (the encoder's cls-token expand and every KV-cache piece do not).
MODELOPT_PIECES = ("pixel_decoder",)


def quantize_onnx(bc: BuildConfig, path: Path, model, judge_piece, spec, cfg, limits, calib_calls,
                  graph_dtype=torch.float32) -> tuple[list[str], list[dict], str]:
    """Q/DQ for one piece around its exported `graph_dtype` ModelProto `model`, written to `path`:
    (files, per-layer report, method)."""
    from quant.calibrate import linear_input_amax
    from quant.modelopt_path import modelopt_available
    from quant.qdq import insert_qdq, quantize_stacked_experts

    use_modelopt = bc.quantizer == "modelopt" or (bc.quantizer == "auto" and modelopt_available())
    policy = layer_policy(bc)
    # ModelOpt writes FP8 as TensorRT-only custom ops (trt::TRT_FP8QuantizeLinear), which no other runtime
    # (onnxruntime included) can run or verify: FP8 always takes our standard-ONNX Q/DQ.
    if use_modelopt and spec.name in MODELOPT_PIECES and bc.precision == "int8" and graph_dtype == torch.float32:
        from quant import modelopt_path as mo

        from .onnx_export import trace_sizes
        from .shapes import sample_inputs

        q = mo.quantize_module(judge_piece, calib_calls, bc.precision, policy)
        sample = sample_inputs(spec, cfg, torch.float32, sizes=trace_sizes(spec, cfg, limits))
        files = mo.export_onnx(q, spec, cfg, path, sample, bc.opset)
        return files, mo.layer_report(q, policy), "nvidia-modelopt: per-channel weights, per-tensor static activations (max)"
    if use_modelopt:  # ModelOpt cannot write this piece as standard ONNX: its calibration, our Q/DQ
        from quant.modelopt_path import calibrated_amax

        logger.info("%s: nvidia-modelopt calibrates, our pass writes the Q/DQ (%s)", spec.name, bc.precision)
        amax = calibrated_amax(judge_piece, calib_calls, bc.precision, policy)
        method = "nvidia-modelopt calibration (max) + our Q/DQ: per-channel weights, per-tensor static activations"
    else:
        amax = linear_input_amax(judge_piece, calib_calls)
        method = "ours: per-channel weights, per-tensor static activations (max calibration)"
    scale_dtype = _numpy_dtype(graph_dtype)  # Q/DQ scales take the graph's float type (opset 19)
    report = insert_qdq(model, amax, bc.precision, policy, scale_dtype=scale_dtype, device=bc.device)
    report += quantize_stacked_experts(model, bc.precision, scale_dtype=scale_dtype,
                                       names=_stacked_names(model, judge_piece), device=bc.device)
    return save_onnx(model, path), report, method


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


def _stacked_names(model, piece) -> dict[str, str]:
    """Initializer name -> parameter path for 3-D weights the exporter renamed (matched by value).

    Strided samples first, then the whole tensor on the parameter's device, both in the graph's dtype.
    The full LLM has 84 stacked expert tensors of 0.37 GB: converting each through numpy and comparing on
    the host took most of a 10-minute budget (session 4)."""
    from quant.qdq import initializer_tensor

    params = {n: p for n, p in piece.named_parameters() if p.dim() == 3}
    sample = (slice(None), slice(None, None, 97), slice(None, None, 89))
    out: dict[str, str] = {}
    for init in model.graph.initializer:
        if len(init.dims) != 3 or init.name in params:
            continue
        t = initializer_tensor(init)
        for n, p in params.items():
            if n in out.values() or tuple(p.shape) != tuple(t.shape):
                continue
            w = p.detach()
            if torch.equal(w[sample].to("cpu", t.dtype), t[sample]) and torch.equal(w.to(t.dtype), t.to(w.device)):
                out[init.name] = n
                break
    return out


def cast_call(call, spec, dtype) -> tuple:
    """A recorded call with its "float" inputs in `dtype` (fp32/int/bool inputs untouched)."""
    return tuple(t.to(dtype) if s.dtype == "float" else t for t, s in zip(call, spec.inputs))


def verify_piece(backend_piece, judge_piece, spec, calls, dtype) -> dict:
    per_output: dict[str, dict] = {}
    judge_dtype = next(judge_piece.parameters()).dtype
    for i, call in enumerate(calls[:VERIFY_CALLS]):
        with torch.no_grad():
            ref = judge_piece(*cast_call(call, spec, judge_dtype))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = backend_piece(*[t.to(dtype) if t.is_floating_point() and s.dtype == "float" else t
                              for t, s in zip(call, spec.inputs)])
        for out_spec, g, r in zip(spec.outputs, got, ref):
            m = metrics(g.float(), r.float(), image=out_spec.name == "image")
            key = out_spec.name
            per_output[key] = m if key not in per_output else worst({"a": per_output[key], "b": m})
    return {"outputs": per_output, "worst": worst(per_output), "calls": min(len(calls), VERIFY_CALLS)}


def run_build(bc: BuildConfig) -> dict:
    from runtime.backends.onnxruntime_backend import OrtPiece
    from runtime.engines import ort_has_cuda

    t_start = time.time()
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, judge_model, source = load_model(bc)
    dtype = FLOAT_DTYPE[bc.precision]
    judge_dtype = next(judge_model.parameters()).dtype
    if judge_dtype == dtype:
        work_model = judge_model
    elif judge_dtype == torch.float32:
        work_model = copy.deepcopy(judge_model).to(dtype)
    else:  # a bf16 judge (the full model): fp32 pieces are made one at a time, below
        work_model = None
    specs = piece_specs(cfg)
    limits = ShapeLimits(bc.max_prompts, bc.max_sequence).validate()
    env = mf.environment()
    model_hash = mf.weights_fingerprint(judge_model, source)
    src_hash = mf.source_sha256()
    old = mf.load(out)
    man = mf.new(bc.precision, {"name": cfg.name, "config": cfg.to_dict(), "weights_sha256": model_hash, **source},
                 vars(limits))
    if old and old.get("schema_version") == mf.SCHEMA_VERSION:
        man["pieces"] = dict(old.get("pieces", {}))

    # Embedding table for the runtime's host-side lookup (the LLM pieces take embeddings, not ids).
    from models.checkpoint import save_safetensors

    emb_file = "embeddings.safetensors"
    table = judge_model.llm.word_embeddings.weight.detach().to("cpu", dtype)
    save_safetensors({"word_embeddings": table}, out / emb_file)
    man["embeddings"] = {"file": emb_file, "sha256": mf.sha256_file(out / emb_file)}

    copy_tokenizer(bc, cfg, out)
    if old and old.get("schema_version") == mf.SCHEMA_VERSION and "compiled" in old:
        man["compiled"] = old["compiled"]
    piece_targets = [t for t in bc.targets if t != "aoti"]
    todo = []
    for piece in (bc.pieces if piece_targets else []):  # --targets aoti alone builds no ONNX piece
        fp = fingerprint(bc, piece, model_hash, src_hash, env, limits)
        if not bc.force and mf.up_to_date(out, old, piece, fp, piece_targets):
            logger.info("%s: unchanged since the last build, skipped", piece)
            continue
        todo.append((piece, fp))

    judge_pieces = build_pieces(judge_model)
    work_pieces = judge_pieces if work_model is judge_model else (build_pieces(work_model) if work_model else None)

    model_kind = "full" if bc.checkpoint is not None else cfg.name
    graph_dtypes = {p: piece_dtype(bc.precision, p, model_kind, bc.quant_base) for p in bc.pieces}

    def modules_for(piece, pdtype):
        """(module to export, module that judges it)."""
        if pdtype == judge_dtype:  # the reference itself: no copy (the full LLM is 33 GB)
            return judge_pieces[piece], judge_pieces[piece]
        if work_pieces is not None and pdtype == dtype:
            return work_pieces[piece], judge_pieces[piece]
        m = copy.deepcopy(judge_pieces[piece]).to(pdtype)
        return m, (judge_pieces[piece] if judge_dtype == torch.float32 else m)
    calib, fresh = {}, {}
    if todo:
        from .calibration_data import collect_piece_inputs

        t = time.time()
        if bc.precision in ("fp8", "int8"):
            calib = collect_piece_inputs(judge_model, seed=bc.calib_seed, num_images=bc.calib_images,
                                         images=_user_images(bc, cfg))
        fresh = collect_piece_inputs(judge_model, seed=bc.calib_seed + 7919, num_images=1, limit=VERIFY_CALLS)
        logger.info("ran the reference model for calibration/verification inputs (%.1fs)", time.time() - t)

    ort_device = "cuda" if bc.device == "cuda" and ort_has_cuda() else "cpu"
    for piece, fp in tqdm(todo, desc="pieces", unit="piece", disable=not todo):
        spec = specs[piece]
        t0 = time.time()
        entry = {"fingerprint": fp, "io": spec.to_dict(), "description": spec.description, "targets": {},
                 "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in trt_profiles(spec, cfg, limits)]}
        onnx_path = out / f"{piece}.onnx"
        logger.info("%s: exporting to ONNX (opset %d, %s)", piece, bc.opset, bc.precision)
        from .onnx_export import export_piece

        pdtype = graph_dtypes[piece]
        entry["graph_dtype"] = str(pdtype).removeprefix("torch.")
        work, judge = modules_for(piece, pdtype)
        quantizing = bc.precision in ("fp8", "int8")
        info = export_piece(work, spec, cfg, onnx_path, float_dtype=pdtype, limits=limits, opset=bc.opset,
                            save=not quantizing)
        files = info["files"]
        if quantizing:
            calls = [cast_call(c, spec, next(judge.parameters()).dtype) for c in calib.get(piece, [])]
            files, qreport, method = quantize_onnx(bc, onnx_path, info.pop("model"), judge, spec, cfg, limits, calls,
                                                   pdtype)
            n_q = sum(r["quantized"] for r in qreport)
            entry["quantization"] = {"format": bc.precision, "method": method, "layers": qreport, "quantized_layers": n_q}
            logger.info("%s: %d linear layer(s) quantized to %s, %d kept high precision", piece, n_q, bc.precision,
                        len(qreport) - n_q)
        entry["targets"]["onnx"] = {"files": files, "opset": bc.opset, "sha256": {f: mf.sha256_file(out / f) for f in files},
                                    "bytes": sum((out / f).stat().st_size for f in files)}
        if "torch" in bc.targets:
            entry["targets"]["torch"] = export_torch(work, spec, cfg, limits, out / f"{piece}.pt2", pdtype)
        if "tensorrt" in bc.targets:
            entry["targets"]["tensorrt"] = build_trt(bc, spec, cfg, limits, onnx_path, out / f"{piece}.plan", env)
        # verification: the exported graph in onnxruntime vs the fp32 eager reference, on fresh inputs
        ver: dict = {"backend": f"onnxruntime-{ort_device}", "judge": "eager fp32 reference"}
        if pdtype == torch.bfloat16 and ort_device == "cpu":
            ver.update(passed=None, note="onnxruntime's CPU provider has no bfloat16 kernels: not verified here")
        else:
            res = verify_piece(OrtPiece(onnx_path, ort_device, threads=bc.threads), judge, spec,
                               fresh.get(piece, []), pdtype)
            rel = res["worst"].get("rel_l2", math.inf)
            ver.update(res, bound_rel_l2=REL_L2_BOUND[bc.precision], passed=within_bound(bc.precision, rel))
        entry["verification"] = ver
        entry["seconds"] = round(time.time() - t0, 2)
        del work, judge
        man["pieces"][piece] = entry
        mf.save(out, man)  # after every piece: an interrupted build loses nothing done

    if piece_targets and _want_t2i(bc, cfg):
        bf16_graphs = any(d == torch.bfloat16 for d in graph_dtypes.values())
        man["verification"]["text_to_image"] = t2i_check(bc, cfg, judge_model, out, man, dtype, ort_device, bf16_graphs)
    work_pieces = judge_pieces = None  # let the ONNX-side copies go before the compile
    if "aoti" in bc.targets:  # last: it installs the decode kernels into the (full) model in place
        from . import compiled_steps

        fp = compiled_steps.fingerprint(bc.precision, model_hash, src_hash, next(judge_model.parameters()).device,
                                        limits.max_sequence)
        if not bc.force and compiled_steps.up_to_date(out, old, fp):
            logger.info("compiled steps: unchanged since the last build, skipped")
        else:
            man["compiled"] = compiled_steps.build_compiled_steps(judge_model, bc.precision, out, limits.max_sequence, fp)
            mf.save(out, man)
    man["seconds"] = round(time.time() - t_start, 1)
    failed = [p for p in bc.pieces if man["pieces"].get(p, {}).get("verification", {}).get("passed") is False]
    t2i = man["verification"].get("text_to_image", {})
    aoti_failed = man.get("compiled", {}).get("verification", {}).get("passed") is False
    man["passed"] = not failed and t2i.get("passed", True) is not False and not aoti_failed
    mf.save(out, man)
    print_summary(man, bc, out)
    return man


def _want_t2i(bc: BuildConfig, cfg) -> bool:
    needed = {"llm_prefill", "llm_step", "flow_head", "semantic_decoder", "pixel_decoder"}
    if bc.t2i_check == "off" or not needed <= set(bc.pieces):
        return False
    return bc.t2i_check == "on" or cfg.name == "tiny"


def t2i_check(bc, cfg, judge_model, out, man, dtype, ort_device, bf16_graphs: bool = False) -> dict:
    """A whole text-to-image through the exported pieces vs the eager reference, same prompt and noise."""
    from models.flow_head import draw_noise
    from models.prompting import cfg_masks
    from runtime import loop
    from runtime.backends.onnxruntime_backend import OrtBackend
    from runtime.backends.torch_eager import TorchBackend

    from .calibration_data import image_ids, random_prompt

    if bf16_graphs and ort_device == "cpu":
        return {"passed": None, "note": "bf16 graphs cannot run in onnxruntime on the CPU"}
    gen = torch.Generator().manual_seed(bc.calib_seed + 31337)
    ids = random_prompt(cfg, gen)
    un, tu = cfg_masks(ids, cfg.tokens.user_prefix, cfg.tokens.assistant_prefix, image_ids(cfg))
    noise = draw_noise(gen, 1, cfg.num_image_tokens, cfg.mingtok.latent_dim)
    files = {p: e["targets"]["onnx"]["files"][0] for p, e in man["pieces"].items()}
    ort_backend = OrtBackend(out, cfg, files, judge_model.llm.word_embeddings.weight.detach(), ort_device, dtype,
                             threads=bc.threads)
    results = {}
    for name, backend in (("reference", TorchBackend(judge_model)), ("exported", ort_backend)):
        dev = backend.device
        ids_t = torch.tensor([ids], device=dev)
        cache = loop.prefill(backend, cfg, backend.embed(ids_t))
        results[name] = loop.generate_image(backend, cfg, cache, uncond_mask=torch.tensor([un], device=dev),
                                            text_uncond_mask=torch.tensor([tu], device=dev), noise=noise.to(dev),
                                            text_cfg=cfg.text_cfg, image_cfg=cfg.image_cfg, temperature=1.0)
    ref, got = results["reference"], results["exported"]
    rep = {"latents": metrics(got.latents, ref.latents), "features": metrics(got.features.float(), ref.features.float()),
           "image": metrics(got.image.float(), ref.image.float(), image=True),
           "next_token_agrees": bool(int(got.cache.logits[0, -1].argmax()) == int(ref.cache.logits[0, -1].argmax()))}
    rep["psnr_floor"] = IMAGE_PSNR_FLOOR[bc.precision]
    rep["passed"] = rep["image"]["psnr"] >= rep["psnr_floor"]
    return rep


def export_torch(module, spec, cfg, limits, path: Path, dtype) -> dict:
    """torch.export program of the piece (the base of the AOTInductor fast path)."""
    from .onnx_export import trace_sizes
    from .shapes import sample_inputs, torch_dynamic_shapes

    sample = sample_inputs(spec, cfg, dtype, sizes=trace_sizes(spec, cfg, limits))
    dev = next(module.parameters()).device
    with torch.no_grad():
        ep = torch.export.export(module, tuple(t.to(dev) for t in sample),
                                 dynamic_shapes=torch_dynamic_shapes(spec, cfg, limits))
    torch.export.save(ep, str(path))
    return {"files": [path.name], "sha256": {path.name: mf.sha256_file(path)}, "format": "torch.export",
            "torch": torch.__version__}


def build_trt(bc, spec, cfg, limits, onnx_path: Path, plan_path: Path, env: dict) -> dict:
    from .tensorrt_build import Profile, build_engine, timing_cache_path

    profiles = [Profile({k: tuple(tuple(s) for s in v) for k, v in p.items()}).validate()
                for p in trt_profiles(spec, cfg, limits)]
    cache = bc.timing_cache
    if cache is not None and cache.is_dir():
        cache = timing_cache_path(cache, env.get("tensorrt") or "unknown", env.get("sm") or "unknown")
    info = build_engine(onnx_path, plan_path, profiles, timing_cache=cache, workspace_gib=bc.workspace_gib)
    info["files"] = [plan_path.name]
    info["sha256"] = {plan_path.name: mf.sha256_file(plan_path)}
    info["sm"] = env.get("sm")
    return info


def _fmt(v, spec="{:.2e}"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return spec.format(v)


def print_summary(man: dict, bc: BuildConfig, out: Path) -> None:
    rows = [("piece", "targets", "MB", "max abs", "rel L2", "cosine", "PSNR dB", "bound", "status", "s")]
    for piece in bc.pieces:
        e = man["pieces"].get(piece)
        if not e:
            continue
        v = e.get("verification", {})
        w = v.get("worst", {})
        status = {True: "ok", False: "FAIL", None: "not run"}[v.get("passed")]
        mb = sum(t.get("bytes", 0) for t in e["targets"].values()) / 1e6
        rows.append((piece, ",".join(e["targets"]), f"{mb:.1f}", _fmt(w.get("max_abs")), _fmt(w.get("rel_l2")),
                     _fmt(w.get("cosine"), "{:.6f}"), _fmt(w.get("psnr"), "{:.1f}"), _fmt(v.get("bound_rel_l2"), "{:.1e}"),
                     status, _fmt(e.get("seconds"), "{:.1f}")))
    comp = man.get("compiled")
    if comp and "aoti" in bc.targets:
        v = comp.get("verification", {})
        for name, st in comp["steps"].items():
            res = v.get("steps", {}).get(name, {})
            w = res.get("worst", {})
            # rel L2 and bound: the output nearest its allowance (the precision's bound, or twice its rounding floor)
            tight = res.get("tightest", {"rel_l2": w.get("rel_l2"), "allowed": v.get("bound_rel_l2")})
            rows.append((f"{name} (compiled)", "aoti", f"{st['bytes'] / 1e6:.1f}", _fmt(w.get("max_abs")),
                         _fmt(tight["rel_l2"]), _fmt(w.get("cosine"), "{:.6f}"), "-", _fmt(tight["allowed"], "{:.1e}"),
                         {True: "ok", False: "FAIL", None: "not run"}[res.get("passed", v.get("passed"))],
                         _fmt(st.get("seconds"), "{:.1f}")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    t2i = man["verification"].get("text_to_image")
    print(f"\nexport.build {bc.precision} -> {out}  ({man.get('seconds', 0):.0f}s)")
    print("\n".join(lines))
    if t2i:
        if t2i.get("passed") is None:
            print(f"text-to-image through the exported pieces: not run ({t2i.get('note')})")
        else:
            print(f"text-to-image through the exported pieces: image PSNR {t2i['image']['psnr']:.1f} dB "
                  f"(floor {t2i['psnr_floor']:.0f}), latents rel L2 {t2i['latents']['rel_l2']:.2e}, "
                  f"next text token {'agrees' if t2i['next_token_agrees'] else 'differs'} -> "
                  f"{'ok' if t2i['passed'] else 'FAIL'}")
    if comp and "aoti" in bc.targets and comp.get("verification", {}).get("note"):
        print(f"compiled steps: {comp['verification']['note']}")
    elif comp and "aoti" in bc.targets:
        ver = comp["verification"]
        loose = {n: round(max((a for c in r.get("calls", []) for a in c["allowed"].values()), default=0.0), 3)
                 for n, r in ver.get("steps", {}).items()}
        loose = {n: a for n, a in loose.items() if a > ver["bound_rel_l2"]}
        if loose:  # a deep random-weight step amplifies rounding (export.compiled_steps.allowed_rel_l2)
            print(f"compiled steps {sorted(loose)}: allowed up to {loose} rel L2, twice what the eager step moves "
                  "under half an ulp of input noise (above the precision's bound)")
    unverified = [p for p in bc.pieces if p in man["pieces"] and man["pieces"][p].get("verification", {}).get("passed") is None]
    if not man["passed"]:
        print("FAILED: outside the precision's bound (see manifest.json)")
    else:
        print("PASSED" + (f" ({len(unverified)} piece(s) not verified on this machine: {', '.join(unverified)})"
                          if unverified else ""))
