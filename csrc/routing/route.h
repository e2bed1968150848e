// Shared by route_cpu.cpp and route_cuda.cu: argument checks and the per-element formulas, so the
// two kernels compute the same function. Semantics: python/moeyard/reference.py (route).
#pragma once
#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/order.h"

namespace moeyard {

struct RouteParams {
  int64_t T = 0, E = 0, k = 0;
  Score score = Score::Softmax;
  bool topk_before_score = false;  // Mixtral/GPT-OSS: top-k on logits, softmax over the k
  bool has_bias = false;
  int64_t n_group = 1, topk_group = 1;
  bool renormalize = false;
  double scale = 1.0;
  // Rank on the raw logits when that order equals the order of the scores (no bias, no groups):
  // exact, and free of ties that rounding of the scores would create.
  MOEYARD_HD bool key_on_logits() const { return topk_before_score || (!has_bias && n_group == 1); }
};

inline RouteParams check_route_args(const at::Tensor& logits, int64_t k, const std::string& score,
                                    bool topk_before_score, const std::optional<at::Tensor>& bias,
                                    int64_t n_group, int64_t topk_group, bool renormalize,
                                    double scale) {
  check_rank(logits, 2, "logits");
  check_float(logits, "logits");
  RouteParams p;
  p.T = logits.size(0);
  p.E = logits.size(1);
  p.k = k;
  p.score = parse_score(score);
  p.topk_before_score = topk_before_score;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.renormalize = renormalize;
  p.scale = scale;
  TORCH_CHECK(p.E >= 1, "moeyard: logits must have at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(k >= 1 && k <= p.E, "moeyard: k must be in [1, E=", p.E, "], got k=", k);
  TORCH_CHECK(!topk_before_score || p.score == Score::Softmax,
              "moeyard: topk_before_score=True needs score='softmax', got '", score, "'");
  TORCH_CHECK(n_group >= 1 && p.E % n_group == 0, "moeyard: n_group=", n_group,
              " must be >= 1 and divide E=", p.E);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moeyard: topk_group=", topk_group,
              " must be in [1, n_group=", n_group, "]");
  TORCH_CHECK(k <= topk_group * (p.E / n_group), "moeyard: k=", k, " exceeds the ", topk_group,
              " kept groups of ", p.E / n_group, " experts");
  TORCH_CHECK(std::isfinite(scale), "moeyard: scale must be finite, got ", scale);
  check_int32_range(p.T * p.E, "T*E");
  if (bias.has_value()) {
    const auto& b = *bias;
    check_rank(b, 1, "bias");
    check_dtype(b, at::kFloat, "bias");
    check_same_device(logits, b, "logits", "bias");
    TORCH_CHECK(b.size(0) == p.E, "moeyard: bias must have E=", p.E, " entries, got ", b.size(0));
    p.has_bias = true;
  }
  return p;
}

// The score of one logit (softmax is applied by the caller: s = exp(z - max) / sum).
// Scores that need no other element of the row (softmax is normalized by the caller).
template <typename T>
MOEYARD_HD T pointwise_score(T z, Score s) {
  if (s == Score::Sigmoid) return T(1) / (T(1) + std::exp(-z));
  if (s == Score::Relu) return z > T(0) ? z : (z != z ? z : T(0));  // NaN stays NaN
  return z;
}

inline std::tuple<at::Tensor, at::Tensor> route_outputs(const at::Tensor& logits, int64_t k) {
  return {at::empty({logits.size(0), k}, logits.options().dtype(acc_dtype(logits.scalar_type()))),
          at::empty({logits.size(0), k}, logits.options().dtype(at::kInt))};
}

// ReMoE routing is route's top-k with score relu and no renormalization; slots whose gate is not
// positive become -1 with weight 0.
inline RouteParams relu_route_params(const at::Tensor& logits, int64_t k_max) {
  auto p = check_route_args(logits, k_max, "none", false, std::nullopt, 1, 1, false, 1.0);
  p.score = Score::Relu;
  return p;
}

// Dynamic top-p routing (top_p_cpu.cpp, top_p_cuda.cu): softmax, experts in descending logit
// order, slot j kept while the probabilities of slots 0..j-1 sum to at most p (so the expert that
// crosses p is kept; p = 1 keeps all k_max slots), at most k_max slots.
struct TopPParams {
  int64_t T = 0, E = 0, k = 0;
  double p = 1.0;
};

inline TopPParams check_top_p_args(const at::Tensor& logits, double p, int64_t k_max) {
  check_rank(logits, 2, "logits");
  check_float(logits, "logits");
  TopPParams tp;
  tp.T = logits.size(0);
  tp.E = logits.size(1);
  tp.k = k_max;
  tp.p = p;
  TORCH_CHECK(tp.E >= 1, "moeyard: logits must have at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(p > 0.0 && p <= 1.0, "moeyard: p must be in (0, 1], got p=", p);
  TORCH_CHECK(k_max >= 1 && k_max <= tp.E, "moeyard: k_max must be in [1, E=", tp.E,
              "], got k_max=", k_max);
  check_int32_range(tp.T * tp.E, "T*E");
  return tp;
}

// Whether slot j (probabilities of slots 0..j-1 summing to `before`) is kept. NaN sums (a token
// with a NaN or +inf logit) keep only slot 0.
template <typename T>
MOEYARD_HD bool top_p_keeps(T before, double p) {
  return p >= 1.0 || before <= static_cast<T>(p);
}

}  // namespace moeyard
