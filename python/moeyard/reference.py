"""Pure-PyTorch reference of every moeyard op: the semantics, written for clarity, not speed.

The tests compare every kernel (CPU and CUDA) with these functions on random inputs. Where a rule
is not obvious (tie-breaking, NaN, dropped slots) it is stated here once and the kernels follow it.

Selection order (every top-k, group choice, expert choice and score priority): larger value first,
ties broken by the lower index, NaN below every number (-inf included), -0 equal to +0. Values are
compared in fp32.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

_NEG_KEY = -1  # below every rank key: marks excluded entries


def rank_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order over the last dim is moeyard's selection order.

    key = order(v) * 2^31 + (2^31 - 1 - index), with order() the monotone map of fp32 bit patterns
    onto [0, 2^32) that sends NaN to 0. Keys are unique along the last dim, so ``topk`` on them is
    deterministic.
    """
    v = values.float() + 0.0  # -0 -> +0
    u = v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    order = torch.where(u >= 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)
    order = torch.where(torch.isnan(v), torch.zeros_like(order), order)
    idx = torch.arange(v.shape[-1], device=v.device, dtype=torch.int64)
    return order * 2**31 + (2**31 - 1 - idx)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def route(logits, k, score="softmax", topk_before_score=False, bias=None, n_group=1, topk_group=1,
          renormalize=False, scale=1.0):
    """Top-k routing. Returns (weights [T,k] fp32/fp64, experts [T,k] int32), best first.

    s = score(logits) (softmax over experts, sigmoid, or none = the logits themselves).
    Selection value: logits + bias if topk_before_score, else s + bias (bias changes which experts
    are picked, never the weights). With n_group > 1 the experts split into n_group equal groups,
    a group's value is the sum of its two best selection values (NaN counted as -inf), and only the
    topk_group best groups may be picked from.
    Weights: topk_before_score -> softmax over the k selected logits (GPT-OSS / Mixtral);
    else the selected s, divided by their sum (+1e-20) when renormalize. Then times scale.
    """
    acc = _acc_dtype(logits)
    z = logits.to(acc)
    T, E = z.shape
    if score == "softmax":
        s = torch.softmax(z, dim=-1)
    elif score == "sigmoid":
        s = torch.sigmoid(z)
    elif score in ("none", "relu"):
        s = torch.relu(z) if score == "relu" else z
    else:
        raise ValueError(f"unknown score {score!r}")
    # Ranking the logits is exact and gives the same order as ranking s when no bias/group is used.
    key_on_logits = topk_before_score or (bias is None and n_group == 1)
    kv = (z if key_on_logits else s).float()
    if bias is not None:
        kv = kv + bias.float()
    keys = rank_key(kv)
    if n_group > 1:
        gs = E // n_group
        top = keys.view(T, n_group, gs).topk(min(2, gs), dim=-1).indices
        vals = kv.view(T, n_group, gs).gather(-1, top)
        gval = torch.where(torch.isnan(vals), float("-inf"), vals).sum(-1)
        keep = rank_key(gval).topk(topk_group, dim=-1).indices
        group_mask = torch.zeros(T, n_group, dtype=torch.bool, device=z.device).scatter(1, keep, True)
        keys = keys.masked_fill(~group_mask.repeat_interleave(gs, dim=1), _NEG_KEY)
    sel = keys.topk(k, dim=-1).indices
    if topk_before_score:
        w = torch.softmax(z.gather(1, sel), dim=-1)
    else:
        w = s.gather(1, sel)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, sel.to(torch.int32)


def relu_route(logits, k_max):
    """ReMoE routing: gates relu(logits); the (up to) k_max largest positive gates per token, best
    first; remaining slots have expert -1 and weight 0. k_max = E keeps every active expert."""
    w, e = route(logits, k_max, score="relu")
    active = w > 0
    return torch.where(active, w, torch.zeros_like(w)), torch.where(active, e, torch.full_like(e, -1))


def top_p_route(logits, p, k_max):
    """Dynamic top-p routing (Huang et al., ACL 2024). Returns (weights [T,k_max] fp32/fp64,
    experts [T,k_max] int32).

    s = softmax(logits) in fp32 (fp64 for fp64 logits); the experts in selection order of the
    logits (larger first, ties to the lower index, NaN last); slot j takes the j-th of them while
    the probabilities of slots 0..j-1, summed in slot order in s's dtype, are <= p (compared in
    s's dtype), so the expert whose probability carries the sum past p is the last one kept;
    p = 1 keeps all k_max slots. The weights are the raw probabilities (not renormalized); the
    remaining slots have expert -1 and weight 0. A token with a NaN or +inf logit has NaN
    probabilities and keeps only slot 0 (weight NaN)."""
    acc = _acc_dtype(logits)
    z = logits.to(acc)
    T = z.shape[0]
    s = torch.softmax(z, dim=-1)
    sel = rank_key(z).topk(k_max, dim=-1).indices
    w = s.gather(1, sel)
    before = torch.zeros(T, dtype=acc, device=z.device)
    keep = torch.zeros_like(w, dtype=torch.bool)
    for j in range(k_max):
        keep[:, j] = (before <= p) if p < 1 else True
        before = before + w[:, j]
    keep = torch.cumprod(keep.int(), dim=1).bool()  # a slot after a dropped one is dropped
    return (torch.where(keep, w, torch.zeros_like(w)),
            torch.where(keep, sel, torch.full_like(sel, -1)).to(torch.int32))


# SparseMixer-v2's midpoint (Heun's third order): a training slot that did not pick its argmax
# keeps its weight if its uniform draw exceeds MIDPOINT_DRAW, else the weight is multiplied by
# MIDPOINT_SCALE, an fp32 constant (0.3333, transformers' and GRIN's, not 1/3).
MIDPOINT_DRAW = 0.75
MIDPOINT_SCALE = 0.3333


def sparsemixer(logits, jitter_eps=0.01, noise=None):
    """GRIN's SparseMixer-v2 top-2. Returns (weights [T,2] fp32/fp64, experts [T,2] int32).

    Slot j's candidates: every expert for j = 0, every expert but experts[:, 0] for j = 1.
      m: the candidates' largest logit (NaN if one is NaN).
      window: the candidates z with not ((m - z) / max(|z|, m) > 2 jitter_eps) (in the acc dtype;
        a comparison with NaN is false, so a NaN row masks nothing); m is always inside.
      p_j: softmax over the window (0 elsewhere).
      best: the candidates' argmax by the selection order (fp32; ties to the lower id; NaN last).
      noise None (eval): e_j = best, weight p_j[e_j].
      noise [T,2,E+1] (training), g = noise[:, j, :E] and u = noise[:, j, E]: e_j is the argmax of
        fp32(z + g) over the window (-inf outside it, the other candidates below -inf: a sample of
        p_j when g is Gumbel(0, 1)); weight p_j[e_j] * s with s = 1 if e_j == best or
        u > MIDPOINT_DRAW, else fp32(MIDPOINT_SCALE).
    Gradient in both modes: d weights[:, j] / d logits = p_j[e_j] (onehot(e_j) - p_j), which in
    training ignores s (GRIN's estimator; transformers' PhimoeMultiplier): written below as
    ``p.detach() * s + (p - p.detach())``, whose value is p * s and whose derivative is p's.
    """
    acc = _acc_dtype(logits)
    z = logits.to(acc)
    T, E = z.shape
    two_eps = torch.tensor(2 * jitter_eps, dtype=acc)
    excluded = torch.zeros(T, E, dtype=torch.bool, device=z.device)
    weights, experts = [], []
    for j in range(2):
        m = z.masked_fill(excluded, float("-inf")).max(-1, keepdim=True).values
        masked = (m - z) / z.abs().clamp(min=m) > two_eps
        window = ~excluded & ~masked
        p = torch.softmax(z.masked_fill(~window, float("-inf")), -1)
        best = rank_key(z).masked_fill(excluded, _NEG_KEY).argmax(-1)
        s = torch.ones(T, dtype=acc, device=z.device)
        if noise is None:
            e = best
        else:
            v = torch.where(masked, float("-inf"), (z + noise[:, j, :E].to(acc)).float())
            e = rank_key(v).masked_fill(excluded, _NEG_KEY).argmax(-1)
            keep = (e == best) | (noise[:, j, E] > MIDPOINT_DRAW)
            s = torch.where(keep, s, torch.tensor(MIDPOINT_SCALE, dtype=torch.float32).to(acc))
        pe = p.gather(1, e[:, None])[:, 0]
        weights.append(pe.detach() * s + (pe - pe.detach()))
        experts.append(e)
        excluded = excluded | F.one_hot(e, E).bool()
    return torch.stack(weights, 1), torch.stack(experts, 1).to(torch.int32)


def _token_priority(experts, weights, drop_policy):
    """Rank of each token in the drop priority: position -> token order; score -> by the token's
    best valid weight, descending (Batch Prioritized Routing), ties to the earlier token."""
    T = experts.shape[0]
    if drop_policy == "position":
        return torch.arange(T, device=experts.device)
    if drop_policy != "score":
        raise ValueError(f"unknown drop_policy {drop_policy!r}")
    w = weights.float().masked_fill(experts < 0, float("-inf"))
    conf = w.max(dim=1).values if w.shape[1] > 0 else torch.full((T,), float("-inf"))
    order = rank_key(conf).argsort(descending=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(T, device=order.device))


def plan(experts, num_experts, capacity=None, drop_policy="position", weights=None):
    """Dispatch plan of a routing. Returns (counts, offsets, row_source, token_row), all int32.

    counts [E]: assignments per expert before drops (-1 experts skipped).
    Priority of assignment (t, j): slot-major -- every token's slot 0 before any slot 1 -- and
    within a slot by the token priority (_token_priority). Each expert's rows are its assignments
    in priority order; with a capacity C only its first C are kept, the rest dropped.
    Layout: dropless (capacity None) R = T*k rows, expert e's rows start at offsets[e] (compact, unused rows at the
    end); capacity R = E*C rows, expert e's rows start at e*C.
    offsets [E+1]: exclusive cumsum of kept rows per expert.
    row_source [R]: t*k + j of the row's assignment, -1 for an unused row.
    token_row [T,k]: row of assignment (t, j), -1 if dropped or expert -1.
    """
    T, k = experts.shape
    E, dev = num_experts, experts.device
    ex = experts.long().flatten()
    valid = ex >= 0
    counts = torch.bincount(ex[valid], minlength=E)
    rank = _token_priority(experts, weights, drop_policy)
    prio = (torch.arange(k, device=dev)[None, :] * T + rank[:, None]).flatten()  # [T*k]
    n = T * k
    sort_key = torch.where(valid, ex, torch.full_like(ex, E)) * max(n, 1) + prio
    order = sort_key.argsort()  # unique keys: deterministic
    sorted_e = ex[order]
    sorted_valid = sorted_e >= 0
    seg_start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(n, device=dev) - seg_start[sorted_e.clamp(min=0)]
    if capacity is None:
        R, kept_counts = n, counts
        row = torch.arange(n, device=dev)
        kept = sorted_valid
    else:
        R, kept_counts = E * capacity, counts.clamp(max=capacity)
        row = sorted_e.clamp(min=0) * capacity + pos
        kept = sorted_valid & (pos < capacity)
    row_source = torch.full((R,), -1, dtype=torch.int64, device=dev)
    row_source[row[kept]] = order[kept]
    token_row = torch.full((n,), -1, dtype=torch.int64, device=dev)
    token_row[order[kept]] = row[kept]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(kept_counts, 0)])
    i32 = torch.int32
    return counts.to(i32), offsets.to(i32), row_source.to(i32), token_row.view(T, k).to(i32)


def expert_choice(scores, capacity):
    """Expert-choice routing: expert e takes its min(C, T) best tokens by scores[:, e].

    Returns (weights [T,E], experts [T,E], counts, offsets, row_source, token_row): per token the
    experts that took it in ascending id, their scores as weights, -1 / 0 after them; and the plan
    with R = E*C rows, expert e's rows e*C + i in its preference order i.
    """
    T, E = scores.shape
    C, dev = capacity, scores.device
    take = min(C, T)
    acc = _acc_dtype(scores)
    top = rank_key(scores.float().t()).topk(take, dim=-1).indices  # [E, take], best first
    row_of = torch.full((T, E), -1, dtype=torch.int64, device=dev)
    rows = torch.arange(E, device=dev)[:, None] * C + torch.arange(take, device=dev)[None, :]
    row_of[top, torch.arange(E, device=dev)[:, None].expand(E, take)] = rows
    chosen = row_of >= 0
    slot = torch.cumsum(chosen.long(), dim=1) - 1
    t_idx, e_idx = chosen.nonzero(as_tuple=True)
    j_idx = slot[t_idx, e_idx]
    experts = torch.full((T, E), -1, dtype=torch.int64, device=dev)
    weights = torch.zeros((T, E), dtype=acc, device=dev)
    token_row = torch.full((T, E), -1, dtype=torch.int64, device=dev)
    experts[t_idx, j_idx] = e_idx
    weights[t_idx, j_idx] = scores.to(acc)[t_idx, e_idx]
    token_row[t_idx, j_idx] = row_of[t_idx, e_idx]
    row_source = torch.full((E * C,), -1, dtype=torch.int64, device=dev)
    row_source[row_of[t_idx, e_idx]] = t_idx * E + j_idx
    counts = torch.full((E,), take, dtype=torch.int64, device=dev)
    offsets = torch.arange(E + 1, device=dev) * take
    i32 = torch.int32
    return (weights, experts.to(i32), counts.to(i32), offsets.to(i32), row_source.to(i32),
            token_row.to(i32))



# ------------------------------------------------------------------------- balanced assignment

ASSIGNMENT_GRID_BITS = 24  # scores are resolved to 2^24 steps of their range
ASSIGNMENT_THETA = 8  # epsilon-scaling factor between auction phases
ASSIGNMENT_MAX_ROUNDS = 1 << 16  # default bidding rounds before the greedy completion


def assignment_capacities(num_tokens, num_experts):
    """Tokens each expert takes in a balanced assignment: T // E, plus one for experts
    0 .. T % E - 1 (so for T < E, experts 0..T-1 take one token each and the rest none)."""
    m, r = divmod(num_tokens, num_experts)
    return torch.tensor([m + (e < r) for e in range(num_experts)], dtype=torch.int64)


def assignment_grid(scores):
    """The scores as integers Q [T,E] (int64) on the grid the auction solves, and Q's maximum.

    lo / hi: the smallest / largest finite score (NaN and +-inf count as lo); q = 2^shift the
    smallest power of two with (hi - lo) / q <= 2^24; Q = rint((s - lo) / q) in [0, 2^24], in fp64
    (exact conversion from fp32/fp16/bf16). If hi - lo overflows fp64, everything is halved first.
    """
    s = scores.double()
    finite = torch.isfinite(s)
    if not finite.any():
        return torch.zeros(s.shape, dtype=torch.int64, device=s.device), 0
    lo, hi = s[finite].min().item(), s[finite].max().item()
    s = torch.where(finite, s, torch.full_like(s, lo))
    if not hi > lo:
        return torch.zeros(s.shape, dtype=torch.int64, device=s.device), 0
    if not math.isfinite(hi - lo):
        s, lo, hi = s * 0.5, lo * 0.5, hi * 0.5
    frac, ex = math.frexp(hi - lo)
    shift = ex - ASSIGNMENT_GRID_BITS - (1 if frac == 0.5 else 0)
    q = torch.round(torch.ldexp(s - lo, torch.tensor(float(-shift), dtype=torch.float64,
                                                     device=s.device)))
    qmax = int(round(math.ldexp(hi - lo, -shift)))
    return q.to(torch.int64), qmax


def balanced_assignment(scores, max_rounds=ASSIGNMENT_MAX_ROUNDS):
    """BASE-layer assignment: experts [T,1] int32 maximizing sum_t Q[t, a_t] (Q: assignment_grid)
    subject to expert e taking exactly assignment_capacities(T, E)[e] tokens.

    Forward auction with epsilon-scaling (Bertsekas) on V = Q * (T+1), one price per expert:
    a phase (eps) starts with all tokens unassigned and the last phase's prices. Each round, every
    unassigned token bids for its best expert e* = argmax V[t,e] - p_e (among equal experts the
    first in the cyclic order t mod Ee, t+1 mod Ee, ..., Ee = min(T, E), which spreads the bids of
    equal tokens over equal experts), the bid being p_e* + (best - second best) + eps; each expert
    keeps the best `capacity` of its held tokens and new bidders (higher bid first, ties to the
    lower token) and releases the rest; a full expert's price becomes its lowest kept bid. eps
    starts at max(1, qmax*(T+1) // 8) and is divided by 8 per phase down to 1 (prices shifted to
    min 0 between phases); the last phase makes the assignment exactly optimal on V, i.e. on Q.
    After max_rounds rounds in total, the tokens still unassigned take, in ascending order, their
    best expert (V - p) that has room left (ties: the lowest expert).
    """
    T, E = scores.shape
    dev = scores.device
    out = torch.zeros(T, 1, dtype=torch.int32, device=dev)
    Ee = min(T, E)
    if Ee <= 1:
        return out
    Q, qmax = assignment_grid(scores)
    cap = assignment_capacities(T, Ee).to(dev)
    V = Q[:, :Ee] * (T + 1)
    price = torch.zeros(Ee, dtype=torch.int64, device=dev)
    eps = max(1, qmax * (T + 1) // ASSIGNMENT_THETA)
    big = 2**62
    rounds = 0
    while True:
        owner = torch.full((T,), -1, dtype=torch.int64, device=dev)
        bid = torch.zeros(T, dtype=torch.int64, device=dev)
        while bool((owner < 0).any()):
            if rounds == max_rounds:
                count = torch.bincount(owner[owner >= 0], minlength=Ee)
                for t in (owner < 0).nonzero().flatten().tolist():
                    val = torch.where(count < cap, V[t] - price, -big)
                    e = int((val == val.max()).nonzero()[0])
                    owner[t] = e
                    count[e] += 1
                return owner.to(torch.int32).view(T, 1)
            rounds += 1
            U = (owner < 0).nonzero().flatten()
            val = V[U] - price
            best_v = val.max(dim=1).values
            # among equal experts, the first in token t's cyclic order t mod Ee, t+1 mod Ee, ...
            rot = (torch.arange(Ee, device=dev)[None, :] + U[:, None]) % Ee
            first = (val.gather(1, rot) == best_v[:, None]).int().argmax(dim=1)
            best = (first + U) % Ee
            second = val.scatter(1, best[:, None], -big).max(dim=1).values
            cand_e, cand_b = owner.clone(), bid.clone()
            cand_e[U] = best
            cand_b[U] = price[best] + (best_v - second) + eps
            # every token is now a candidate of one expert; each keeps its top `cap` by
            # (bid descending, token ascending)
            order = torch.sort(-cand_b, stable=True).indices  # token order breaks bid ties
            order = order[torch.sort(cand_e[order], stable=True).indices]
            se = cand_e[order]
            n = torch.bincount(se, minlength=Ee)
            rank = torch.arange(T, device=dev) - (torch.cumsum(n, 0) - n)[se]
            kept = rank < cap[se]
            owner = torch.full((T,), -1, dtype=torch.int64, device=dev)
            owner[order[kept]] = se[kept]
            bid = torch.where(owner >= 0, cand_b, torch.zeros_like(cand_b))
            held = owner >= 0
            full = torch.bincount(owner[held], minlength=Ee) == cap
            low = torch.full((Ee,), big, dtype=torch.int64, device=dev).scatter_reduce(
                0, owner[held], bid[held], "amin")
            price = torch.where(full, low, price)
        price = price - price.min()
        if eps == 1:
            return owner.to(torch.int32).view(T, 1)
        eps = max(1, eps // ASSIGNMENT_THETA)


def permute(x, row_source, token_row):
    """Gather rows into plan order: out[r] = x[row_source[r] // k], zero for unused rows."""
    k = token_row.shape[1]
    src = row_source.long()
    out = torch.zeros(src.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    used = src >= 0
    out[used] = x[src[used] // k]
    return out


def unpermute(y, row_source, token_row, weights=None):
    """Combine rows back to tokens: out[t] = sum_j weights[t,j] * y[token_row[t,j]] over the
    slots with a row, accumulated in fp32 (fp64 for fp64) in slot order, cast to y's dtype."""
    T, k = token_row.shape
    acc = _acc_dtype(y)
    out = torch.zeros(T, y.shape[1], dtype=acc, device=y.device)
    for j in range(k):
        r = token_row[:, j].long()
        has = r >= 0  # slots without a row are skipped, not multiplied by 0 (NaN * 0 = NaN)
        term = y[r[has]].to(acc)
        if weights is not None:
            term = term * weights[has, j : j + 1].to(acc)
        out[has] = out[has] + term
    return out.to(y.dtype)


def update_expert_bias(bias, load, rate):
    """In place: bias += rate * sign(mean(load) - load) (Loss-Free Balancing)."""
    load = load.double()
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))


def router_losses(logits, counts, k, score="softmax"):
    """(balance, z): balance = E * sum_e f_e P_e with f_e = counts_e / (T*k) (pre-drop counts) and
    P = mean over tokens of softmax(logits), or for score="sigmoid" of the sigmoid affinities
    normalized per token, s / (sum_e s + 1e-20); z = mean over tokens of logsumexp(logits)^2.
    Balanced routing gives balance = 1 for every k (HF's load_balancing_loss_func gives k times
    this). Both are 0 for T = 0."""
    acc = _acc_dtype(logits)
    z = logits.to(acc)
    T, E = z.shape
    if T == 0:
        zero = z.sum() * 0
        return zero, zero.clone()
    if score == "sigmoid":
        s = torch.sigmoid(z)
        P = (s / (s.sum(-1, keepdim=True) + 1e-20)).mean(0)
    else:
        P = torch.softmax(z, dim=-1).mean(0)
    f = counts.to(acc) / (T * k)
    return E * (f * P).sum(), (torch.logsumexp(z, dim=-1) ** 2).mean()


def sequence_balance_loss(scores, experts, num_sequences):
    """DeepSeek-V3 sequence-wise balance loss without its alpha. Tokens are num_sequences equal,
    consecutive sequences of S tokens. Per sequence: f_e = E / (k S) * #(t, j) with experts = e,
    P_e = mean_t s[t,e] / (sum_e' s[t,e'] + 1e-20); loss = mean over sequences of sum_e f_e P_e."""
    acc = _acc_dtype(scores)
    N, E = scores.shape
    k = experts.shape[1]
    B = num_sequences
    if N == 0:
        return scores.to(acc).sum() * 0
    S = N // B
    s = scores.to(acc)
    sn = s / (s.sum(-1, keepdim=True) + 1e-20)
    P = sn.view(B, S, E).mean(1)
    ex = experts.long().view(B, S * k)
    onehot = F.one_hot(ex.clamp(min=0), E).to(acc) * (ex >= 0).unsqueeze(-1).to(acc)
    f = onehot.sum(1) * (E / (k * S))
    return (f * P).sum(-1).mean()


# ------------------------------------------------------------------------------ expert compute
#
# Weights are "logical [E, K, N]": row r of expert e computes a[src(r)] @ b[e]. Hugging Face v5
# stores nn.Linear-style [E, N, K] (gate_up_proj [E, 2I, H], down_proj [E, H, I]); those are passed
# as b.transpose(1, 2) views, never copied. Products, bias and activation are computed in fp32
# (fp64 for fp64), rounded once to the data dtype.

class Act(NamedTuple):
    """One activation: its elementwise function ``fn`` (a key of :data:`ELEMENTWISE`) and its
    gating: ``gate`` None (ungated: ``out = fn(h)``, N1 = I), ``"halves"`` (``h = [gate | up]``,
    the halves of Hugging Face's gate_up_proj: ``out = fn(gate) * up``, N1 = 2I) or ``"oss"``
    (GPT-OSS: ``gate = h[..., 0::2]``, ``up = h[..., 1::2]`` interleaved, ``gate = min(gate, 7)``,
    ``up = clamp(up, -7, 7)``, ``out = (up + 1) * fn(gate)``, N1 = 2I)."""

    fn: str
    gate: Optional[str]


OSS_ALPHA, OSS_LIMIT = 1.702, 7.0  # GPT-OSS's swiglu_alpha and swiglu_limit

# The elementwise functions, on fp32 (fp64 for fp64) tensors. gelu_tanh is transformers'
# gelu_new / gelu_pytorch_tanh / gelu_fast; relu2 its ReLUSquaredActivation; quick_gelu its
# QuickGELUActivation (and GPT-OSS's glu, 1.702 = OSS_ALPHA).
ELEMENTWISE = {
    "identity": lambda h: h,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": torch.relu,
    "relu2": lambda h: torch.relu(h).square(),
    "quick_gelu": lambda h: h * torch.sigmoid(OSS_ALPHA * h),
}

# The one table of the experts' activations, name -> Act, in the order of csrc/experts/
# grouped_mm.h's kActivations (the C++ table; torch.ops.moeyard._activations() returns its names).
ACTIVATIONS = {
    "none": Act("identity", None),
    "silu": Act("silu", None),
    "gelu": Act("gelu", None),
    "gelu_tanh": Act("gelu_tanh", None),
    "relu": Act("relu", None),
    "relu2": Act("relu2", None),
    "quick_gelu": Act("quick_gelu", None),
    "swiglu": Act("silu", "halves"),
    "geglu": Act("gelu", "halves"),
    "geglu_tanh": Act("gelu_tanh", "halves"),
    "reglu": Act("relu", "halves"),
    "relu2_glu": Act("relu2", "halves"),
    "quick_geglu": Act("quick_gelu", "halves"),
    "swiglu_oss": Act("quick_gelu", "oss"),
}


def unknown_activation(name):
    """The message refusing activation ``name``: the table's names (C++ writes the same)."""
    return f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {name!r}"


def _act(name):
    if name not in ACTIVATIONS:
        raise ValueError(unknown_activation(name))
    return ACTIVATIONS[name]


def is_gated(name):
    """Whether activation ``name`` reads two columns (gate and up) per output column: N1 = 2I."""
    return _act(name).gate is not None


def activation_name(fn, gated):
    """The table's name of elementwise function ``fn`` ungated, or gated on the halves
    ``[gate | up]`` (``out = fn(gate) * up``, transformers' ``act_fn(gate) * up``); ValueError
    naming ``fn`` where the table has none (GPT-OSS's clamped pairs are only ``"swiglu_oss"``)."""
    for name, a in ACTIVATIONS.items():
        if a.fn == fn and a.gate == ("halves" if gated else None):
            return name
    raise ValueError(f"moeyard has no {'gated' if gated else 'ungated'} activation of the "
                     f"elementwise function {fn!r} (functions: {', '.join(ELEMENTWISE)})")


def activation(h, act):
    """act(h) over the last dim of the first GEMM's output (fp32 in, fp32 out; fp64 for fp64),
    for every entry of :data:`ACTIVATIONS` (see :class:`Act` for the gatings)."""
    a = _act(act)
    f = ELEMENTWISE[a.fn]
    if a.gate is None:
        return f(h)
    if a.gate == "halves":
        g, u = h.chunk(2, dim=-1)
        return f(g) * u
    g = h[..., 0::2].clamp(max=OSS_LIMIT)
    u = h[..., 1::2].clamp(min=-OSS_LIMIT, max=OSS_LIMIT)
    return (u + 1) * f(g)


def grouped_mm_serves(device, dtype, capacity, widths):
    """Whether ``backend="grouped_mm"`` computes expert products with these row widths (operands
    and outputs), the rule of csrc/experts/backend.cpp: never float64; rows 16-byte aligned
    (every width a positive multiple of 16 bytes); on CUDA, dropless plans (``capacity`` None)
    only where torch's grouped GEMM is sync-free, bf16 on compute capability 9.x and 10.x."""
    if dtype == torch.float64:
        return False
    if device == "cuda" and capacity is None and (
            dtype != torch.bfloat16 or torch.cuda.get_device_capability()[0] not in (9, 10)):
        return False
    return all(w > 0 and w % (16 // dtype.itemsize) == 0 for w in widths)


def expert_rows(offsets, capacity, num_rows):
    """(expert, used) of every row: expert e owns rows offsets[e]..offsets[e+1] (dropless) or
    e*C .. e*C + offsets[e+1] - offsets[e] (capacity C, fixed stride); other rows are unused."""
    E = offsets.shape[0] - 1
    off = offsets.long().cpu()
    expert = torch.full((num_rows,), -1, dtype=torch.long)
    for e in range(E):
        start = off[e] if capacity is None else e * capacity
        expert[start : start + off[e + 1] - off[e]] = e
    return expert, expert >= 0


def grouped_mm(a, b, offsets, a_index=None, capacity=None):
    """out[r] = a[src(r)] @ b[e(r)] for every used row r, zero for unused rows; [R, N].

    b is logical [E, K, N]. Without a_index, src(r) = r and R = a.shape[0]; with a_index [R],
    src(r) = a_index[r] and -1 reads a zero row. Rows are split among experts by expert_rows."""
    acc = _acc_dtype(a)
    R = a.shape[0] if a_index is None else a_index.shape[0]
    expert, used = expert_rows(offsets, capacity, R)
    out = torch.zeros(R, b.shape[2], dtype=acc, device=a.device)
    for e in range(b.shape[0]):
        rows = (expert == e).nonzero().flatten().to(a.device)
        if rows.numel() == 0:
            continue
        if a_index is None:
            src = a[rows].to(acc)
        else:
            idx = a_index[rows].long()
            src = torch.where((idx >= 0)[:, None], a[idx.clamp(min=0)].to(acc), 0)
        out[rows] = src @ b[e].to(acc)
    return out.to(a.dtype)


def expert_ffn(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1=None, b2=None,
               act="swiglu", round_first_product=False):
    """The routed expert MLP: y[t] = sum_j weights[t,j] * f_e(x[t]) over the slots j with a row,
    f_e(v) = act(v @ w1[e] + b1[e]) @ w2[e] + b2[e], e the expert owning that row, act a name of
    ACTIVATIONS.

    w1 logical [E, H, N1] (N1 = 2I for the gated activations, else I), w2 logical [E, I, H]. The
    first GEMM's activation output is rounded to x's dtype before the second GEMM (as the kernels
    keep it); the combine accumulates in fp32. Returns [T, H] in x's dtype.

    round_first_product: the grouped_mm backend's numerics: torch's grouped GEMM has no bias, so
    its first product is rounded to x's dtype before b1 is added (moeyard's kernel adds b1 to the
    fp32 accumulator). The two differ by one rounding of the product; with a bias in bf16/fp16 a
    pre-activation within that rounding of ReLU's kink can land on its other side."""
    acc = _acc_dtype(x)
    k = token_row.shape[1]
    R = row_source.shape[0]
    expert, used = expert_rows(offsets, capacity, R)
    expert = expert.to(x.device)
    src = torch.where(row_source >= 0, row_source // k, -1)
    h = grouped_mm(x.to(acc), w1.to(acc), offsets, src, capacity)
    if round_first_product:
        h = h.to(x.dtype).to(acc)
    if b1 is not None:
        h = h + torch.where((expert >= 0)[:, None], b1.to(acc)[expert.clamp(min=0)], 0)
    a = activation(h, act).to(x.dtype)
    y = grouped_mm(a.to(acc), w2.to(acc), offsets, None, capacity)
    if b2 is not None:
        y = y + torch.where((expert >= 0)[:, None], b2.to(acc)[expert.clamp(min=0)], 0)
    y = torch.where((expert >= 0)[:, None], y, 0)
    return unpermute(y, row_source, token_row, weights.to(acc)).to(x.dtype)


def merged_linear(x, probs, weight, bias=None):
    """SMEAR's merged expert (ALGORITHMS.md 3.3), the explicit einsum merge:
    Wbar[b] = sum_e probs[b,e] weight[e] ([B, N, K], fp32, rounded once to x's dtype as the kernel
    does before its product), y[b] = x[b] @ Wbar[b]^T + sum_e probs[b,e] bias[e] (fp32), returned
    in x's dtype. x [B,S,K], probs [B,E], weight [E,N,K] (nn.Linear order), bias [E,N]."""
    acc = _acc_dtype(x)
    p = probs.to(acc)
    merged = torch.einsum("be,enk->bnk", p, weight.to(acc)).to(x.dtype)
    y = torch.einsum("bsk,bnk->bsn", x.to(acc), merged.to(acc))
    if bias is not None:
        y = y + torch.einsum("be,en->bn", p, bias.to(acc))[:, None, :]
    return y.to(x.dtype)
