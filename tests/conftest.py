"""Shared test helpers: where the upstream golden fixtures live, and a record of every max abs error."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MINGRT_FIXTURES", ROOT.parent / "shared" / "fixtures" / "upstream"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the Triton kernels run in Triton's CPU interpreter (read when kernels are decorated,
# so before any test module imports them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ERRORS: dict[str, float] = {}


def fixture_dir(case: str) -> Path:
    d = FIXTURES / case
    if not d.is_dir():
        # The fixtures are part of the checkout's shared/ folder; their absence is a setup error, not a skip.
        raise FileNotFoundError(f"upstream fixture {d} not found; set MINGRT_FIXTURES to the fixtures folder")
    return d


def load_case(case: str):
    from safetensors.torch import load_file

    d = fixture_dir(case)
    return json.loads((d / "case.json").read_text()), load_file(str(d / "tensors.safetensors"))


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> float:
    """Assert max |got - ref| <= atol, and remember the error for the summary table."""
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0
    _ERRORS[name] = err
    assert err <= atol, f"{name}: max abs error {err:.3e} > {atol:.1e}"
    return err


def pytest_terminal_summary(terminalreporter):
    if _ERRORS:
        terminalreporter.write_sep("-", "max abs error against the upstream fixtures")
        for name, err in sorted(_ERRORS.items()):
            terminalreporter.write_line(f"{name:60s} {err:.3e}")
        out = os.environ.get("MINGRT_ERROR_REPORT")
        if out:
            Path(out).write_text(json.dumps(_ERRORS, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny composite model with the fixtures' weights."""
    from safetensors.torch import load_file

    from models import MingUniVision, load_parts, tiny_config

    model = MingUniVision(tiny_config()).eval()
    load_parts(model, mingtok=load_file(str(fixture_dir("mingtok") / "weights.safetensors")),
               llm=load_file(str(fixture_dir("llm") / "weights.safetensors")),
               linear_proj=load_file(str(FIXTURES / "linear_proj.safetensors")))
    return model


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory):
    """build(precision) -> artifact folder of the tiny model, built once per test session."""
    from export.build import main

    def build(precision: str) -> Path:
        if precision not in _BUILT:
            out = tmp_path_factory.mktemp(f"art-{precision}")
            # our own Q/DQ path here (tests/test_modelopt_path.py covers ModelOpt, when installed)
            assert main(["--precision", precision, "--out", str(out), "--device", "cpu", "--calib-images", "1",
                         "--quantizer", "ours"]) == 0
            _BUILT[precision] = out
        return _BUILT[precision]

    return build
