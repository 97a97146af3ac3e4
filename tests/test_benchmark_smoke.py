"""benchmarks/speed.py in its CPU smoke mode: runs end to end and writes JSON with an environment block."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--out", str(tmp_path),
                           "--only", "pieces,e2e"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "speed_smoke.json").read_text())
    assert res["env"]["torch"] and res["config"] == "tiny"
    step = res["pipelines"]["image-token step: one CUDA graph"]
    assert step["runs"] == 3 and 0 < step["median_ms"] <= step["p90_ms"]
    assert res["pieces"]["flow_head hoisted invariants"]["median_ms"] > 0
    assert res["floor"]["bytes_per_token"]["total"] > 0
    assert "| pipelines |" in (tmp_path / "speed_smoke.md").read_text()
