"""Hugging Face model benchmark: a small Qwen3-MoE-like causal LM (transformers'
Qwen3MoeForCausalLM, built from a config, no download), forward + backward through the whole model
with transformers' experts implementations and moeyard's, same weights, same GPU, one run.

Model: vocab 32768, hidden 1024, 8 decoder layers, each attention (16 query heads, 4 key/value
heads, head_dim 128, RMSNorm on q and k, RoPE, sdpa) + a sparse MoE block (64 experts of
moe_intermediate_size 512, top-8, softmax -> top-k -> renormalize (norm_topk_prob=True), SwiGLU),
untied LM head: Qwen3-30B-A3B's design (hidden 2048, 128 experts of 768, top-8, 48 layers) scaled
down. 915M parameters, 805M of them in the experts; 210M active per token (embeddings included).
bf16 weights, normal(0, 0.02) init (transformers' own), training mode, no KV cache.
Batch: 4 sequences of 2048 random token ids (8192 tokens, fixed seed); loss = the model's LM loss
(labels = input_ids, transformers' shifted cross-entropy); no optimizer.

Implementations (--impls; every one shares the one model's parameters, each on its own copy of the
modules and config, so the numbers compare):
  eager          transformers' experts loop (experts_implementation="eager"): one Python iteration
                 per expert hit, host synchronizations; slow (an uncompiled impl whose first
                 fwd+bwd step takes over --max-step-s, default 10 s, is not timed: its row says so)
  grouped_mm     transformers' torch._grouped_mm path, its default: the reference
  moeyard        experts_implementation="moeyard" (import moeyard.hf): transformers' router, the
                 experts as one moeyard.expert_ffn
  moeyard-block  moeyard.hf.replace_moe(model): every sparse MoE block swapped for moeyard's, which
                 routes with moeyard.route / moeyard.plan too (default options: same routing)
  <impl>+compile the same under torch.compile(model) (--compile adds them for every chosen impl but
                 eager; compiling takes minutes: give gpu_check.py's hf stage the time)
Before timing each implementation, one fwd+bwd step on the benchmark batch is compared with a
grouped_mm step: the loss and the gradients of layer 0's gate_up_proj, the last layer's down_proj,
layer 0's router weight and the token embedding (relative Frobenius error; a WARNING line if above
2e-2). grouped_mm's own row compares two grouped_mm steps: its run-to-run noise (0 = deterministic).

Columns: fwd ms = median of CUDA-event timings of single model calls under no_grad (loss included)
after warm-up; fwd+bwd ms = the same for forward + loss.backward() (launch and host time included,
as an eager user sees it); tokens/s = batch tokens / fwd+bwd time; peak MiB = peak allocated during
one fwd+bwd step above what was allocated before it, .grad reset to None first (so the parameter
gradients, 1.7 GiB, are included); vs grouped_mm = grouped_mm's fwd+bwd time / this one's.
Prints a table last; writes JSON (rewritten after every implementation) to $OUT/bench_hf.json (OUT
default "out") with the torch / transformers versions and the device. --cpu-smoke runs the same
plumbing, the comparison included, on CPU at a tiny fp32 config in seconds; the test suite runs it.

    python benchmarks/bench_hf.py [--impls grouped_mm,moeyard] [--compile] [--quick] [--cpu-smoke]
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_experts as bx  # noqa: E402  (timing, peak memory and error capture live there)

# Qwen3MoeConfig keyword arguments (every layer sparse: decoder_sparse_step 1, no mlp_only_layers)
MODEL = dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, moe_intermediate_size=512, num_experts=64,
             num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096)
BATCH, SEQ = 4, 2048
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128)
SMOKE_BATCH, SMOKE_SEQ = 2, 64

IMPLS = ("eager", "grouped_mm", "moeyard", "moeyard-block")
REFERENCE = "grouped_mm"
COMPILED = "+compile"
TOL = 2e-2  # bf16; the fp32 smoke run is far below
OUT = os.environ.get("OUT", "out")
ROWS = []
META = {}


# --------------------------------------------------------------------------------- the model


def build_model(cfg_kwargs, dtype):
    """Qwen3MoeForCausalLM, transformers' initialization (seed 0), in ``dtype``, training mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(**cfg_kwargs, use_cache=False, tie_word_embeddings=False,
                         attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device(bx.DEV):
        model = Qwen3MoeForCausalLM(cfg)
    return model.to(dtype).train()


def check_params(num_layers):
    """Parameter names whose gradients the agreement check compares."""
    last = num_layers - 1
    return ("model.layers.0.mlp.experts.gate_up_proj", f"model.layers.{last}.mlp.experts.down_proj",
            "model.layers.0.mlp.gate.weight", "model.embed_tokens.weight")


def make_variant(base, impl):
    """(model, callable, note) for ``impl``: a copy of ``base``'s modules and config that shares
    its parameters (the memo maps each parameter to itself), switched to ``impl``."""
    name, compiled = impl.removesuffix(COMPILED), impl.endswith(COMPILED)
    model = copy.deepcopy(base, {id(p): p for p in base.parameters()})
    note = ""
    if name == "moeyard-block":
        import moeyard.hf
        replaced = moeyard.hf.replace_moe(model)
        note = f"replace_moe: {len(replaced)} blocks"
        if len(replaced) != base.config.num_hidden_layers:
            print(f"WARNING {impl}: replace_moe replaced {len(replaced)} blocks, the model has "
                  f"{base.config.num_hidden_layers} sparse MoE layers", flush=True)
    else:
        if name == "moeyard":
            import moeyard.hf  # noqa: F401  (registers "moeyard" in transformers' ExpertsInterface)
        model.set_experts_implementation(name)
        got = model.config._experts_implementation
        if got != name:
            raise RuntimeError(f"transformers chose experts implementation {got!r}, not {name!r}")
    if compiled:
        # every compiled variant traces the same forward code objects (with and without grad):
        # room for all of them before dynamo stops recompiling
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return model, torch.compile(model), note
    return model, model, note


# -------------------------------------------------------------------------- check and timing


def checked_step(model, fn, ids, names):
    """One fwd+bwd step: (loss, {name: grad}, seconds), grads reset to None before and after."""
    params = list(model.parameters())
    bx.clear_grads(params)
    bx.sync()
    t0 = time.perf_counter()
    loss = fn(input_ids=ids, labels=ids).loss
    loss.backward()
    bx.sync()
    seconds = time.perf_counter() - t0
    grads = {n: model.get_parameter(n).grad.detach().clone() for n in names}
    bx.clear_grads(params)
    return loss.detach().float(), grads, seconds


def agreement(ref, got):
    """Relative errors of ``got`` against ``ref`` (both checked_step results)."""
    errs = {"loss": bx.rel_err(got[0], ref[0])}
    errs.update({f"grad {n}": bx.rel_err(got[1][n], ref[1][n]) for n in ref[1]})
    return errs


def run_impl(base, impl, ids, ref, args, reps):
    model, fn, note = make_variant(base, impl)
    params = list(model.parameters())
    tokens = ids.numel()
    res = checked_step(model, fn, ids, ref[1].keys())
    errs = agreement(ref, res)
    warn = {n: v for n, v in errs.items() if not v <= TOL}
    print(f"check {impl} vs {REFERENCE}: " + ", ".join(f"{n} {v:.1e}" for n, v in errs.items()),
          flush=True)
    if warn:
        print(f"WARNING {impl}: differs from {REFERENCE} by more than {TOL:.0e}: {warn}",
              flush=True)
    row = dict(impl=impl, fwd_ms=None, step_ms=None, tokens_per_s=None, peak_mib=None,
               first_step_s=res[2], check=errs, warning=bool(warn), note=note)
    ROWS.append(row)
    dump()
    if not impl.endswith(COMPILED) and res[2] > args.max_step_s:
        row["note"] = (f"{note}; " if note else "") + \
            f"not timed: one fwd+bwd step took {res[2]:.1f} s (> --max-step-s {args.max_step_s})"
        print(f"skip {impl}: {row['note']}", flush=True)
        dump()
        return

    def fwd():
        with torch.no_grad():
            fn(input_ids=ids, labels=ids)

    def step():
        fn(input_ids=ids, labels=ids).loss.backward()

    w, r = reps["eager" if impl == "eager" else "model"]
    row["fwd_ms"] = bx.bench(fwd, w, r)
    row["step_ms"] = bx.bench(step, w, r)
    bx.clear_grads(params)
    row["tokens_per_s"] = tokens / (row["step_ms"] * 1e-3)
    row["peak_mib"] = bx.peak_extra_mib(step, params)
    pk = f"{row['peak_mib']:8.0f} MiB" if row["peak_mib"] is not None else ""
    print(f"{impl:24s} fwd {row['fwd_ms']:9.2f} ms   fwd+bwd {row['step_ms']:9.2f} ms   "
          f"{row['tokens_per_s']:10.0f} tokens/s {pk}  {note}", flush=True)
    dump()


# ----------------------------------------------------------------------------------- report


def with_speedups(rows):
    ref = next((r for r in rows if r["impl"] == REFERENCE and r["step_ms"]), None)
    for r in rows:
        r["vs_grouped_mm"] = ref["step_ms"] / r["step_ms"] if ref and r["step_ms"] else None
    return rows


def dump(final=False):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bench_hf.json"), "w") as fh:
        json.dump(dict(META, rows=with_speedups(ROWS), complete=final), fh, indent=1)


def print_report(rows):
    print("\n| impl | fwd ms | fwd+bwd ms | tokens/s | peak MiB | vs grouped_mm | max check err |"
          " note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in with_speedups(rows):
        worst = max(r["check"].values()) if r["check"] else None
        print(f"| {r['impl']} | {bx.fmt(r['fwd_ms'], '.2f')} | {bx.fmt(r['step_ms'], '.2f')} | "
              f"{bx.fmt(r['tokens_per_s'], '.0f')} | {bx.fmt(r['peak_mib'], '.0f')} | "
              f"{bx.fmt(r['vs_grouped_mm'], '.2f')}{'x' if r['vs_grouped_mm'] else ''} | "
              f"{bx.fmt(worst, '.1e')}{' WARNING' if r['warning'] else ''} | {r['note']} |")


# -------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help=f"comma-separated subset of {','.join(IMPLS)}, each optionally with "
                         f"'{COMPILED}' (default: all, uncompiled)")
    ap.add_argument("--compile", action="store_true",
                    help="also time a torch.compile'd variant of every chosen impl but eager")
    ap.add_argument("--batch", type=int, default=None, help=f"sequences (default {BATCH})")
    ap.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {SEQ})")
    ap.add_argument("--quick", action="store_true", help="fewer warm-up calls and repetitions")
    ap.add_argument("--max-step-s", type=float, default=10.0,
                    help="do not time an impl whose first fwd+bwd step takes longer (default 10 s)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny fp32 model on CPU: the plumbing and the check, numbers meaningless")
    args = ap.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i.removesuffix(COMPILED) not in IMPLS:
            ap.error(f"unknown impl {i!r} (known: {', '.join(IMPLS)}, each optionally {COMPILED})")
    if args.compile:
        impls += [i + COMPILED for i in impls if i != "eager" and not i.endswith(COMPILED)]
    args.impls = list(dict.fromkeys(impls))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        bx.DEV, cfg, dtype = "cpu", SMOKE_MODEL, torch.float32
        batch, seq = args.batch or SMOKE_BATCH, args.seq or SMOKE_SEQ
        reps = dict(model=(1, 2), eager=(1, 2))
        # tiny ops: one thread, so a busy 2-core machine does not stall OpenMP's spinning workers
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_hf.py needs a GPU (--cpu-smoke runs its plumbing on CPU)")
        cfg, dtype = MODEL, torch.bfloat16
        batch, seq = args.batch or BATCH, args.seq or SEQ
        reps = dict(model=(1, 3), eager=(1, 2)) if args.quick else \
            dict(model=(3, 10), eager=(1, 3))
    import transformers

    import moeyard
    dev = torch.cuda.get_device_name() if bx.DEV == "cuda" else "cpu"
    os.makedirs(OUT, exist_ok=True)
    errors = "bench_hf_errors.txt"
    open(os.path.join(OUT, errors), "w").close()  # this run's tracebacks
    META.update(device=dev, torch=torch.__version__, transformers=transformers.__version__,
                moeyard=moeyard.__version__, model=dict(cfg), dtype=str(dtype), batch=batch,
                seq=seq, tokens=batch * seq, reps=reps, impls=args.impls,
                date=time.strftime("%Y-%m-%d"))

    t0 = time.time()
    base = build_model(cfg, dtype)
    n_params = sum(p.numel() for p in base.parameters())
    n_experts = sum(p.numel() for n, p in base.named_parameters() if ".experts." in n)
    k, E = cfg["num_experts_per_tok"], cfg["num_experts"]
    META["params"] = dict(total=n_params, experts=n_experts,
                          active_per_token=n_params - n_experts + n_experts * k // E)
    print(f"device {dev}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"Qwen3MoeForCausalLM {n_params / 1e6:.1f}M params ({n_experts / 1e6:.1f}M in experts), "
          f"{dtype}, batch {batch} x {seq}; impls {','.join(args.impls)}", flush=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=gen).to(bx.DEV)
    names = check_params(cfg["num_hidden_layers"])

    ref = []

    def reference():
        model, fn, _ = make_variant(base, REFERENCE)
        ref.extend(checked_step(model, fn, ids, names))
        print(f"reference {REFERENCE}: loss {ref[0].item():.4f}, first step {ref[2]:.2f} s",
              flush=True)
    bx.safe("reference", reference, errors)
    if not ref:
        sys.exit(f"bench_hf.py: the {REFERENCE} reference step failed (see $OUT/{errors})")
    for impl in args.impls:
        bx.safe(impl, lambda: run_impl(base, impl, ids, ref, args, reps), errors)
    META["seconds"] = time.time() - t0
    print_report(ROWS)
    dump(final=True)
    print(f"\nwrote {os.path.join(OUT, 'bench_hf.json')} ({len(ROWS)} rows, "
          f"{META['seconds']:.0f} s)")
    return 1 if any(r["warning"] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
