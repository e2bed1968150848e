"""The one-call GPU check: what the rare, short GPU time verifies, in one command that ends within
its budget (default 470 s, under the device tool's 8-minute plan) and prints a short table last.

    python3 benchmarks/gpu_check.py [--budget-s 470] [--stages load,check,pytest,sanitize,bench]
    python3 benchmarks/gpu_check.py --cpu-smoke    # the same stages on the CPU, small (CI)
    python3 benchmarks/gpu_check.py --stages load,layers,hf,routing --budget-s 560   # a second call

Stages, in order of value, each in its own process under its own time limit (a hang costs that
stage, not the run), logs appended to $OUT/gpu_check.log (OUT default "out"):
  load      moeyard loads with CUDA kernels for this GPU and runs one op; `python -m moeyard info`.
            The library is built on a GPU-less machine (g++ 12, TORCH_CUDA_ARCH_LIST=9.0a) and
            carried in; if it does not load here, it is built here (pip install
            --no-build-isolation --no-index -e ., all cores) and loaded again.
  check     benchmarks/check_experts.py: both backends against float64 references, poisoned
            outputs, NaN, refusals ($OUT/check_experts.json)
  pytest    pytest -m gpu: tests/test_experts.py first, then the layers, Hugging Face and the rest
  sanitize  compute-sanitizer memcheck and racecheck on tests/sanitizer_suite.py's expert part
  bench     benchmarks/bench_experts.py within the time left ($OUT/bench_experts.json)
  table     one line per stage (status, seconds, what it found), then benchmarks/summary.py
Not in the default run (a second call, when the first left time): layers, hf, routing, ep run
benchmarks/bench_layers.py, bench_hf.py, bench_routing.py and bench_ep.py (expert parallelism: two
gloo ranks sharing the GPU) within the time left. The EP tests (two gloo ranks on the GPU, the
capacity mode under torch.cuda.set_sync_debug_mode("error")) are in the pytest stage.
With the device tool (a GPU machine without network, torch 2.11.0+cu130, Python 3.12): build here
(g++ 12) with `TORCH_CUDA_ARCH_LIST=9.0a MOEYARD_BUILD_DIR=build/cuda python setup.py build_ext
--inplace`, carry the library (`python/moeyard/_C*.so`: it has no Python ABI dependency, so a
3.11 build loads under 3.12) and run `python3 benchmarks/gpu_check.py` (it writes to $OUT) with a
timeout_s of about 520; logs and JSON come back from $OUT (six files).
--cpu-smoke runs every stage's code path on the CPU with small shapes (pytest -m gpu then skips
every test; the sanitizer is not run: it needs a GPU); timings mean nothing there.
Exit status 0 only if every stage that ran passed.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "out"))
STAGES = ("load", "check", "pytest", "sanitize", "bench")
MORE_STAGES = ("layers", "hf", "routing", "ep")
# Arguments of a MORE_STAGES benchmark on the GPU (bench_ep: two gloo ranks sharing the one GPU,
# since NCCL refuses two ranks on one GPU).
GPU_ARGS = {"ep": ["--device", "cuda", "--ranks", "2"]}
# Seconds each stage may take at most (bench: whatever is left, at least BENCH_MIN_S).
LIMITS = {"load": 45, "build": 300, "check": 75, "pytest_experts": 110, "pytest_rest": 100,
          "memcheck": 40, "racecheck": 40}
BENCH_MIN_S = 60
PYTEST_REST = ["tests/test_layers.py", "tests/test_layers_remoe_ec.py", "tests/test_layers_base.py",
               "tests/test_layers_smear.py", "tests/test_hf.py", "tests/test_pipeline.py",
               "tests/test_permute.py", "tests/test_plan.py", "tests/test_route.py",
               "tests/test_assignment.py", "tests/test_merge.py", "tests/test_balance.py",
               "tests/test_sparsemixer.py", "tests/test_top_p.py", "tests/test_layers_topp.py",
               "tests/test_erc.py", "tests/test_telemetry.py", "tests/test_distributed.py"]

LOAD_PROBE = """
import torch, moeyard
info = moeyard.build_info()
assert info["cuda_compiled"], "moeyard was built without CUDA kernels"
w, e = moeyard.route(torch.randn(8, 4, device="cuda"), 2)
torch.cuda.synchronize()
print("loaded:", info, torch.cuda.get_device_name(), "sm", torch.cuda.get_device_capability())
"""


class Run:
    def __init__(self, budget_s, cpu_smoke):
        self.t0, self.budget, self.cpu_smoke = time.time(), budget_s, cpu_smoke
        self.scale = 5 if cpu_smoke else 1  # a 2-core CPU runs the small smoke ~5x slower
        self.rows = []
        self.env = dict(os.environ, OUT=str(OUT), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                 os.environ.get("PYTHONPATH")])))
        self.log = OUT / "gpu_check.log"

    def left(self):
        return self.budget - (time.time() - self.t0)

    def sh(self, name, cmd, limit):
        """Runs cmd (a list) under min(limit, time left); its output goes to the log. Returns
        (status, output): status "ok", "FAIL (rc N)", "timeout" or "skipped"."""
        limit = min(limit * self.scale, self.left())
        if limit < 5:
            return "skipped", ""
        start = time.time()
        with open(self.log, "a") as fh:
            fh.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                  timeout=limit)
            out, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else \
                f"FAIL (rc {proc.returncode})"
        except subprocess.TimeoutExpired as ex:
            out = (ex.stdout or b"").decode(errors="replace") if isinstance(ex.stdout, bytes) \
                else (ex.stdout or "")
            out += (ex.stderr or b"").decode(errors="replace") if isinstance(ex.stderr, bytes) \
                else (ex.stderr or "")
            status = "timeout"
        with open(self.log, "a") as fh:
            fh.write(out)
            fh.write(f"\n===== {name}: {status} in {time.time() - start:.0f} s\n")
        print(f"== {name}: {status} in {time.time() - start:.0f} s", flush=True)
        return status, out

    def row(self, stage, status, seconds, found):
        self.rows.append((stage, status, seconds, " / ".join(found.split("\n"))[:400]))


def tail(text, n=15):
    return "\n".join(text.strip().splitlines()[-n:])


def stage_load(run):
    py = sys.executable
    if run.cpu_smoke:
        status, out = run.sh("info", [py, "-m", "moeyard", "info"], LIMITS["load"])
        return status, next((ln for ln in out.splitlines() if ln.startswith("CUDA kernels")),
                            tail(out, 1))
    status, out = run.sh("load", [py, "-c", LOAD_PROBE], LIMITS["load"])
    if status != "ok":  # not loadable here: build for this GPU, then load again
        env_build = ["env", f"MAX_JOBS={os.cpu_count()}", "TORCH_CUDA_ARCH_LIST=9.0a"]
        run.sh("build", env_build + [py, "-m", "pip", "install", "-q", "--no-build-isolation",
                                     "--no-deps", "--no-index", "-e", "."], LIMITS["build"])
        status, out = run.sh("load (after build)", [py, "-c", LOAD_PROBE], LIMITS["load"])
    run.sh("info", [py, "-m", "moeyard", "info"], LIMITS["load"])
    return status, next((ln for ln in out.splitlines() if ln.startswith("loaded:")), tail(out, 3))


def stage_check(run):
    cmd = [sys.executable, "benchmarks/check_experts.py"] + (["--cpu-smoke"] if run.cpu_smoke
                                                             else [])
    status, out = run.sh("check_experts", cmd, LIMITS["check"])
    lines = [ln for ln in out.splitlines() if ln.startswith(("check_experts on", "FAIL"))]
    return status, "; ".join(lines[:4]) or tail(out, 3)


def pytest_counts(out):
    """pytest's last line ('3 failed, 120 passed, 4 skipped in 9.1s'), or, for a run cut short,
    the tests it got through (the progress characters of -q)."""
    m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|errors?)\b.*?)\s*=*$", out,
                   re.M)
    if m:
        return m[-1]
    progress = "".join(ln for ln in out.splitlines() if re.fullmatch(r"[.FEsx]+(\s+\[.*\])?", ln))
    return (f"cut short after {sum(progress.count(c) for c in '.FEsx')} tests, "
            f"{progress.count('F')} failed")


def stage_pytest(run):
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider"]
    found, statuses = [], []
    for name, files, limit in (("pytest experts", ["tests/test_experts.py"],
                                LIMITS["pytest_experts"]),
                               ("pytest rest", PYTEST_REST, LIMITS["pytest_rest"])):
        status, out = run.sh(name, base + files, limit)
        statuses.append(status)
        found.append(f"{name.split()[1]}: {pytest_counts(out)}")
    bad = [s for s in statuses if s != "ok"]
    return (bad[0] if bad else "ok"), "; ".join(found)


def stage_sanitize(run):
    if run.cpu_smoke or shutil.which("compute-sanitizer") is None:
        return "skipped", "needs a GPU and compute-sanitizer"
    found, statuses = [], []
    for tool in ("memcheck", "racecheck"):
        status, out = run.sh(tool, ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9",
                                    sys.executable, "tests/sanitizer_suite.py", "experts"],
                            LIMITS[tool])
        statuses.append(status)
        summary = re.findall(r"ERROR SUMMARY: .*", out)
        found.append(f"{tool}: {summary[-1] if summary else tail(out, 1)}")
    bad = [s for s in statuses if s != "ok"]
    return (bad[0] if bad else "ok"), "; ".join(found)


def stage_bench(run):
    if run.cpu_smoke:
        cmd, limit = [sys.executable, "benchmarks/bench_experts.py", "--cpu-smoke", "--skip-hf"], 300
    else:
        limit = max(run.left() - 10, BENCH_MIN_S)
        cmd = [sys.executable, "benchmarks/bench_experts.py", "--budget-s", str(int(limit - 20))]
    status, out = run.sh("bench_experts", cmd, limit)
    with open(OUT / "bench_experts.log", "w") as fh:
        fh.write(out)
    return status, tail(out, 1)


def bench_script(name):
    """A stage running benchmarks/bench_<name>.py within the time left (--cpu-smoke on CPU)."""
    def stage(run):
        if run.cpu_smoke and name == "routing":
            return "skipped", "bench_routing.py has no CPU mode"
        cmd = [sys.executable, f"benchmarks/bench_{name}.py"] + (["--cpu-smoke"] if run.cpu_smoke
                                                                else GPU_ARGS.get(name, []))
        status, out = run.sh(f"bench_{name}", cmd, max(run.left() - 10, BENCH_MIN_S))
        return status, tail(out, 1)
    return stage


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run (default 470; 1800 with --cpu-smoke)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1800 if args.cpu_smoke else 470
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES + MORE_STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)} (known: {', '.join(STAGES + MORE_STAGES)})")
    OUT.mkdir(parents=True, exist_ok=True)
    run = Run(args.budget_s, args.cpu_smoke)
    run.log.write_text(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')} cpu_smoke="
                       f"{args.cpu_smoke} budget {args.budget_s:.0f} s\n")
    fns = dict(load=stage_load, check=stage_check, pytest=stage_pytest, sanitize=stage_sanitize,
               bench=stage_bench, **{name: bench_script(name) for name in MORE_STAGES})
    for stage in stages:
        start = time.time()
        if stage != "load" and run.rows and run.rows[0][0] == "load" and run.rows[0][1] != "ok":
            run.row(stage, "skipped", 0, "moeyard did not load")
            continue
        status, found = fns[stage](run)
        run.row(stage, status, time.time() - start, found)
    print(f"\n== gpu_check: {time.time() - run.t0:.0f} s of {args.budget_s:.0f}; log "
          f"{run.log}")
    if set(stages) & {"bench", *MORE_STAGES}:
        subprocess.run([sys.executable, "benchmarks/summary.py", str(OUT)], cwd=ROOT, env=run.env)
    print("\n| stage | status | s | found |\n|---|---|---|---|")
    for stage, status, seconds, found in run.rows:
        print(f"| {stage} | {status} | {seconds:.0f} | {found.replace('|', '/')} |")
    with open(OUT / "gpu_check.json", "w") as fh:
        json.dump([dict(stage=s, status=st, seconds=round(t, 1), found=f)
                   for s, st, t, f in run.rows], fh, indent=1)
    return 0 if all(r[1] in ("ok", "skipped") for r in run.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
