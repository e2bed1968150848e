"""The benchmark scripts' plumbing on CPU (--cpu-smoke, tiny shapes): they run to the end, write
complete JSON, and their built-in correctness checks (moeyard against the plain-PyTorch side on the
same weights) pass. The GPU numbers themselves are never a test."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(script, tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH / script), "--cpu-smoke", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_layers_smoke(tmp_path):
    proc = run_smoke("bench_layers.py", tmp_path)
    doc = json.loads((tmp_path / "bench_layers.json").read_text())
    assert doc["complete"]
    sys.path.insert(0, str(BENCH))
    try:
        import bench_layers
    finally:
        sys.path.remove(str(BENCH))
    for name in bench_layers.LAYERS:
        assert not doc["checks"][name]["warning"], doc["checks"][name]
        got = {(r["impl"], r["mode"]) for r in doc["rows"] if r["layer"] == name}
        assert got == {(i, m) for i in ("moeyard", "torch") for m in ("fwd", "fwd+bwd")}, name
    assert not (tmp_path / "bench_layers_errors.txt").exists(), proc.stdout[-2000:]


def test_bench_experts_smoke(tmp_path):
    run_smoke("bench_experts.py", tmp_path, "--skip-hf")
    doc = json.loads((tmp_path / "bench_experts.json").read_text())
    assert doc["complete"] and doc["checks"]
    assert not any(c["warning"] for c in doc["checks"]), doc["checks"]
    impls = {r["impl"] for r in doc["rows"]}
    assert {"moeyard layer", "stock pipeline", "moeyard grouped_mm"} <= impls
    assert (tmp_path / "bench_experts_errors.txt").read_text() == ""


def test_bench_hf_smoke(tmp_path):
    impls = ("eager", "grouped_mm", "moeyard", "moeyard-block")
    proc = run_smoke("bench_hf.py", tmp_path, "--impls", ",".join(impls))
    doc = json.loads((tmp_path / "bench_hf.json").read_text())
    assert doc["complete"] and doc["transformers"] and doc["device"] == "cpu"
    assert [r["impl"] for r in doc["rows"]] == list(impls), proc.stdout[-2000:]
    for r in doc["rows"]:
        # fp32: the same routing and the same math as grouped_mm, up to summation order
        assert not r["warning"] and len(r["check"]) == 5, r
        assert all(v < 1e-4 for v in r["check"].values()), r
        assert r["step_ms"] > 0 and r["fwd_ms"] > 0 and r["tokens_per_s"] > 0, r
    assert doc["rows"][1]["vs_grouped_mm"] == 1.0
    assert (tmp_path / "bench_hf_errors.txt").read_text() == ""


def test_gpu_check_cpu_smoke(tmp_path):
    """The one-call GPU check runs every stage's code path on the CPU (small shapes; the sanitizer
    needs a GPU) and reports each stage; its expert correctness check passes."""
    proc = run_smoke("gpu_check.py", tmp_path)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["stage"] for r in rows] == ["load", "check", "pytest", "sanitize", "bench"]
    assert {r["stage"]: r["status"] for r in rows} == {
        "load": "ok", "check": "ok", "pytest": "ok", "sanitize": "skipped", "bench": "ok"}, rows
    check = json.loads((tmp_path / "check_experts.json").read_text())
    assert check["failures"] == 0 and check["checks"] > check["refusals"] > 0
    assert {r["backend"] for r in check["rows"]} == {"moeyard", "grouped_mm", "auto"}
    assert "| stage | status | s | found |" in proc.stdout
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
