// Shared by assignment_cpu.cpp and assignment_cuda.cu: argument checks, the balance rule, the
// integer grid the scores are solved on, and the auction's constants, so the CPU and CUDA kernels
// run the same algorithm and return the same assignment. Semantics and the algorithm written out
// in PyTorch: python/moeyard/reference.py (balanced_assignment).
//
// Balance rule: with m = T / E and r = T % E, experts 0..r-1 take m+1 tokens and the others m
// (so for T < E experts 0..T-1 take one token each). Only the first E_eff = min(T, E) experts can
// take tokens. Expert e's tokens occupy slots slot_offset(e) .. slot_offset(e) + capacity(e).
//
// Grid: scores are compared as integers. lo / hi are the smallest / largest finite score; NaN and
// +-inf count as lo. q = 2^shift is the smallest power of two with (hi - lo) / q <= 2^24, and
// Q = rint((s - lo) / q) in [0, 2^24] (computed in fp64: fp32, fp16 and bf16 scores convert
// exactly). The auction then solves the problem on values V = Q * (T + 1) exactly (final
// epsilon 1 < (T+1)/T), so the assignment maximizes sum_t Q[t, a_t]: it is exactly optimal for the
// original scores whenever they lie on the grid (e.g. integer scores spanning <= 2^24) and within
// T * q of the optimum otherwise.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/order.h"  // MOEYARD_HD

namespace moeyard {
namespace assignment {

constexpr int kGridBits = 24;          // scores are resolved to 2^24 steps of their range
constexpr int64_t kTheta = 8;          // epsilon-scaling factor between phases
constexpr int64_t kDefaultMaxRounds = 1 << 16;  // bidding rounds before the greedy completion

struct Params {
  int64_t T = 0, E = 0;
  int64_t E_eff = 0;  // experts that take tokens: min(T, E)
  int64_t m = 0, r = 0;  // T / E, T % E
  int64_t max_rounds = kDefaultMaxRounds;
  MOEYARD_HD int64_t capacity(int64_t e) const { return m + (e < r ? 1 : 0); }
  MOEYARD_HD int64_t slot_offset(int64_t e) const { return e * m + (e < r ? e : r); }
};

MOEYARD_HD bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// The integer grid of the scores, from their finite minimum and maximum (lo = hi = 0 when no score
// is finite). When hi - lo overflows fp64, scores and bounds are halved first (exactly).
struct Grid {
  double lo = 0.0;
  int shift = 0;       // q = 2^shift
  bool halve = false;
  int64_t qmax = 0;    // Q of hi: 0 iff every score sits at lo (all equal / non-finite)

  MOEYARD_HD int64_t quantize(double s) const {
    if (!is_finite(s)) return 0;
    if (halve) s *= 0.5;
    return static_cast<int64_t>(rint(ldexp(s - lo, -shift)));
  }
};

MOEYARD_HD Grid make_grid(double lo, double hi) {
  Grid g;
  if (!(hi > lo)) return g;  // one value (or none): every Q is 0
  g.halve = !is_finite(hi - lo);
  g.lo = g.halve ? lo * 0.5 : lo;
  const double range = g.halve ? hi * 0.5 - lo * 0.5 : hi - lo;
  int ex = 0;
  const double frac = frexp(range, &ex);  // range = frac * 2^ex, frac in [0.5, 1)
  g.shift = ex - kGridBits - (frac == 0.5 ? 1 : 0);  // smallest shift with range / 2^shift <= 2^24
  g.qmax = g.quantize(hi);
  return g;
}

// All scores equal (Q = 0 everywhere: qmax == 0) and at least one round allowed: the auction's first
// round sends token t to expert t mod E_eff (the first of its equal experts, cyclically), which
// fills every expert exactly and ends the last phase (eps = 1), so the kernels write that result
// directly. With max_rounds = 0 no round runs: the greedy completion decides, as for any scores.
MOEYARD_HD bool all_equal_in_one_round(const Grid& g, const Params& p) {
  return g.qmax == 0 && p.max_rounds >= 1;
}

inline Params check_assignment_args(const at::Tensor& scores, int64_t max_rounds) {
  check_rank(scores, 2, "scores");
  check_float(scores, "scores");
  Params p;
  p.T = scores.size(0);
  p.E = scores.size(1);
  TORCH_CHECK(p.E >= 1, "moeyard: scores must have at least one expert column, got shape ",
              scores.sizes());
  TORCH_CHECK(max_rounds >= 0, "moeyard: max_rounds must be >= 0, got ", max_rounds);
  check_int32_range(p.T * p.E, "T*E");
  p.E_eff = p.T < p.E ? p.T : p.E;
  p.m = p.T / p.E;
  p.r = p.T % p.E;
  p.max_rounds = max_rounds;
  return p;
}

}  // namespace assignment
}  // namespace moeyard
