"""The expert-parallel demo (``torchrun --nproc-per-node 2 -m moeyard demo --ep 2``) on 2 gloo
ranks on the CPU, a few steps at tiny sizes: rank 0 prints the table with every layer type but
SMEAR (skipped, said once) and the per-rank load table; the losses are finite; and for the layer
types whose EP training is exactly single-process training on the concatenated batch (dense,
and topk-bias: no aux loss, the bias balancer sums the loads over the ranks) the loss curve, the
held-out loss and the expert loads equal a single-process run with twice the batch.

The sizes keep every expert's weights a multiple of 16 numbers (2 I d = 1024, d I = 512): then
drawing them expert by expert (ShardedExperts) gives the same numbers as one draw of all of
them (Experts), so both runs start from the same weights."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from moeyard import demo  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=4, d_model=32, blocks=1, heads=2, experts=4, k=2, expert_size=16, seq_len=16,
            batch_size=4)
EXACT = ("dense", "topk-bias")


def torchrun(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moeyard", "demo", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_ep")
    sizes = [x for key, v in TINY.items() for x in ("--" + key.replace("_", "-"), v)]
    proc = torchrun("--ep", 2, *sizes, "--device", "cpu", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def test_table_on_rank_0_without_smear(ep_run):
    text, data = ep_run
    names = [r["layer_type"] for r in data["results"]]
    assert names == [t for t in demo.DEFAULT_LAYERS if t != "smear"]
    assert text.count(data["table"]) == 1 and text.count(data["rank_table"]) == 1  # rank 0 only
    assert text.count("skipping smear") == 1
    rows = {line.split()[0] for line in data["table"].splitlines()}
    assert set(names) <= rows
    for r in data["results"]:
        assert len(r["loss_curve"]) == TINY["steps"]
        for key in ("final_train_loss", "heldout_loss", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["layer_type"], key, r[key])
    by_name = {r["layer_type"]: r for r in data["results"]}
    assert by_name["dense"]["rank_rows"] is None
    tokens = 2 * TINY["steps"] * TINY["batch_size"] * TINY["seq_len"]  # both ranks
    for name in ("topk", "topk-bias"):  # dropless: every assignment computed by its owner
        assert sum(by_name[name]["rank_rows"]) == tokens * TINY["k"], name
        assert by_name[name]["rank_rows"] != [0, 0]


def test_equals_single_process_on_the_global_batch(ep_run):
    _, data = ep_run
    by_name = {r["layer_type"]: r for r in data["results"]}
    cfg = demo.DemoConfig(**{**TINY, "batch_size": 2 * TINY["batch_size"]})
    corpus = demo.make_corpus(cfg.corpus_chars, cfg.seed)
    for name in EXACT:
        want, got = demo.train(name, cfg, corpus, progress=False), by_name[name]
        assert got["loss_curve"] == pytest.approx(want["loss_curve"], abs=1e-5), name
        assert got["heldout_loss"] == pytest.approx(want["heldout_loss"], abs=1e-5), name
        assert got["expert_load"] == want["expert_load"], name
        assert (got["active_params"], got["total_params"]) == (want["active_params"],
                                                               want["total_params"]), name


def test_setup_errors(tmp_path):
    with pytest.raises(SystemExit, match="start it with torchrun"):
        demo.main(["--ep", "2", "--device", "cpu", "--out", str(tmp_path)])
    proc = torchrun("--ep", "3", "--device", "cpu", "--out", tmp_path, "--experts", "6")
    assert proc.returncode != 0 and "--ep 3 needs 3 processes, this run has 2" in proc.stderr
