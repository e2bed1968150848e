"""Run transformers' own model tests with moeyard forced in, and list what moeyard breaks.

What it checks: for each MoE family, transformers' test file
``tests/models/<family>/test_modeling_<family>.py`` (``-k "not slow and not integration"``, CPU)
runs in three modes (see tests/hf_suite_plugin.py, loaded with ``-p``):

    baseline  unmodified transformers
    experts   every model built gets experts_implementation="moeyard" unless the test asks for
              another implementation (its routers stay, its experts run on moeyard)
    replace   every model built gets moeyard.hf.replace_moe after post_init (moeyard routing and
              experts); block classes replace_moe does not know are left alone and counted

and prints, per family and mode, passed / failed / errors / skipped, and then every test that
PASSES in baseline but FAILS in a moeyard mode, grouped by its first error line (exception type
and message, numbers and model class names folded), so that the causes stand out. ``--silu``
gives gated GELU experts SiLU in every mode (baseline too): transformers' test configs use
hidden_act="gelu", and where moeyard refuses GeGLU experts that one refusal hides all behind it.

Getting transformers' tests: the tests of the INSTALLED transformers version (the driver warns if
the checkout's version differs), from its repository at the release tag:

    git clone --depth 1 --branch v5.23.0 https://github.com/huggingface/transformers hf-tests

(The PyPI sdist, pip download --no-binary :all: --no-deps transformers==5.23.0, has src/ and the
top-level tests/test_*.py at exactly that version but not tests/models/, causal_lm_tester.py,
generation/, exporters/, utils/ nor conftest.py: those have to come from the repository.)
The checkout needs tests/ (test_modeling_common.py, causal_lm_tester.py, generation/,
exporters/, utils/, models/<family>/), conftest.py, pyproject.toml and src/ (read by
tests/test_pipeline_mixin.py; the tests still run the installed transformers: the plugin imports
it before conftest.py puts src/ on sys.path). Test-only packages, into a venv of their own:

    python -m venv --system-site-packages /path/venv
    /path/venv/bin/pip install parameterized pytest-timeout pytest-xdist httpx

(parameterized and httpx are imported by the tests; pytest-timeout gives --timeout and
pytest-xdist --workers; the tests also use moeyard, torch, transformers, accelerate, numpy.)

Running (from anywhere; moeyard is imported from this checkout's python/ unless --moeyard-path):

    /path/venv/bin/python tests/hf_suite.py /path/hf-tests                   # all families
    /path/venv/bin/python tests/hf_suite.py /path/hf-tests -f mixtral olmoe -m baseline experts
    /path/venv/bin/python tests/hf_suite.py /path/hf-tests --json out.json --results-dir res
    /path/venv/bin/python tests/hf_suite.py /path/hf-tests --report-only --results-dir res

Each run writes <results-dir>/<family>.<mode>.xml (junit), .log and .time (default results-dir:
out/hf_suite in this checkout, git-ignored); --report-only re-reads them.
The distributed mixins (tensor/expert parallel, FSDP: several processes each, without the plugin)
are skipped unless --distributed.

How long (2 shared CPU cores, one pytest process, transformers 5.23.0): 0.7-5 minutes per
family and mode; baseline Mixtral 2.7 min (163 passed, 99 skipped), Qwen3-MoE 3.4, DeepSeek-V3
2.8, OLMoE 1.5, MiniMax 4.9; a moeyard mode takes about as long, less where tests fail early.
All 11 families in three modes: about 1.5 hours. --workers 2 (pytest-xdist) where cores are free.

Not for CI: it needs a transformers checkout (network) and hours of CPU. Not collected by
pytest (no test_ prefix). Exit status 1 if any test passes in baseline and fails in a moeyard
mode, else 0 (a mode whose family has no baseline results compares nothing).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "jamba", "minimax",
            "deepseek_v3", "olmoe", "qwen3_next", "gpt_oss"]
MODES = ["baseline", "experts", "replace"]
BAD = ("failed", "error")


def test_file(checkout: Path, family: str) -> Path:
    return checkout / "tests" / "models" / family / f"test_modeling_{family}.py"


def checkout_version(checkout: Path):
    init = checkout / "src" / "transformers" / "__init__.py"
    if init.exists():
        m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text())
        return m.group(1) if m else None
    return None


def run_one(args, family: str, mode: str) -> dict:
    """One pytest run; returns {"seconds", "returncode"}; junit and log in results_dir."""
    out = args.results_dir / f"{family}.{mode}.xml"
    log = args.results_dir / f"{family}.{mode}.log"
    expr = "not slow and not integration" + (f" and ({args.k})" if args.k else "")
    cmd = [args.python, "-m", "pytest", str(test_file(args.checkout, family)), "-k", expr,
           "-p", "hf_suite_plugin", "-p", "no:cacheprovider", "-q", "-rN",
           "-o", "log_cli=false", f"--junitxml={out}"]
    if args.timeout:
        cmd += [f"--timeout={args.timeout}"]
    if args.workers > 1:
        cmd += ["-n", str(args.workers)]
    env = dict(os.environ)
    paths = [str(args.moeyard_path), str(HERE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["MOEYARD_HF_SUITE_MODE"] = mode
    env["MOEYARD_HF_SUITE_SILU"] = "1" if args.silu else "0"
    if not args.distributed:
        for name in ("TENSOR_PARALLEL", "EXPERT_PARALLEL", "FSDP"):
            env[f"RUN_{name}_TESTS"] = "0"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=args.checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    (args.results_dir / f"{family}.{mode}.time").write_text(f"{seconds:.1f}\n")
    return {"seconds": seconds, "returncode": proc.returncode}


# What is folded out of a first error line to group the same cause across tests and families:
# addresses, temporary paths, numbers, and model-specific class names (MixtralExperts -> <Experts>)
_CLASS_SUFFIXES = ("Experts", "MoE", "Moe", "SparseMoeBlock", "SparseMoEBlock", "MLP", "Router",
                   "TopkRouter", "TopKRouter", "Gate", "Model", "ForCausalLM", "Config",
                   "Attention", "DecoderLayer", "PreTrainedModel")
_FOLD = [(re.compile(r"0x[0-9a-fA-F]+"), "0x?"), (re.compile(r"/tmp/\S+"), "/tmp/?"),
         (re.compile(r"\b[A-Z][A-Za-z0-9_]*?(" + "|".join(_CLASS_SUFFIXES) + r")\b"), r"<\1>"),
         (re.compile(r"-?\d+(\.\d+)?(e-?\d+)?"), "#")]


def first_line(message: str, width: int = 160) -> str:
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "(no message)")
    return line[:width]


def cause_key(message: str) -> str:
    key = first_line(message, 400)
    for pattern, repl in _FOLD:
        key = pattern.sub(repl, key)
    return key[:160]


def parse_junit(path: Path) -> dict:
    """{test id: {"outcome", "message", "props"}}; a test reported more than once (subtests)
    keeps its worst outcome."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    tests: dict = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        tid = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag, name in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                outcome = name
                message = el.get("message") or (el.text or "")
                break
        props = {}
        for p in case.iter("property"):
            props.setdefault(p.get("name"), []).append(p.get("value"))
        old = tests.get(tid)
        if old is None or rank[outcome] > rank[old["outcome"]]:
            tests[tid] = {"outcome": outcome, "message": message, "props": props}
    return tests


def summarize(tests: dict) -> dict:
    c = collections.Counter(t["outcome"] for t in tests.values())
    used = sum(1 for t in tests.values() if any(int(v) for v in t["props"].get("moeyard_models",
                                                                                  ["0"])))
    refused = sum(1 for t in tests.values() if any(int(v) for v in t["props"].get(
        "moeyard_refused", ["0"])))
    return {"passed": c["passed"], "failed": c["failed"], "errors": c["error"],
            "skipped": c["skipped"], "moeyard_used": used, "refused": refused}


def load_results(results_dir: Path, families, modes) -> dict:
    results = {}
    for fam in families:
        for mode in modes:
            xml = results_dir / f"{fam}.{mode}.xml"
            if not xml.exists():
                continue
            try:
                tests = parse_junit(xml)
            except ET.ParseError as e:
                print(f"warning: {xml}: {e}", file=sys.stderr)
                continue
            tfile = results_dir / f"{fam}.{mode}.time"
            seconds = float(tfile.read_text()) if tfile.exists() else None
            results[(fam, mode)] = {"tests": tests, "seconds": seconds}
    return results


def regressions(results: dict) -> list:
    """(mode, family, test, outcome, message): passed in baseline, failed/error in mode."""
    rows = []
    for (fam, mode), res in sorted(results.items()):
        base = results.get((fam, "baseline"))
        if mode == "baseline" or base is None:
            continue
        for tid, t in sorted(res["tests"].items()):
            b = base["tests"].get(tid)
            if b and b["outcome"] == "passed" and t["outcome"] in BAD:
                rows.append((mode, fam, tid, t["outcome"], t["message"]))
    return rows


def report(results: dict, families, modes, width: int = 160) -> dict:
    print("\nfamily        mode      passed failed errors skipped  used refused   time")
    table = []
    for fam in families:
        for mode in modes:
            res = results.get((fam, mode))
            if res is None:
                continue
            s = summarize(res["tests"])
            t = "" if res["seconds"] is None else f"{res['seconds'] / 60:5.1f}m"
            print(f"{fam:13} {mode:9} {s['passed']:6} {s['failed']:6} {s['errors']:6} "
                  f"{s['skipped']:7} {s['moeyard_used']:5} {s['refused']:7} {t:>6}")
            table.append({"family": fam, "mode": mode, **s, "seconds": res["seconds"]})
    print("(used: tests that built a model with moeyard in it; refused: tests in which replace_moe "
          "left a model alone, its block class unsupported)")
    regs = regressions(results)
    groups: dict = collections.defaultdict(list)
    for mode, fam, tid, outcome, message in regs:
        groups[(mode, cause_key(message))].append((fam, tid, outcome, message))
    causes = []
    for mode in modes:
        keyed = sorted(((k, v) for k, v in groups.items() if k[0] == mode),
                       key=lambda kv: -len(kv[1]))
        if not keyed:
            continue
        n = sum(len(v) for _, v in keyed)
        print(f"\n== {mode}: {n} tests pass in baseline and fail here, {len(keyed)} causes ==")
        other = [(f, t) for (f, m), res in sorted(results.items()) if m == mode
                 for t, v in sorted(res["tests"].items()) if v["outcome"] in BAD
                 and (results.get((f, "baseline")) or {"tests": {}})["tests"].get(
                     t, {}).get("outcome") in ("skipped", None)]
        if other:
            print(f"(and {len(other)} that fail here but were skipped or absent in baseline: "
                  + ", ".join(f"{f}: {t}" for f, t in other[:8])
                  + (", ..." if len(other) > 8 else "") + ")")
        for (_, key), items in keyed:
            fams = collections.Counter(f for f, *_ in items)
            print(f"\n[{len(items)}] {first_line(items[0][3], width)}")
            print("    families: " + ", ".join(f"{f} {c}" for f, c in fams.most_common()))
            for fam, tid, outcome, _ in items:
                print(f"    {fam}: {tid}" + (" (error)" if outcome == "error" else ""))
            causes.append({"mode": mode, "cause": first_line(items[0][3], 400), "key": key,
                           "tests": [{"family": f, "test": t, "outcome": o}
                                     for f, t, o, _ in items]})
    if not regs:
        print("\nno test passes in baseline and fails in a moeyard mode")
    return {"table": table, "causes": causes, "regressions": len(regs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", type=Path, help="transformers checkout (has tests/ and src/)")
    ap.add_argument("-f", "--families", nargs="+", default=FAMILIES, metavar="FAMILY")
    ap.add_argument("-m", "--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("-k", default="", help="extra pytest -k expression, and-ed with the default")
    ap.add_argument("--timeout", type=int, default=600,
                    help="per-test timeout in s (pytest-timeout; 0: none)")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (default 1)")
    ap.add_argument("--silu", action="store_true",
                    help="gated GELU experts get SiLU in every mode (see the docstring)")
    ap.add_argument("--distributed", action="store_true",
                    help="also run the tensor/expert-parallel and FSDP mixins (multi-process)")
    ap.add_argument("--results-dir", type=Path, default=HERE.parent / "out" / "hf_suite",
                    help="junit XML, logs and times (default: out/hf_suite, git-ignored)")
    ap.add_argument("--report-only", action="store_true", help="re-read results-dir, run nothing")
    ap.add_argument("--json", type=Path, help="also write the table and causes as JSON")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    ap.add_argument("--moeyard-path", type=Path, default=HERE.parent / "python",
                    help="directory holding the moeyard package (default: this checkout's)")
    args = ap.parse_args(argv)
    args.checkout = args.checkout.resolve()
    args.results_dir = args.results_dir.resolve()
    args.results_dir.mkdir(parents=True, exist_ok=True)

    families = []
    for fam in args.families:
        if test_file(args.checkout, fam).exists():
            families.append(fam)
        else:
            print(f"skipping {fam}: {test_file(args.checkout, fam)} does not exist")
    if not args.report_only:
        import transformers
        have = checkout_version(args.checkout)
        if have != transformers.__version__:
            print(f"warning: the checkout is transformers {have}, installed is "
                  f"{transformers.__version__}: the tests may not match the library")
        missing = [m for m in ("pytest_timeout", "xdist", "parameterized")
                   if importlib.util.find_spec(m) is None]
        if "parameterized" in missing:
            sys.exit("the tests import parameterized: pip install parameterized (see docstring)")
        if args.timeout and "pytest_timeout" in missing:
            print("pytest-timeout not installed: no per-test timeout")
            args.timeout = 0
        if args.workers > 1 and "xdist" in missing:
            print("pytest-xdist not installed: one worker")
            args.workers = 1
        for fam in families:
            for mode in args.modes:
                print(f"running {fam} {mode} ...", end=" ", flush=True)
                r = run_one(args, fam, mode)
                print(f"{r['seconds'] / 60:.1f} min (pytest exit {r['returncode']})", flush=True)
    # the baseline is read whenever it is there: the modes run now are compared with it
    results = load_results(args.results_dir, families, ["baseline"] + args.modes)
    out = report(results, families, args.modes)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 1 if out["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
