"""The main job, ``python -m moeyard demo``: train a small MoE language model with each layer type
in turn, plus a dense baseline with the same active parameters, and compare them.

Pieces (the notebook uses them one by one):
  :func:`make_corpus`  a multi-domain synthetic character corpus generated at run time from a seed
                       (no downloads): three Markov "languages" with their own letters and
                       transition tables, additions, copies, reversals and sorted digit lists.
  :class:`TinyLM`      a pre-norm causal transformer LM whose MLP slot is built by
                       ``LAYER_TYPES[name].build(d, cfg)``.
  :func:`train`        AdamW for a fixed number of steps on the same batches for every layer type;
                       loss = cross-entropy + :func:`moeyard.collect_aux_losses`; the
                       :class:`moeyard.BiasBalancer` / :class:`moeyard.ReMoEController` step after
                       the optimizer; held-out loss at the end; tokens/s; load statistics.
  :func:`format_table`, :func:`plot_results`, :func:`main`.

Expert parallelism (``torchrun --nproc-per-node N -m moeyard demo --ep N``): every rank builds the
same model (same seed) with its MoE layers' experts split over the N ranks
(:mod:`moeyard.distributed`), trains on its own batches (the N ranks' batches together are the
single-process run's batches of N x ``batch_size``), and after each backward gets the gradients of
single-process training on that global batch (:func:`moeyard.distributed.sync_gradients`, then
clipping by the global norm). Losses and statistics are averaged over the ranks, loads summed; rank
0 prints the table, a table of the rows each rank's experts computed, and writes the files. SMEAR
merges the experts' weights instead of routing tokens, so it cannot be expert-parallel: skipped.

Timing is honest: tokens/s counts the training steps after the first (warm-up) one; on CUDA the
clock is read after a synchronize at both ends only. Nothing else in the loop reads a device value
except the progress bar, which reads the loss once every ``log_every`` steps (one host sync per
``log_every`` steps on CUDA). Load statistics stay on the device until the run ends: the loads
per step come from a :class:`moeyard.RoutingRecorder` of the training forwards, the routing
fluctuation (StableMoE's) from another that records a fixed held-out probe batch at every 10% of
the run (see :func:`format_table`).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import layers
from .balance import BiasBalancer, ReMoEController, collect_aux_losses
from .experts import Experts, MergedExperts, SwiGLUMLP
from .routers import TopKRouter
from .telemetry import RoutingRecorder, routing_fluctuation

__all__ = ["DemoConfig", "LayerType", "LAYER_TYPES", "DEFAULT_LAYERS", "VOCAB", "DOMAINS",
           "Corpus", "make_corpus", "encode", "decode", "TinyLM", "active_parameters",
           "total_parameters", "train", "format_table", "format_rank_rows", "plot_results",
           "SetupError", "run", "main"]


# ----------------------------------------------------------------------------------- config


@dataclass
class DemoConfig:
    """Sizes and training settings of one demo run (every layer type uses the same)."""

    d_model: int = 64
    blocks: int = 2
    heads: int = 4
    experts: int = 8
    k: int = 2
    expert_size: int = 64       # I of one routed expert; the dense baseline's width is k * I
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    seed: int = 0
    corpus_chars: int = 1 << 18
    eval_batches: int = 8
    bias_rate: float = 1e-2     # BiasBalancer rate (DeepSeek-V3 uses 1e-3 over far more steps)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1            # CPU threads for training (see _THREADS_NOTE); 0 = torch's default
    ep: int = 1                 # expert-parallel ranks (> 1: one process per rank, from torchrun)


# ------------------------------------------------------------------------------ layer types


class LayerType(NamedTuple):
    """How to build a block's MLP slot: ``build(d, cfg) -> nn.Module`` (``[B, S, d] -> same``);
    with expert parallelism ``build(d, cfg, ep_group)``, whose MoE layer holds only this rank's
    experts. ``causal=False`` marks routings where a token's experts depend on other tokens of the
    batch, later ones included (the table flags them: their LM losses see the future through
    routing). ``expert_parallel=False``: the layer cannot be built with an ``ep_group``.
    ``default=False``: opt-in, run only when named (``--layers``), not in :data:`DEFAULT_LAYERS`."""

    build: Callable[..., nn.Module]
    causal: bool = True
    note: str = ""
    expert_parallel: bool = True
    default: bool = True


def _deepseek_groups(c: DemoConfig) -> dict:
    """DeepSeek-V3's group limit scaled to the demo: the best half of 4 groups when 4 divides E
    and the kept groups hold k experts, else no groups."""
    if c.experts % 4 == 0 and c.k <= c.experts // 2:
        return {"n_group": 4, "topk_group": 2}
    return {"n_group": 1, "topk_group": 1}


# Every MoE type computes k experts of width I per token (on average for ReMoE and expert choice),
# the dense baseline one SwiGLU MLP of width k * I: the same active parameters up to the router.
# ``g``: the expert-parallel group or None (the dense MLP is replicated like every other weight).
LAYER_TYPES: dict[str, LayerType] = {
    "dense": LayerType(lambda d, c, g=None: SwiGLUMLP(d, c.k * c.expert_size),
                       note="SwiGLU MLP of width k*I"),
    "switch": LayerType(lambda d, c, g=None: layers.SwitchMoE(d, c.k * c.expert_size, c.experts,
                                                              activation="swiglu", ep_group=g),
                        note="top-1 of E experts of width k*I (SwiGLU), capacity 1.25"),
    "topk": LayerType(lambda d, c, g=None: layers.TopKMoE.mixtral(d, c.expert_size, c.experts,
                                                                  c.k, ep_group=g),
                      note="Mixtral routing: softmax top-k renormalized, aux loss 1e-3"),
    "topk-bias": LayerType(lambda d, c, g=None: layers.TopKMoE(d, c.expert_size, c.experts, c.k,
                                                               score="sigmoid", renormalize=True,
                                                               bias_balancing=True,
                                                               aux_loss_coef=0.0, ep_group=g),
                           note="sigmoid top-k, aux-loss-free bias balancing (BiasBalancer)"),
    "remoe": LayerType(lambda d, c, g=None: layers.ReMoE(d, c.expert_size, c.experts, c.k,
                                                         ep_group=g),
                       note="ReLU routing, L1 target sparsity 1 - k/E (ReMoEController)"),
    "expert-choice": LayerType(lambda d, c, g=None: layers.ExpertChoiceMoE(
                                   d, c.expert_size, c.experts, capacity_factor=c.k, ep_group=g),
                               causal=False, note="each expert takes its top k*T/E tokens"),
    "base": LayerType(lambda d, c, g=None: layers.BaseMoE(d, c.k * c.expert_size, c.experts,
                                                          activation="swiglu", ep_group=g),
                      causal=False, note="BASE: balanced assignment in training (whole batch), "
                                         "argmax in eval; experts of width k*I"),
    "smear": LayerType(lambda d, c: layers.SmearMoE(d, c.k * c.expert_size, c.experts),
                       causal=False, note="SMEAR: experts merged per sequence (routed on its "
                                          "mean); one merged MLP of width k*I",
                       expert_parallel=False),
    "deepseek": LayerType(lambda d, c, g=None: layers.TopKMoE.deepseek_v3(
                              d, c.expert_size, c.experts, c.k, n_shared_experts=0,
                              **_deepseek_groups(c), ep_group=g),
                          note="DeepSeek-V3 routing: sigmoid, bias balancing, group-limited, "
                               "sequence-wise balance loss 1e-4", default=False),
    "topp": LayerType(lambda d, c, g=None: layers.TopPMoE(d, c.expert_size, c.experts,
                                                          ep_group=g),
                      note="dynamic top-p (p=0.4): experts by probability until their mass "
                           "passes p, entropy loss; active params count all E (mean experts "
                           "per token: experts_per_token)", default=False),
    "topk-erc": LayerType(lambda d, c: layers.TopKMoE.mixtral(d, c.expert_size, c.experts, c.k,
                                                              erc_loss_coef=1.0),
                          note="topk plus the expert-router coupling loss (coefficient 1, "
                               "alpha 1)", expert_parallel=False, default=False),
    "grin": LayerType(lambda d, c, g=None: layers.TopKMoE.phimoe(
                          d, max(1, c.k * c.expert_size // 2), c.experts, ep_group=g),
                      note="GRIN / PhiMoE: SparseMixer-v2 top-2, sampled in training; experts of "
                           "width k*I/2", default=False),
}
DEFAULT_LAYERS = tuple(name for name, t in LAYER_TYPES.items() if t.default)


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that report routing statistics (``last_stats``), in model order."""
    return [m for m in model.modules() if hasattr(m, "last_stats")]


def _summed_loads(recorder: RoutingRecorder) -> list[Optional[Tensor]]:
    """Per layer the recorder saw, in model order, its tokens per expert summed over the recorded
    forwards (fp64, on the device), or None for a layer without a plan (SMEAR)."""
    return [recorder.load(name).double().sum(0) if recorder[name][0].counts is not None
            else None for name in recorder.layers]


def _controllers(model: nn.Module, cfg: DemoConfig) -> list:
    """The after-optimizer-step controllers the model's layers need."""
    out = []
    if any(isinstance(m, TopKRouter) and m.e_score_correction_bias is not None
           for m in model.modules()):
        out.append(BiasBalancer(model, rate=cfg.bias_rate))
    if any(isinstance(m, layers.ReMoE) for m in model.modules()):
        out.append(ReMoEController(model))
    return out


def _expert_shards(experts: nn.Module) -> int:
    """How many ranks share ``experts``: the expert-parallel group's size, 1 when not sharded."""
    ep = getattr(experts, "ep", None)
    return 1 if ep is None else ep.size


def total_parameters(model: nn.Module) -> int:
    """The model's parameters; with expert parallelism every rank's experts count (this rank
    holds ``1 / P`` of them)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Experts):
            total += (_expert_shards(m) - 1) * sum(p.numel() for p in m.parameters(recurse=False))
    return total


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: all of them (:func:`total_parameters`), except that of the E
    routed experts of each MoE layer only ``k`` count (the target k for ReMoE, the capacity factor
    for expert choice, the bound ``k_max`` for top-p)."""
    active = float(total_parameters(model))
    for m in model.modules():
        experts = getattr(m, "experts", None)
        if isinstance(experts, (Experts, MergedExperts)):
            k = getattr(m, "k", getattr(m, "k_max", getattr(m, "capacity_factor", 1)))
            shards = _expert_shards(experts)
            n = shards * sum(p.numel() for p in experts.parameters())
            E = shards * experts.num_experts
            active -= n * (1 - min(k, E) / E)
    return int(round(active))


# ----------------------------------------------------------------------------------- corpus

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = "\n .,;+=<|" + "0123456789" + LETTERS
_STOI = {c: i for i, c in enumerate(VOCAB)}
DOMAINS = ("lang-a", "lang-b", "lang-c", "arithmetic", "copy", "reverse", "sorted")


def encode(text: str) -> Tensor:
    """Characters -> int64 ids in :data:`VOCAB`."""
    return torch.tensor([_STOI[c] for c in text], dtype=torch.int64)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


class _Language:
    """An order-2 Markov 'language' on its own 10 letters: each pair of letters has 3 possible
    successors with random weights; words of 2+ letters, sentences of 3-9 words ending in '.'."""

    def __init__(self, rng: random.Random):
        self.letters = rng.sample(LETTERS, 10)
        self.next = {}
        for context in [a + b for a in self.letters for b in self.letters] + self.letters:
            succ = rng.sample(self.letters, 3)
            w = [rng.random() + 0.1 for _ in succ]
            self.next[context] = (succ, [sum(w[:i + 1]) / sum(w) for i in range(3)])

    def document(self, rng: random.Random) -> str:
        sentences = []
        for _ in range(rng.randint(1, 3)):
            words = []
            for _ in range(rng.randint(3, 9)):
                word = rng.choice(self.letters)
                while len(word) < 2 or rng.random() > 0.25:
                    succ, cum = self.next[word[-2:]]
                    word += succ[min(bisect.bisect(cum, rng.random()), 2)]
                words.append(word)
            sentences.append(" ".join(words) + ".")
        return " ".join(sentences)


def _letters(rng: random.Random) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(3, 8)))


def _document(domain: str, rng: random.Random, languages: dict) -> str:
    if domain in languages:
        return languages[domain].document(rng)
    n = rng.randint(3, 6)
    if domain == "arithmetic":
        items = []
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            items.append(f"{a}+{b}={a + b};")
        return "".join(items)
    if domain == "copy":
        return "".join(f"{s}|{s};" for s in (_letters(rng) for _ in range(n)))
    if domain == "reverse":
        return "".join(f"{s}<{s[::-1]};" for s in (_letters(rng) for _ in range(n)))
    if domain == "sorted":
        return "".join(",".join(sorted(rng.choices("0123456789", k=rng.randint(3, 10)))) + ";"
                       for _ in range(n))
    raise ValueError(f"unknown domain {domain!r}; domains: {DOMAINS}")


def _stream(rng: random.Random, n_chars: int, domains, languages) -> str:
    docs, total = [], 0
    while total < n_chars:
        doc = _document(rng.choice(domains), rng, languages) + "\n"
        docs.append(doc)
        total += len(doc)
    return "".join(docs)[:n_chars]


class Corpus(NamedTuple):
    """``train`` and ``heldout`` int64 id streams (documents of every domain, shuffled, one per
    line), and ``heldout_by_domain``: a held-out stream of each domain alone."""

    train: Tensor
    heldout: Tensor
    heldout_by_domain: dict


def make_corpus(n_chars: int = 1 << 18, seed: int = 0, heldout_fraction: float = 0.1) -> Corpus:
    """Generate the corpus (deterministic in ``seed``). The languages' letters and transition
    tables come from ``seed``; the train and held-out documents are drawn independently."""
    languages = {name: _Language(random.Random(f"{seed}-{name}")) for name in DOMAINS[:3]}
    n_held = max(int(n_chars * heldout_fraction), 1024)
    train = _stream(random.Random(f"{seed}-train"), n_chars, DOMAINS, languages)
    heldout = _stream(random.Random(f"{seed}-heldout"), n_held, DOMAINS, languages)
    by_domain = {d: encode(_stream(random.Random(f"{seed}-heldout-{d}"), max(n_held // 8, 1024),
                                   (d,), languages))
                 for d in DOMAINS}
    return Corpus(encode(train), encode(heldout), by_domain)


def _windows(stream: Tensor, starts: Tensor, length: int) -> Tensor:
    """``[B, length]`` windows of ``stream`` starting at ``starts [B]``."""
    return stream[starts[:, None] + torch.arange(length, device=stream.device)]


def _starts(stream: Tensor, shape, length: int, generator: torch.Generator) -> Tensor:
    hi = stream.numel() - length
    if hi < 1:
        raise ValueError(f"corpus of {stream.numel()} tokens is too short for windows of {length}")
    return torch.randint(0, hi, shape, generator=generator)


# ------------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d: int, heads: int, mlp: nn.Module):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} must be divisible by heads={heads}")
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(B, S, d))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """Causal character LM: token + learned position embeddings, ``cfg.blocks`` blocks whose MLP
    is ``LAYER_TYPES[layer_type].build(d, cfg)``, final RMSNorm, head tied to the embedding.
    ``forward(ids [B, S]) -> logits [B, S, V]``. With ``ep_group`` the MoE layers hold only this
    rank's experts (build the model with the same seed on every rank of the group)."""

    def __init__(self, cfg: DemoConfig, layer_type: str, vocab_size: int = len(VOCAB),
                 ep_group=None):
        super().__init__()
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {layer_type!r}; known: {list(LAYER_TYPES)}")
        lt = LAYER_TYPES[layer_type]
        if ep_group is not None and not lt.expert_parallel:
            raise ValueError(f"layer type {layer_type!r} cannot be expert-parallel")
        build = lt.build if ep_group is None else lambda d, c: lt.build(d, c, ep_group)
        d = cfg.d_model
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(cfg.seq_len, d)
        for emb in (self.embed, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, build(d, cfg)) for _ in range(cfg.blocks))
        self.norm = nn.RMSNorm(d)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos.weight[:ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)


def _lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


# --------------------------------------------------------------------------------- training


class _Progress:
    """A tqdm bar when stderr is a terminal, else a plain line at every quarter of the run."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.bar = total, desc, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            tqdm = _require("tqdm").tqdm
            self.bar = tqdm(total=total, desc=f"{desc:>14}", leave=True, dynamic_ncols=True)
        self.done = self.quarters_printed = 0

    def update(self, n: int, loss: Optional[float] = None) -> None:
        """Advance by ``n`` steps; ``loss`` (when given) is shown."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif self.enabled and loss is not None:
            quarters = 4 * self.done // self.total
            if quarters > self.quarters_printed:
                self.quarters_printed = quarters
                print(f"  {self.desc}: step {self.done}/{self.total} loss {loss:.3f}",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Ranks:
    """The processes a run trains on and the few collectives its loop needs: one process
    (``group=None``; every method is then what the single-process demo always did), or the ranks
    of the expert-parallel group ``group``, which is also the data-parallel group: each rank trains
    on its own batches and holds ``1 / size`` of every MoE layer's experts."""

    def __init__(self, group=None):
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.main = self.rank == 0  # the rank that prints and writes files

    def starts(self, stream: Tensor, batches: int, cfg: DemoConfig,
               generator: torch.Generator) -> Tensor:
        """This rank's ``[batches, batch_size]`` window starts: its block of columns of one
        ``[batches, size * batch_size]`` draw that every rank makes alike, so the ranks' batches
        together are the single-process run's batches of ``size * batch_size`` windows."""
        B = cfg.batch_size
        every = _starts(stream, (batches, self.size * B), cfg.seq_len + 1, generator)
        return every[:, self.rank * B:(self.rank + 1) * B]

    def mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the ranks."""
        return self.sum(t) / self.size if self.size > 1 else t

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks."""
        if self.size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def max(self, x: float, device: torch.device) -> float:
        """The largest ``x`` of the ranks."""
        if self.size == 1:
            return x
        t = torch.tensor(x, dtype=torch.float64, device=device)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=self.group)
        return t.item()

    def sync_and_clip(self, model: nn.Module, max_norm: float) -> None:
        """After backward: the gradients of single-process training on the global batch
        (:func:`moeyard.distributed.sync_gradients`), clipped to ``max_norm`` by their norm over
        every rank's experts (:func:`moeyard.distributed.clip_grad_norm_`)."""
        if self.size == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return
        from .distributed import clip_grad_norm_, sync_gradients
        sync_gradients(model, self.group)
        clip_grad_norm_(model, max_norm)

    def watch_rows(self, model: nn.Module) -> list[Tensor]:
        """With expert parallelism, per sharded experts module an ``[E]`` counter that its
        training forwards add this rank's kept rows per global expert to (assignments after
        capacity drops: the rows the owning rank computes for this rank). Empty otherwise."""
        if self.size == 1:
            return []
        from .distributed import ShardedExperts

        def count(module, args, output):
            if module.training:
                offsets = args[1].offsets  # forward(x, plan, weights)
                module.demo_rows.add_(offsets[1:] - offsets[:-1])

        counters = []
        for m in model.modules():
            if isinstance(m, ShardedExperts):
                m.demo_rows = torch.zeros(m.ep.num_experts, dtype=torch.int64,
                                          device=m.gate_up_proj.device)
                m.register_forward_hook(count)
                counters.append(m.demo_rows)
        return counters

    def rows_per_rank(self, counters: list[Tensor]) -> Optional[list[int]]:
        """The rows each rank's experts computed, summed over the layers and every source rank
        (collective), from :meth:`watch_rows`' counters; None without expert parallelism."""
        if not counters:
            return None
        every = self.sum(torch.stack(counters))  # [layers, E]: rows per global expert
        return every.view(len(counters), self.size, -1).sum((0, 2)).tolist()


class _FluctuationProbe:
    """Routing fluctuation as StableMoE measures it (Dai et al. 2022, "fewer routing
    fluctuations"): the same held-out tokens are routed at consecutive checkpoints of the
    training, and the fraction whose target expert changed from one checkpoint to the next is
    the fluctuation of that interval.

    Here the checkpoints are the ends of every ``1 / checkpoints`` of the run; at each one the
    model routes the fixed probe ``batch`` (eval mode, no grad: no RNG drawn, the training is
    unchanged) and a recorder keeps each layer's routing. The target expert of a token is its
    chosen expert of largest weight (:meth:`moeyard.RoutingRecord.top1`); SMEAR's, of an
    example. Nothing is read on the host until :meth:`curve`."""

    def __init__(self, model: nn.Module, batch: Tensor, steps: int, checkpoints: int = 10):
        self.model, self.batch = model, batch
        self.at = sorted({max(1, round(i * steps / checkpoints))
                          for i in range(1, checkpoints + 1)})
        self.recorder = RoutingRecorder(model, fields=("experts", "weights", "probs"))

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """Route the probe batch if ``steps_done`` training steps end a checkpoint interval."""
        if steps_done in self.at:
            self.model.eval()
            with self.recorder:
                self.model(self.batch)
            self.model.train()

    def curve(self) -> Optional[Tensor]:
        """``[checkpoints - 1]``: each interval's fluctuation, averaged over the layers (device
        tensor); None for a model without routing."""
        rec = self.recorder
        if not rec.layers:
            return None
        per_layer = [torch.stack([routing_fluctuation(a, b) for a, b in zip(rec[n], rec[n][1:])])
                     for n in rec.layers]
        return torch.stack(per_layer).mean(0)


@torch.no_grad()
def evaluate(model: nn.Module, stream: Tensor, cfg: DemoConfig, batches: int,
             generator: torch.Generator, ranks: Optional[_Ranks] = None) -> tuple[float, list]:
    """Mean LM loss of ``model`` (eval mode) over ``batches`` random windows of ``stream``, and
    each MoE layer's tokens per expert summed over them (lists, one per layer). ``ranks``: of
    every rank's windows (collective)."""
    ranks = ranks or _Ranks()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = stream.to(device)
    starts = ranks.starts(stream, batches, cfg, generator).to(device)
    total = torch.zeros((), device=device)
    with RoutingRecorder(model, fields=("counts",)) as recorder:
        for b in range(batches):
            total += _lm_loss(model, _windows(stream, starts[b], cfg.seq_len + 1))
    model.train(was_training)
    loads = [None if x is None else ranks.sum(x).tolist() for x in _summed_loads(recorder)]
    return ranks.mean(total / batches).item(), loads


def train(layer_type: str, cfg: DemoConfig, corpus: Corpus, progress: bool = True,
          log_every: Optional[int] = None, ep_group=None,
          model: Optional[nn.Module] = None) -> dict:
    """Train a fresh :class:`TinyLM` with ``layer_type`` MLPs for ``cfg.steps`` steps. Every layer
    type sees the same initial embeddings/attention (``cfg.seed``) and the same batches. Runs
    with ``cfg.threads`` CPU threads (0: torch's default), restored afterwards.

    ``model``: train this model (a ``TinyLM(cfg, layer_type)``, moved to ``cfg.device`` and
    ``cfg.dtype``) in place instead of a fresh one, to look at it afterwards.

    ``ep_group``: expert parallelism over this process group (collective: every rank calls it
    with the same arguments); each rank trains on its own ``cfg.batch_size`` windows, the
    returned numbers are of all ranks (losses and statistics averaged, loads summed, tokens/s of
    all ranks together), plus ``rank_rows``: the rows each rank's experts computed in training.

    Returns a JSON-ready dict: ``active_params``, ``total_params``, ``initial_loss`` (step 0),
    ``final_train_loss``, ``heldout_loss``, ``tokens_per_s``, ``max_violation``,
    ``dropped_fraction``, ``sparsity``, ``experts_per_token`` (None where the layers do not
    report them), ``loss_curve``
    (LM loss per step), ``expert_load`` (tokens per expert summed over the run, per MoE layer),
    ``heldout_expert_load``, ``heldout_by_domain`` (loss and last block's load per domain),
    ``routing_fluctuation`` (StableMoE's, see :func:`format_table`) and ``fluctuation_curve``
    (``[checkpoint step, fluctuation since the previous checkpoint]`` pairs).

    The loads and MaxVio come from a :class:`moeyard.RoutingRecorder` of the training forwards,
    the fluctuation from one of a fixed held-out probe batch routed (eval mode) at every 10% of
    the run; the probe's ten forwards are inside the timed loop (well under 1% of its work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or before)
    try:
        return _train(layer_type, cfg, corpus, progress, log_every, _Ranks(ep_group), model)
    finally:
        torch.set_num_threads(before)


def _train(layer_type, cfg, corpus, progress, log_every, ranks: _Ranks, model) -> dict:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = TinyLM(cfg, layer_type, ep_group=ranks.group)
    model = model.to(device=device, dtype=dtype)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    controllers = _controllers(model, cfg)
    moe_layers = _moe_layers(model)
    row_counters = ranks.watch_rows(model)

    g = torch.Generator().manual_seed(cfg.seed)
    stream = corpus.train.to(device)
    starts = ranks.starts(stream, cfg.steps, cfg, g).to(device)
    eval_generator = torch.Generator().manual_seed(cfg.seed + 1)
    heldout_stream = corpus.heldout.to(device)
    probe_starts = ranks.starts(heldout_stream, 1, cfg, torch.Generator().manual_seed(
        cfg.seed + 2))[0].to(device)
    probe = _FluctuationProbe(model, _windows(heldout_stream, probe_starts, cfg.seq_len),
                              cfg.steps)

    # Per-step histories stay on the device (the loads in the recorder); read once at the end.
    routing = RoutingRecorder(model, fields=("counts",))
    losses = torch.zeros(cfg.steps, device=device)
    names = ("dropped_fraction", "sparsity", "experts_per_token")
    stats = {n: torch.full((cfg.steps,), float("nan"), device=device) for n in names}

    log_every = log_every or max(1, cfg.steps // 100)
    bar = _Progress(cfg.steps, layer_type, progress and ranks.main)
    model.train()
    t0 = None
    for step in range(cfg.steps):
        if step == 1:  # the first step is warm-up (allocations, kernel selection): not timed
            _sync(device)
            t0 = time.perf_counter()
        with routing:
            lm = _lm_loss(model, _windows(stream, starts[step], cfg.seq_len + 1))
        loss = lm + collect_aux_losses(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ranks.sync_and_clip(model, 1.0)
        opt.step()
        sched.step()
        for c in controllers:
            c.step()
        with torch.no_grad():
            losses[step] = lm.detach()
            for n in names:
                vals = [m.last_stats[n] for m in moe_layers if n in m.last_stats]
                if vals:
                    stats[n][step] = torch.stack(vals).float().mean()
        probe.after_step(step + 1)
        shown = (step + 1) % log_every == 0 or step + 1 == cfg.steps
        bar.update(1, losses[step].item() if shown else None)  # the loop's only host read
    _sync(device)
    elapsed = ranks.max(time.perf_counter() - t0 if t0 is not None else float("nan"), device)
    bar.close()
    timed_tokens = (cfg.steps - 1) * ranks.size * cfg.batch_size * cfg.seq_len
    routed = [n for n in routing.layers if routing[n][0].counts is not None]
    stats["max_violation"] = (torch.stack([routing.max_violation(n) for n in routed]).mean(0)
                              if routed else torch.full((cfg.steps,), float("nan"),
                                                        device=device))
    losses, stats = ranks.mean(losses), {n: ranks.mean(v) for n, v in stats.items()}
    load = [None if x is None else ranks.sum(x) for x in _summed_loads(routing)]
    fluctuation = probe.curve()
    fluctuation = None if fluctuation is None else ranks.mean(fluctuation).cpu().tolist()
    late = [f for step, f in zip(probe.at[1:], fluctuation or []) if step > cfg.steps / 2]

    heldout, heldout_load = evaluate(model, corpus.heldout, cfg, cfg.eval_batches, eval_generator,
                                     ranks)
    by_domain = {}
    for d, s in corpus.heldout_by_domain.items():
        d_loss, d_load = evaluate(model, s, cfg, 1, eval_generator, ranks)
        by_domain[d] = {"loss": d_loss, "load_last_block": d_load[-1] if d_load else None}

    curve = losses.cpu().tolist()
    tail = max(1, cfg.steps // 10)  # the end-of-run numbers: means over the last 10% of steps

    def tail_mean(x: Tensor) -> Optional[float]:
        v = x[-tail:].cpu()
        return None if torch.isnan(v).all() else float(v[~torch.isnan(v)].mean())

    return {
        "layer_type": layer_type,
        "causal": LAYER_TYPES[layer_type].causal,
        "note": LAYER_TYPES[layer_type].note,
        "active_params": active_parameters(model),
        "total_params": total_parameters(model),
        "initial_loss": curve[0],
        "final_train_loss": float(sum(curve[-tail:]) / len(curve[-tail:])),
        "heldout_loss": heldout,
        "tokens_per_s": timed_tokens / elapsed if elapsed > 0 else float("nan"),
        "train_seconds": elapsed,
        "max_violation": tail_mean(stats["max_violation"]),
        "dropped_fraction": tail_mean(stats["dropped_fraction"]),
        "sparsity": tail_mean(stats["sparsity"]),
        "experts_per_token": tail_mean(stats["experts_per_token"]),
        "routing_fluctuation": sum(late) / len(late) if late else None,
        "fluctuation_curve": [list(x) for x in zip(probe.at[1:], fluctuation or [])],
        "target_sparsity": next((m.target_sparsity for m in model.modules()
                                 if isinstance(m, layers.ReMoE)), None),
        "loss_curve": curve,
        "expert_load": [None if x is None else x.tolist() for x in load],
        "heldout_expert_load": heldout_load,
        "heldout_by_domain": by_domain,
        "rank_rows": ranks.rows_per_rank(row_counters),
    }


# ---------------------------------------------------------------------------------- results


def _fmt(x: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, spec)


def _columns(head, rows, left=(0,)) -> list[str]:
    """``head`` and ``rows`` as aligned text lines (columns ``left`` left-aligned, the others
    right-aligned), a rule under the head."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i in left else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_table(results: list[dict]) -> str:
    """One row per layer type: parameters, losses, speed and routing statistics."""
    head = ("layer type", "active", "total", "train loss", "held-out", "tokens/s", "MaxVio",
            "fluct. %", "dropped %", "sparsity")
    rows = []
    for r in results:
        sparsity = _fmt(r["sparsity"], ".3f")
        if r["target_sparsity"] is not None:
            sparsity += f" (target {r['target_sparsity']:.2f})"
        rows.append((r["layer_type"] + ("" if r["causal"] else " *"),
                     f"{r['active_params']:,}", f"{r['total_params']:,}",
                     f"{r['final_train_loss']:.4f}", f"{r['heldout_loss']:.4f}",
                     f"{r['tokens_per_s']:,.0f}", _fmt(r["max_violation"], ".3f"),
                     _fmt(r.get("routing_fluctuation"), ".1f", 100),
                     _fmt(r["dropped_fraction"], ".2f", 100), sparsity))
    out = _columns(head, rows, left=(0, 9))
    out.append("train loss, MaxVio, dropped %, sparsity: means over the last 10% of steps "
               "(MaxVio averaged over layers); held-out: eval mode.")
    out.append("fluct. %: routing fluctuation as in StableMoE (Dai et al. 2022): the share of a "
               "fixed held-out probe batch's tokens whose top-1 expert changed between "
               "consecutive checkpoints, one every 10% of training (eval mode), averaged over "
               "the intervals of the second half and over the blocks (SMEAR: of its examples).")
    if any(not r["causal"] for r in results):
        out.append("* not causal: a token's experts depend on later tokens of the batch, so its "
                   "LM losses are not comparable with the others'.")
    return "\n".join(out)


def format_rank_rows(results: list[dict]) -> str:
    """Expert parallelism: per layer type with sharded experts, the rows each rank's experts
    computed in training (``rank_rows``) and the busiest rank's rows over the mean. "" when no
    result has them (a single-process run)."""
    sharded = [r for r in results if r.get("rank_rows")]
    if not sharded:
        return ""
    P = len(sharded[0]["rank_rows"])
    rows = []
    for r in sharded:
        n = r["rank_rows"]
        total = max(sum(n), 1)
        rows.append((r["layer_type"], *(f"{x:,} ({100 * x / total:.1f}%)" for x in n),
                     f"{max(n) * P / total:.3f}"))
    out = _columns(("layer type", *(f"rank {i}" for i in range(P)), "max/mean"), rows)
    out.append("rows each rank's experts computed in training, summed over the blocks (kept "
               "assignments, after capacity drops); max/mean 1 = balanced ranks.")
    out.append(f"Expert-parallel run over {P} ranks: losses, MaxVio, dropped % and sparsity are "
               "averaged over the ranks (MaxVio and drops of each rank's own batch), tokens/s "
               "counts every rank's tokens, BASE balances each rank's batch.")
    return "\n".join(out)


def plot_results(results: list[dict], path, cfg: Optional[DemoConfig] = None) -> Path:
    """Save a PNG: the training loss curves of every layer type, and per MoE layer type the share
    of assignments each expert got over the run (one bar per block) and, for the last block, on
    each domain's held-out text. Returns the path."""
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [r for r in results if any(x is not None for x in r["expert_load"])]
    cols = max(len(moe), 1)
    fig = plt.figure(figsize=(max(10.0, 3.6 * cols), 11 if moe else 4.5))
    grid = fig.add_gridspec(3 if moe else 1, cols, height_ratios=[1.2, 1, 1.2] if moe else [1])
    ax = fig.add_subplot(grid[0, :])
    for r in results:
        curve = torch.tensor(r["loss_curve"])
        w = max(1, len(curve) // 30)  # moving average over ~3% of the run
        smooth = curve.unfold(0, w, 1).mean(1) if len(curve) >= w else curve
        ax.plot(range(w - 1, w - 1 + len(smooth)), smooth.tolist(),
                label=f"{r['layer_type']} (held-out {r['heldout_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss (moving average)")
    title = "moeyard demo"
    if cfg is not None:
        title += (f": {cfg.blocks} blocks, d={cfg.d_model}, {cfg.experts} experts, k={cfg.k}, "
                  f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens")
        if cfg.ep > 1:
            title += f" per rank, {cfg.ep} expert-parallel ranks"
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    for j, r in enumerate(moe):
        loads = [x for x in r["expert_load"] if x is not None]
        E = len(loads[0])
        bar_ax = fig.add_subplot(grid[1, j])
        width = 0.8 / len(loads)
        for b, x in enumerate(loads):
            share = torch.tensor(x) / max(sum(x), 1)
            bar_ax.bar([e + (b - (len(loads) - 1) / 2) * width for e in range(E)],
                       share.tolist(), width, label=f"block {b}")
        bar_ax.axhline(1 / E, color="k", ls="--", lw=0.8)
        bar_ax.set_title(f"{r['layer_type']}: load over the run")
        bar_ax.set_xlabel("expert")
        bar_ax.set_xticks(range(E))
        if j == 0:
            bar_ax.set_ylabel("share of assignments (dashed: 1/E)")
        bar_ax.legend(fontsize=7)
        heat_ax = fig.add_subplot(grid[2, j])
        domains = [d for d, v in r["heldout_by_domain"].items()
                   if v["load_last_block"] is not None]
        m = torch.tensor([r["heldout_by_domain"][d]["load_last_block"] for d in domains])
        m = m / m.sum(1, keepdim=True).clamp(min=1)
        heat_ax.imshow(m.numpy(), cmap="viridis", aspect="auto", vmin=0)
        heat_ax.set_yticks(range(len(domains)))
        heat_ax.set_yticklabels(domains if j == 0 else [""] * len(domains))
        heat_ax.set_xticks(range(E))
        heat_ax.set_xlabel("expert")
        heat_ax.set_title("last block, held-out by domain", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# Why the demo trains on one CPU thread unless told otherwise.
_THREADS_NOTE = ("the default model is small, and torch's multi-threaded CPU kernels slow down "
                 "badly when other jobs share the cores (every parallel region waits for a "
                 "descheduled thread): on a 2-core machine with other jobs running, 2 threads "
                 "trained far slower than 1")


def _require(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise ImportError(f"the moeyard demo needs {name}: pip install tqdm matplotlib "
                          "(or pip install 'moeyard[demo]')") from e


class SetupError(RuntimeError):
    """An expert-parallel run cannot start (not under torchrun, wrong world size, ...)."""


@contextlib.contextmanager
def _expert_parallel(cfg: DemoConfig):
    """``(cfg, group)`` for one run: ``(cfg, None)`` when ``cfg.ep == 1``. Else the default process
    group of ``cfg.ep`` ranks: joined when it exists (a test harness), otherwise created from
    torchrun's environment and destroyed at the end, gloo on the CPU and NCCL on CUDA with each
    rank on ``cuda:LOCAL_RANK`` (the yielded cfg's device)."""
    if cfg.ep == 1:
        yield cfg, None
        return
    if cfg.ep < 1 or cfg.experts % cfg.ep:
        raise SetupError(f"--ep {cfg.ep} must be a positive divisor of --experts {cfg.experts}")
    cuda = torch.device(cfg.device).type == "cuda"
    created = not dist.is_initialized()
    if created:
        if "LOCAL_RANK" not in os.environ:  # torchrun sets it (and RANK, WORLD_SIZE, MASTER_*)
            raise SetupError(f"--ep {cfg.ep} runs one process per rank: start it with torchrun "
                             f"--nproc-per-node {cfg.ep} -m moeyard demo --ep {cfg.ep} ...")
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = dist.get_world_size()
    if world != cfg.ep:
        raise SetupError(f"--ep {cfg.ep} needs {cfg.ep} processes, this run has {world} "
                         f"(torchrun --nproc-per-node {cfg.ep})")
    if created:
        if cuda:
            local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
            if local >= visible:
                raise SetupError(f"rank {local} needs cuda:{local} but {visible} GPU(s) are "
                                 "visible (NCCL takes one GPU per rank; --device cpu trains on "
                                 "gloo)")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if cuda and created:
            cfg = replace(cfg, device=f"cuda:{torch.cuda.current_device()}")
        yield cfg, dist.group.WORLD
    finally:
        if created:
            dist.destroy_process_group()


def run(cfg: DemoConfig, layer_types=DEFAULT_LAYERS, out="moeyard-demo", progress=True,
        corpus: Optional[Corpus] = None) -> dict:
    """Train every layer type, print the table, write ``results.json`` and ``demo.png`` under
    ``out``; returns the results (``{"config", "results": [per layer type], "table", ...}``).

    ``cfg.ep > 1``: expert-parallel (see the module docstring); every rank of the ``cfg.ep``
    processes torchrun started calls it, layer types that cannot be expert-parallel are skipped,
    rank 0 prints, also prints ``rank_table`` (:func:`format_rank_rows`) and writes the files."""
    unknown = [t for t in layer_types if t not in LAYER_TYPES]
    if unknown:
        raise ValueError(f"unknown layer type(s) {unknown}; known: {list(LAYER_TYPES)}")
    _require("matplotlib")  # fail now rather than after the training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _expert_parallel(cfg) as (cfg, group):
        main = _Ranks(group).main
        say = print if main else lambda *args, **kwargs: None
        corpus = corpus if corpus is not None else make_corpus(cfg.corpus_chars, cfg.seed)
        threads = cfg.threads or torch.get_num_threads()
        say(f"moeyard demo on {cfg.device} ({cfg.dtype}, {threads} CPU thread"
            f"{'s' if threads > 1 else ''}): {cfg.blocks} blocks, d={cfg.d_model}, "
            f"{cfg.experts} experts of width {cfg.expert_size}, k={cfg.k}; {cfg.steps} steps of "
            f"{cfg.batch_size}x{cfg.seq_len} tokens; corpus {corpus.train.numel():,} characters "
            f"({', '.join(DOMAINS)})", flush=True)
        if group is not None:
            say(f"expert-parallel over {cfg.ep} ranks ({dist.get_backend(group)}): each MoE layer "
                f"holds {cfg.experts // cfg.ep} experts per rank, each rank trains on its own "
                f"batches (global batch {cfg.ep * cfg.batch_size}x{cfg.seq_len})", flush=True)
            skipped = [t for t in layer_types if not LAYER_TYPES[t].expert_parallel]
            if skipped:
                say(f"skipping {', '.join(skipped)}: cannot be expert-parallel (SMEAR merges the "
                    "experts' weights per example instead of routing tokens)", flush=True)
            layer_types = [t for t in layer_types if t not in skipped]
        results = [train(t, cfg, corpus, progress and main, ep_group=group) for t in layer_types]
    table, rank_table = format_table(results), format_rank_rows(results)
    summary = {"config": asdict(cfg), "torch": torch.__version__, "results": results,
               "table": table, **({"rank_table": rank_table} if rank_table else {})}
    if main:
        print(table, flush=True)
        if rank_table:
            print("\n" + rank_table, flush=True)
        png = plot_results(results, out / "demo.png", cfg)
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {png} and {out / 'results.json'}")
    return summary


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    ap.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                    help=f"comma list of layer types, from {', '.join(LAYER_TYPES)} "
                         f"(default {','.join(DEFAULT_LAYERS)})")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--d-model", type=int, default=d.d_model)
    ap.add_argument("--blocks", "--layers-n", dest="blocks", type=int, default=d.blocks,
                    help="transformer blocks")
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--experts", type=int, default=d.experts)
    ap.add_argument("--k", type=int, default=d.k, help="active experts per token")
    ap.add_argument("--expert-size", type=int, default=d.expert_size,
                    help="intermediate width of one expert (dense baseline: k times it)")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="CPU threads for training; 0 = torch's default (one per core). "
                         "Default 1: " + _THREADS_NOTE)
    ap.add_argument("--out", default="moeyard-demo", help="output folder (default ./moeyard-demo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--ep", type=int, default=d.ep, metavar="N",
                    help="expert parallelism over N processes, each holding 1/N of every MoE "
                         "layer's experts and training on its own batches (global batch N x "
                         "--batch-size): torchrun --nproc-per-node N -m moeyard demo --ep N. "
                         "gloo on the CPU; NCCL on CUDA, rank r on cuda:r. SMEAR is skipped. "
                         "Default 1: one process")


def from_args(args: argparse.Namespace) -> dict:
    cfg = DemoConfig(d_model=args.d_model, blocks=args.blocks, heads=args.heads,
                     experts=args.experts, k=args.k, expert_size=args.expert_size,
                     seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                     lr=args.lr, seed=args.seed, device=args.device, dtype=args.dtype,
                     threads=args.threads, ep=args.ep)
    layer_types = [t.strip() for t in args.layers.split(",") if t.strip()]
    try:
        return run(cfg, layer_types, args.out, progress=not args.no_progress)
    except SetupError as e:
        sys.exit(f"moeyard demo: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moeyard demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    from_args(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
