"""Command line: ``python -m moeyard demo`` (train a small MoE language model with each layer type
and a dense baseline, print a comparison table, save loss and expert-load plots; see
:mod:`moeyard.demo`), ``python -m moeyard info`` (versions, kernels, GPU) and
``python -m moeyard example`` (route a small random batch, print its dispatch plan, run the
experts forward and backward)."""
import argparse
import sys

import torch

import moeyard
from moeyard import demo


def info() -> None:
    b = moeyard.build_info()
    print(f"moeyard        {moeyard.__version__}")
    print(f"torch          {torch.__version__} (compiled against {b['torch']})")
    print(f"torch CUDA     {torch.version.cuda or 'none (CPU-only torch)'}")
    archs = ", ".join(b["cuda_archs"]) or "-"
    print(f"CUDA kernels   {'compiled for ' + archs if b['cuda_compiled'] else 'not compiled'}")
    if torch.cuda.is_available():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"GPU            {torch.cuda.get_device_name()} (sm {cap})")
    else:
        print("GPU            none visible")
    table = moeyard.experts_backend_table()
    env = table["env_value"]
    print(f'experts backend "auto" picks ({table["env"]}: {env or "unset"}):')
    for dev in table["devices"]:
        where = dev["device"] + (f" (sm {dev['cc'] // 10}.{dev['cc'] % 10})" if dev["cc"] else "")
        print(f"  {where:<16} " + ", ".join(f"{dt} {b}" for dt, b in dev["auto"].items()))
    print("  from the rules (first match; none: moeyard):")
    for r in table["rules"]:
        cc = f"sm {r['min_cc'] / 10:.1f}-{r['max_cc'] / 10:.1f} " if r["device"] == "cuda" else ""
        print(f"    {r['device']} {cc}{r['dtype']} -> {r['backend']}: {r['evidence']}")


def example(device: str) -> None:
    torch.manual_seed(0)
    T, E, k, C = 8, 4, 2, 3
    logits = torch.randn(T, E, device=device)
    weights, experts = moeyard.route(logits, k, renormalize=True)
    p = moeyard.plan(experts, E, capacity=C)
    print(f"route + plan on {device}: T={T} tokens, E={E} experts, k={k}, capacity={C}")
    print("experts per token:\n", experts.cpu())
    print("weights per token:\n", weights.cpu())
    print("tokens per expert (before drops):", p.counts.tolist())
    print("kept rows per expert:", (p.offsets[1:] - p.offsets[:-1]).tolist())
    print("row of each (token, slot), -1 = dropped:\n", p.token_row.cpu())
    stats = moeyard.load_stats(p)
    print(f"MaxVio {stats['max_violation'].item():.3f}, "
          f"dropped {100 * stats['dropped_fraction'].item():.1f}% of assignments")
    # The experts: SwiGLU MLPs in Hugging Face v5's layout, one op for the MLP and the combine.
    d, I = 16, 32
    x = torch.randn(T, d, device=device, requires_grad=True)
    gate_up = (torch.randn(E, 2 * I, d, device=device) / d**0.5).requires_grad_()
    down = (torch.randn(E, d, I, device=device) / I**0.5).requires_grad_()
    out = moeyard.expert_ffn(x, p, weights, gate_up, down)
    out.pow(2).mean().backward()
    dropped = (p.token_row < 0).all(1)
    print(f"expert_ffn: out {tuple(out.shape)}, |out| {out.norm().item():.3f}; tokens with every "
          f"slot dropped get 0: {bool((out[dropped] == 0).all())}; grad norms x "
          f"{x.grad.norm().item():.3f}, gate_up {gate_up.grad.norm().item():.3f}, "
          f"down {down.grad.norm().item():.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeyard", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dm = sub.add_parser("demo", help="train a small MoE LM with each layer type, compare them",
                        description=demo.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(dm)
    sub.add_parser("info", help="versions, compiled kernels, visible GPU")
    ex = sub.add_parser("example", help="route a small batch and print its dispatch plan")
    ex.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        demo.from_args(args)
    elif args.cmd == "info":
        info()
    else:
        example(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
