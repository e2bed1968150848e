"""The benchmark scripts' plumbing on CPU (--cpu-smoke, tiny shapes): they run to the end, write
complete JSON, and their built-in correctness checks (moeyard against the plain-PyTorch side on the
same weights) pass. The GPU numbers themselves are never a test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_smoke(script, tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH / script), "--cpu-smoke", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def import_bench(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_bench_layers_smoke(tmp_path):
    proc = run_smoke("bench_layers.py", tmp_path)
    doc = json.loads((tmp_path / "bench_layers.json").read_text())
    assert doc["complete"]
    bench_layers = import_bench("bench_layers")
    for name in bench_layers.LAYERS:
        assert not doc["checks"][name]["warning"], doc["checks"][name]
        got = {(r["impl"], r["mode"]) for r in doc["rows"] if r["layer"] == name}
        assert got == {(i, m) for i in ("moeyard", "torch") for m in ("fwd", "fwd+bwd")}, name
    assert not (tmp_path / "bench_layers_errors.txt").exists(), proc.stdout[-2000:]


def test_bench_experts_smoke(tmp_path):
    bx = import_bench("bench_experts")
    # (a loaded CI machine may take seconds for HF eager's first step and minutes for the run:
    # time HF eager's backward and skip nothing anyway)
    proc = run_smoke("bench_experts.py", tmp_path, "--hbm-gbps", "100", "--hf-eager-max-s", "1e9",
                     "--budget-s", "1e9")
    doc = json.loads((tmp_path / "bench_experts.json").read_text())
    assert doc["complete"] and not doc["skipped"], proc.stdout[-2000:]
    assert (tmp_path / "bench_experts_errors.txt").read_text() == ""
    auto = doc["auto_backend"]
    assert auto in bx.BACKENDS and doc["hbm"] == {"gbps": 100.0, "source": "--hbm-gbps"}
    # the spot check: each backend against the stock pipeline and the fp32 loop, on each routing
    routings = ("uniform", "zipf")
    checks = {(c["backend"], c["routing"]): c for c in doc["checks"]}
    assert set(checks) == {(b, r) for b in bx.BACKENDS for r in routings}
    for c in checks.values():
        assert not c["warning"] and set(c["vs_stock"]) == set(c["vs_fp32"]) == set(bx.CHECKED), c
        assert c["same_as_auto"] or c["backend"] != auto, c  # auto computes what the table says
    rows = doc["rows"]
    have = {(r["impl"], r["mode"], r["routing"]) for r in rows}
    layers = [bx.labelled(bx.LAYER, b) for b in bx.BACKENDS]
    assert {(i, m, r) for i in layers + [bx.STOCK] for m in ("fwd", "fwd+bwd")
            for r in routings} <= have
    assert {(i, m, "hf") for i in (bx.HF_GROUPED, bx.HF_EAGER) for m in ("fwd", "fwd+bwd")} <= have
    assert {(bx.labelled(bx.GMM, b), "fwd", "balanced") for b in bx.BACKENDS} <= have
    assert {(bx.TGMM, "fwd", "balanced"), (bx.DENSE, "fwd", "-")} <= have
    for r in rows:  # moeyard's rows name their backend; auto's are marked
        if r["impl"].startswith((bx.LAYER, bx.GMM)):
            assert r["impl"] == bx.labelled(r["impl"].split(" [")[0], r["backend"]), r
            assert r["auto"] == (r["backend"] == auto), r
    # inference rows: every implementation at every token count, with the weight-read floor
    d, f, E, k, _ = bx.SMOKE_SHAPES["tiny"]
    for impl in layers + [bx.STOCK, bx.HF_GROUPED]:
        for T in (1, 8, 64):
            r = bx.find(rows, "tiny", impl, bx.infer_mode(T))
            assert r and r["tokens"] == T and r["ms"] > 0, (impl, T)
            assert k <= r["experts_read"] <= min(E, T * k), r
            assert r["bytes"] == r["experts_read"] * 3 * d * f * 2, r
            assert r["floor_ms"] == r["bytes"] / 100e9 * 1e3, r
            assert r["floor_pct"] > 0 and r["gbps"] > 0, r
    # the targets are listed, unmeasured at this shape
    assert len(doc["targets"]) == len(bx.TARGETS)
    assert all(t["met"] is None for t in doc["targets"]), doc["targets"]
    summary = subprocess.run([sys.executable, str(BENCH / "summary.py"), str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "moeyard layer [moeyard]" in summary.stdout and "infer" in summary.stdout


def test_bench_experts_budget(tmp_path):
    """Past --budget-s every row group is skipped, listed as such, and the JSON is complete."""
    run_smoke("bench_experts.py", tmp_path, "--budget-s", "0", "--skip-hf")
    doc = json.loads((tmp_path / "bench_experts.json").read_text())
    assert doc["complete"] and doc["rows"] == []
    assert doc["skipped"] == ["shape tiny uniform", "shape tiny zipf"]


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


@pytest.mark.distributed
def test_bench_ep_smoke(tmp_path):
    """2 and 4 gloo ranks at a tiny shape: every (P, mode) row, EP equal to the unsharded layer,
    and the bytes sent per rank as counted: capacity exactly 2 * E * C rows, dropless 2 * T * k rows
    on average over the ranks, plus the [E] int32 counts."""
    be = import_bench("bench_ep")
    proc = run_smoke("bench_ep.py", tmp_path, "--ranks", "2,4", "--experts", "8")
    doc = json.loads((tmp_path / "bench_ep.json").read_text())
    d, _, k, T, _, _ = be.PRESETS["cpu-smoke"]
    assert {(r["P"], r["mode"]) for r in doc["rows"]} == {(P, m) for P in (2, 4)
                                                          for m in be.MODES}, proc.stdout
    from moeyard.ops import expert_capacity
    for r in doc["rows"]:
        assert not r["warning"] and r["max_err"] <= be.TOL, r
        assert r["count_bytes"] == r["E"] * 4 and r["dense_bytes"] == 2 * T * d * r["P"] * 4, r
        if r["mode"] == "capacity":
            C = expert_capacity(T, r["E"], k, be.MODES["capacity"])
            assert r["sent_bytes_mean"] == r["sent_bytes_max"] == 2 * r["E"] * C * d * 4, r
        else:
            assert r["sent_bytes_mean"] == 2 * T * k * d * 4, r
        assert r["ep_fwd_ms"] > 0 and r["ref_fwd_bwd_ms"] > 0, r
    assert "| E | mode | P |" in proc.stdout
