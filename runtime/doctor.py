"""python -m runtime.doctor: what this machine can run (providers, versions, GPU, precisions)."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _version(name: str):
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def report() -> dict:
    import torch

    from kernels.fp8 import FP8_MIN_CAPABILITY

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"), "tensorrt": _version("tensorrt"),
           "modelopt": _version("modelopt"), "triton": _version("triton")}
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime_providers"] = []
    gpus = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        precisions = ["fp32", "fp16"] + (["bf16"] if major >= 8 else []) + ["int8"] + (["fp8"] if (major, minor) >= FP8_MIN_CAPABILITY else [])
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "sm": f"{major}.{minor}", "precisions": precisions,
                     "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)})
    out["cuda"] = torch.version.cuda
    out["gpus"] = gpus
    cpu_ort = ["fp32", "fp16", "int8", "fp8"] if out["onnxruntime"] else []
    out["cpu_precisions_onnxruntime"] = cpu_ort
    backends = ["torch"] + (["onnxruntime"] if out["onnxruntime"] else []) + (["tensorrt"] if out["tensorrt"] and gpus else [])
    out["backends"] = backends
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser("python -m runtime.doctor", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    r = report()
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    for k, v in r.items():
        if k == "gpus":
            if not v:
                print(f"{'gpus':24s} none (CPU only)")
            for g in v:
                print(f"{'gpu ' + str(g['index']):24s} {g['name']}  SM {g['sm']}  {g['memory_gib']} GiB  runs: {', '.join(g['precisions'])}")
        else:
            print(f"{k:24s} {v if v is not None else 'not installed'}")
    if "CUDAExecutionProvider" not in r["onnxruntime_providers"] and r["gpus"]:
        print("note: this onnxruntime has no CUDA provider; pip uninstall onnxruntime && pip install 'mingrt[gpu]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
