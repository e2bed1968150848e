// balanced_assignment on the CPU: the BASE-layer assignment of T tokens to E experts that
// maximizes sum_t scores[t, a_t] with every expert taking exactly its capacity (T/E, the first
// T%E experts one more), by a forward auction with epsilon-scaling (Bertsekas). The CUDA kernel
// (assignment_cuda.cu) runs the same rounds and returns the same assignment; the algorithm is
// written out in PyTorch in python/moeyard/reference.py (balanced_assignment), the grid and the
// balance rule in routing/assignment.h.
//
// Values V[t,e] = Q[t,e] * (T+1) (Q: the scores on the integer grid), one price p_e per expert.
// A phase with increment eps starts with every token unassigned and the prices of the last phase.
// Each round (Jacobi: all at once, against the prices at the start of the round), every unassigned
// token t bids for its best expert e* = argmax_e V[t,e] - p_e, bidding p_e* + (best - second best)
// + eps. Among equal experts it takes the first in the cyclic order t mod E_eff, t+1, ... (equal
// tokens then spread over equal experts instead of all bidding for the lowest one, which would
// take a round per expert). Each expert keeps the best `capacity` of its held tokens and
// its new bidders (higher bid first, ties to the lower token) and releases the others; a full
// expert's price is then its lowest kept bid (a non-full expert keeps its price). Every assigned
// token stays within eps of its best expert (eps-complementary slackness), so a phase that ends
// with all tokens assigned is within T*eps of the optimum. Phases use eps = max(1, V_max / 8),
// then eps / 8 each time, down to eps = 1: exact on V. Prices are shifted to min 0 between phases.
// Every round's outcome is a function of the sets involved, never of an iteration order.
//
// After max_rounds rounds (all phases together) the remaining unassigned tokens are completed
// greedily in ascending token order: each takes the expert with free capacity that maximizes
// V[t,e] - p_e (ties: lowest e). With max_rounds = 0 this is greedy-with-capacity on the scores.
//
// Work per round O(U*E + candidates*log) for U bidders; memory O(T*E) int32 for the grid values.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "routing/assignment.h"

namespace moeyard {
namespace {

using assignment::Grid;
using assignment::Params;

// Higher bid first, ties to the lower token.
struct Cand {
  int64_t bid;
  int32_t token;
  bool operator<(const Cand& o) const { return bid > o.bid || (bid == o.bid && token < o.token); }
};

class Auction {
 public:
  Auction(const Params& p, const int32_t* Q, int32_t* owner)
      : p_(p), Q_(Q), owner_(owner), Ee_(p.E_eff), scale_(p.T + 1), price_(Ee_, 0),
        bid_(p.T, 0), new_bid_(p.T, 0), target_(p.T, 0), held_(Ee_) {}

  void run(int64_t qmax) {
    int64_t eps = std::max<int64_t>(1, qmax * scale_ / assignment::kTheta);
    int64_t rounds = 0;
    for (;;) {
      std::vector<int32_t> unassigned(p_.T);
      for (int64_t t = 0; t < p_.T; ++t) {
        owner_[t] = -1;
        unassigned[t] = static_cast<int32_t>(t);
      }
      for (auto& h : held_) h.clear();
      while (!unassigned.empty()) {
        if (rounds == p_.max_rounds) {
          complete();
          return;
        }
        ++rounds;
        unassigned = round(unassigned, eps);
      }
      const int64_t low = *std::min_element(price_.begin(), price_.end());
      for (auto& v : price_) v -= low;
      if (eps == 1) return;
      eps = std::max<int64_t>(1, eps / assignment::kTheta);
    }
  }

 private:
  int64_t value(int64_t t, int64_t e) const {
    return static_cast<int64_t>(Q_[t * p_.E + e]) * scale_ - price_[e];
  }

  // One bidding round; returns the tokens unassigned after it.
  std::vector<int32_t> round(const std::vector<int32_t>& bidders, int64_t eps) {
    const int64_t U = static_cast<int64_t>(bidders.size());
    at::parallel_for(0, U, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = bidders[i];
        int64_t best = std::numeric_limits<int64_t>::min(), second = best, arg = 0;
        const int64_t first = t % Ee_;  // equal experts: the first from t mod E_eff, cyclically
        for (int64_t j = 0; j < Ee_; ++j) {
          const int64_t e = first + j < Ee_ ? first + j : first + j - Ee_;
          const int64_t v = value(t, e);
          if (v > best) {
            second = best;
            best = v;
            arg = e;
          } else if (v > second) {
            second = v;
          }
        }
        target_[t] = static_cast<int32_t>(arg);
        new_bid_[t] = price_[arg] + (best - second) + eps;  // E_eff >= 2: second is a value
      }
    });
    // bidders grouped by expert (counting sort: the order inside a group does not matter)
    std::vector<int64_t> start(Ee_ + 1, 0);
    for (int32_t t : bidders) ++start[target_[t] + 1];
    for (int64_t e = 0; e < Ee_; ++e) start[e + 1] += start[e];
    std::vector<int32_t> grouped(U);
    {
      std::vector<int64_t> cursor(start.begin(), start.end() - 1);
      for (int32_t t : bidders) grouped[cursor[target_[t]]++] = t;
    }
    std::vector<std::vector<int32_t>> released(Ee_);
    at::parallel_for(0, Ee_, 1, [&](int64_t begin, int64_t end) {
      std::vector<Cand> cand;
      for (int64_t e = begin; e < end; ++e) {
        if (start[e + 1] == start[e]) continue;
        auto& held = held_[e];
        const int64_t cap = p_.capacity(e);
        cand.clear();
        for (int32_t t : held) cand.push_back({bid_[t], t});
        for (int64_t i = start[e]; i < start[e + 1]; ++i)
          cand.push_back({new_bid_[grouped[i]], grouped[i]});
        const int64_t n = static_cast<int64_t>(cand.size());
        if (n > cap) std::nth_element(cand.begin(), cand.begin() + (cap - 1), cand.end());
        const int64_t kept = std::min(n, cap);
        held.clear();
        int64_t low = std::numeric_limits<int64_t>::max();
        for (int64_t i = 0; i < kept; ++i) {
          const int32_t t = cand[i].token;
          held.push_back(t);
          owner_[t] = static_cast<int32_t>(e);
          bid_[t] = cand[i].bid;
          low = std::min(low, cand[i].bid);
        }
        for (int64_t i = kept; i < n; ++i) {
          owner_[cand[i].token] = -1;
          released[e].push_back(cand[i].token);
        }
        if (kept == cap) price_[e] = low;  // full: the lowest kept bid
      }
    });
    std::vector<int32_t> next;
    for (const auto& r : released) next.insert(next.end(), r.begin(), r.end());
    return next;
  }

  // Greedy completion after max_rounds: tokens in ascending order take their best expert that
  // still has room (ties: lowest expert).
  void complete() {
    std::vector<int64_t> count(Ee_);
    for (int64_t e = 0; e < Ee_; ++e) count[e] = static_cast<int64_t>(held_[e].size());
    for (int64_t t = 0; t < p_.T; ++t) {
      if (owner_[t] >= 0) continue;
      int64_t best = std::numeric_limits<int64_t>::min(), arg = -1;
      for (int64_t e = 0; e < Ee_; ++e) {
        if (count[e] >= p_.capacity(e)) continue;
        const int64_t v = value(t, e);
        if (arg < 0 || v > best) {
          best = v;
          arg = e;
        }
      }
      TORCH_INTERNAL_ASSERT(arg >= 0, "balanced_assignment: no expert has room left");
      owner_[t] = static_cast<int32_t>(arg);
      ++count[arg];
    }
  }

  const Params& p_;
  const int32_t* Q_;
  int32_t* owner_;
  const int64_t Ee_, scale_;
  std::vector<int64_t> price_, bid_, new_bid_;
  std::vector<int32_t> target_;
  std::vector<std::vector<int32_t>> held_;
};

template <typename scalar_t>
Grid grid_of(const Params& p, const scalar_t* s) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t i = 0; i < p.T * p.E; ++i) {
    const double v = static_cast<double>(s[i]);
    if (!assignment::is_finite(v)) continue;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  return lo <= hi ? assignment::make_grid(lo, hi) : Grid{};
}

at::Tensor balanced_assignment_cpu(const at::Tensor& scores_in, int64_t max_rounds) {
  const Params p = assignment::check_assignment_args(scores_in, max_rounds);
  auto out = at::zeros({p.T, 1}, scores_in.options().dtype(at::kInt));
  if (p.E_eff <= 1) return out;  // T <= 1 or E == 1: every token goes to expert 0
  auto scores = scores_in.contiguous();
  std::vector<int32_t> Q(p.T * p.E);
  Grid grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "balanced_assignment_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    grid = grid_of(p, s);
    at::parallel_for(0, p.T * p.E, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        Q[i] = static_cast<int32_t>(grid.quantize(static_cast<double>(s[i])));
    });
  });
  int32_t* owner = out.mutable_data_ptr<int32_t>();
  if (assignment::all_equal_in_one_round(grid, p)) {
    for (int64_t t = 0; t < p.T; ++t) owner[t] = static_cast<int32_t>(t % p.E_eff);
    return out;
  }
  Auction(p, Q.data(), owner).run(grid.qmax);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { m.impl("balanced_assignment", &balanced_assignment_cpu); }

}  // namespace moeyard
