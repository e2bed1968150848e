"""The demo (``python -m moeyard demo``): a tiny run of every default layer type through
``demo.main`` (table, JSON, PNG, losses going down, equal active parameters), the corpus, the
non-causal flag, the command-line wiring and bad layer names."""
import contextlib
import io
import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from moeyard import demo  # noqa: E402

TINY = {"--steps": 30, "--d-model": 32, "--blocks": 1, "--heads": 2, "--experts": 4, "--k": 2,
        "--expert-size": 16, "--seq-len": 16, "--batch-size": 8}


def tiny_args(out, **extra):
    args = {**TINY, "--out": out, "--device": "cpu", **extra}
    return [str(x) for kv in args.items() for x in kv] + ["--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the default layer types through demo.main: (stdout, results.json, out)."""
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(tiny_args(out)) == 0
    return printed.getvalue(), json.loads((out / "results.json").read_text()), out


def test_every_default_layer_type_in_table_and_json(tiny_run):
    text, data, _ = tiny_run
    names = [r["layer_type"] for r in data["results"]]
    assert names == list(demo.DEFAULT_LAYERS)
    table_rows = {line.split()[0] for line in data["table"].splitlines()}
    assert set(names) <= table_rows
    assert data["table"] in text  # the table is what was printed
    for r in data["results"]:
        assert len(r["loss_curve"]) == TINY["--steps"]
        for key in ("initial_loss", "final_train_loss", "heldout_loss", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["layer_type"], key, r[key])
        assert set(r["heldout_by_domain"]) == set(demo.DOMAINS)


def test_losses_go_down(tiny_run):
    _, data, _ = tiny_run
    by_name = {r["layer_type"]: r for r in data["results"]}
    for name in ("dense", "topk"):
        r = by_name[name]
        # initial loss is about ln(vocab); 30 steps learn at least the character frequencies
        assert abs(r["initial_loss"] - math.log(len(demo.VOCAB))) < 0.2, r["initial_loss"]
        assert r["final_train_loss"] < r["initial_loss"] - 0.3, (name, r["final_train_loss"])
        assert r["heldout_loss"] < r["initial_loss"] - 0.3, (name, r["heldout_loss"])


def test_routing_statistics(tiny_run):
    _, data, _ = tiny_run
    by_name = {r["layer_type"]: r for r in data["results"]}
    dense = by_name["dense"]
    assert dense["max_violation"] is None and dense["expert_load"] == []
    E = TINY["--experts"]
    tokens = TINY["--steps"] * TINY["--batch-size"] * TINY["--seq-len"]
    for name in ("switch", "topk", "topk-bias", "remoe"):
        r = by_name[name]
        assert r["max_violation"] >= 0
        [load] = r["expert_load"]  # one block
        assert len(load) == E
        if name != "remoe":  # every token makes k assignments (1 for switch)
            assert sum(load) == tokens * (1 if name == "switch" else TINY["--k"])
    assert 0 <= by_name["switch"]["dropped_fraction"] < 1
    assert by_name["topk"]["dropped_fraction"] == 0  # dropless
    assert 0 <= by_name["remoe"]["sparsity"] <= 1
    assert by_name["topk"]["sparsity"] is None
    assert "n/a" in data["table"].splitlines()[2]  # the dense row
    # routing fluctuation: one value per interval between the 10 probe checkpoints
    assert dense["routing_fluctuation"] is None and dense["fluctuation_curve"] == []
    for r in data["results"][1:]:
        steps = [s for s, _ in r["fluctuation_curve"]]
        assert steps == [3 * i for i in range(2, 11)], r["layer_type"]
        assert all(0 <= f <= 1 for _, f in r["fluctuation_curve"])
        late = [f for s, f in r["fluctuation_curve"] if s > TINY["--steps"] / 2]
        assert r["routing_fluctuation"] == pytest.approx(sum(late) / len(late))
    assert "fluct. %" in data["table"] and "StableMoE" in data["table"]


def test_active_parameters_match_dense(tiny_run):
    _, data, _ = tiny_run
    by_name = {r["layer_type"]: r for r in data["results"]}
    router = TINY["--blocks"] * TINY["--d-model"] * TINY["--experts"]
    for name in ("switch", "topk", "topk-bias", "remoe"):
        assert by_name[name]["active_params"] == by_name["dense"]["active_params"] + router, name
        assert by_name[name]["total_params"] > by_name[name]["active_params"]


def test_png_written(tiny_run):
    _, _, out = tiny_run
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_corpus_deterministic_and_in_vocab():
    a, b = demo.make_corpus(1 << 12, seed=3), demo.make_corpus(1 << 12, seed=3)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    c = demo.make_corpus(1 << 12, seed=4)
    assert not torch.equal(a.train, c.train)
    assert a.train.numel() == 1 << 12 and int(a.train.max()) < len(demo.VOCAB)
    assert not torch.equal(a.train[:a.heldout.numel()], a.heldout)
    text = {d: demo.decode(s) for d, s in a.heldout_by_domain.items()}
    assert all("+" in line and "=" in line for line in text["arithmetic"].split("\n")[:-1])
    for line in text["arithmetic"].split("\n")[:-1]:  # every complete equation is right
        for eq in line.split(";")[:-1]:
            lhs, rhs = eq.split("=")
            x, y = lhs.split("+")
            assert int(x) + int(y) == int(rhs), eq
    assert "|" in text["copy"] and "<" in text["reverse"]
    for item in text["reverse"].split("\n")[0].split(";")[:-1]:
        s, r = item.split("<")
        assert r == s[::-1]
    # the languages use different letters
    letters = [set(text[d]) - set(" .\n") for d in ("lang-a", "lang-b", "lang-c")]
    assert letters[0] != letters[1] != letters[2]


def test_non_causal_layer_flagged(tmp_path):
    cfg = demo.DemoConfig(d_model=16, blocks=1, heads=2, experts=4, k=2, expert_size=8,
                          seq_len=8, batch_size=4, steps=3, eval_batches=1)
    corpus = demo.make_corpus(1 << 12)
    r = demo.train("expert-choice", cfg, corpus, progress=False)
    assert r["causal"] is False and r["dropped_fraction"] is not None
    table = demo.format_table([r])
    assert "expert-choice *" in table and "not causal" in table


@pytest.mark.parametrize("name", ["topp", "topk-erc"])
def test_opt_in_layer_types(name):
    """The opt-in types train (not in the default run): top-p reports its experts per token,
    topk-erc adds the ERC loss in training."""
    assert name in demo.LAYER_TYPES and name not in demo.DEFAULT_LAYERS
    cfg = demo.DemoConfig(d_model=16, blocks=1, heads=2, experts=4, k=2, expert_size=8,
                          seq_len=8, batch_size=4, steps=3, eval_batches=1)
    r = demo.train(name, cfg, demo.make_corpus(1 << 12), progress=False)
    assert math.isfinite(r["heldout_loss"]) and r["final_train_loss"] > 0
    if name == "topp":
        assert 1 <= r["experts_per_token"] <= cfg.experts
    else:
        assert r["experts_per_token"] is None
        model = demo.TinyLM(cfg, name)
        model(torch.zeros(1, 4, dtype=torch.int64))
        assert "erc" in model.blocks[0].mlp.aux_losses


def test_train_a_given_model_in_place():
    cfg = demo.DemoConfig(d_model=16, blocks=1, heads=2, experts=4, k=2, expert_size=8,
                          seq_len=8, batch_size=4, steps=3, eval_batches=1)
    model = demo.TinyLM(cfg, "topk")
    before = model.blocks[0].mlp.router.weight.detach().clone()
    r = demo.train("topk", cfg, demo.make_corpus(1 << 12), progress=False, model=model)
    assert not torch.equal(model.blocks[0].mlp.router.weight, before)
    assert len(r["loss_curve"]) == 3


def test_command_line_and_bad_names(tmp_path, capsys):
    from moeyard.__main__ import main
    assert main(["demo", *tiny_args(tmp_path, **{"--layers": "dense", "--steps": 3})]) == 0
    assert "dense" in capsys.readouterr().out
    assert (tmp_path / "results.json").exists()
    with pytest.raises(ValueError, match="unknown layer type"):
        demo.main(tiny_args(tmp_path, **{"--layers": "dense,nope"}))


@pytest.mark.parametrize("name", [t for t in demo.LAYER_TYPES if t not in demo.DEFAULT_LAYERS])
def test_opt_in_layer_types_train(tmp_path, name):
    """The layer types outside the default run train through --layers (a few steps, finite
    losses that go down)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(tiny_args(tmp_path, **{"--layers": name, "--steps": 12})) == 0
    (r,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert r["layer_type"] == name and name in printed.getvalue()
    assert math.isfinite(r["heldout_loss"]) and r["final_train_loss"] < r["initial_loss"]


def test_grin_is_opt_in_and_trains():
    """The "grin" layer type (PhiMoE's sparsemixer routing) is not in the default run; named, it
    trains, is causal and has the dense baseline's active parameters (plus the router)."""
    assert "grin" in demo.LAYER_TYPES and "grin" not in demo.DEFAULT_LAYERS
    cfg = demo.DemoConfig(d_model=16, blocks=1, heads=2, experts=4, k=2, expert_size=8,
                          seq_len=8, batch_size=4, steps=3, eval_batches=1)
    corpus = demo.make_corpus(1 << 12)
    grin, dense = (demo.train(name, cfg, corpus, progress=False) for name in ("grin", "dense"))
    assert grin["causal"] is True and math.isfinite(grin["heldout_loss"])
    assert grin["active_params"] == dense["active_params"] + cfg.d_model * cfg.experts
    assert sum(grin["expert_load"][0]) == cfg.steps * cfg.batch_size * cfg.seq_len * 2
