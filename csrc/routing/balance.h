// Shared by balance_cpu.cpp and balance_cuda.cu: argument checks and per-element formulas of
// update_expert_bias, router_losses and sequence_balance_loss, so both devices compute the same
// function. Semantics: python/moeyard/reference.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/order.h"  // MOEYARD_HD

namespace moeyard {

// Rows of logits / scores handled by one partial-sum chunk. The chunking depends on the shapes
// only (never on the thread count or the GPU), so the reductions are deterministic.
constexpr int64_t kBalanceChunkRows = 128;

// Loads and counts: a real (non-bool, non-complex) dtype the kernels are instantiated for.
inline void check_count_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kByte || st == at::kChar || st == at::kShort || st == at::kInt ||
                  st == at::kLong || st == at::kHalf || st == at::kBFloat16 ||
                  st == at::kFloat || st == at::kDouble;
  TORCH_CHECK(ok, "moeyard: ", name,
              " must be an integer (uint8, int8..int64) or floating-point tensor, got ", st);
}

// --- update_expert_bias: bias[e] += float(rate * sign(mean(load) - load[e])), mean in fp64.

inline int64_t check_update_expert_bias_args(const at::Tensor& bias, const at::Tensor& load,
                                             double rate) {
  check_rank(bias, 1, "bias");
  check_dtype(bias, at::kFloat, "bias");
  check_rank(load, 1, "load");
  check_count_dtype(load, "load");
  check_same_device(bias, load, "bias", "load");
  TORCH_CHECK(load.size(0) == bias.size(0), "moeyard: load must have E=", bias.size(0),
              " entries (one per expert of bias), got ", load.size(0));
  check_int32_range(bias.size(0), "E");
  (void)rate;  // any value, as the reference (inf or NaN rates give NaN biases)
  return bias.size(0);
}

// rate * torch.sign(mean - load) in fp64. torch.sign gives 0 for +-0 and also for NaN, so a NaN
// in load (which makes the mean NaN) leaves every bias unchanged, as in the reference.
MOEYARD_HD double sign_step(double mean, double load, double rate) {
  const double diff = mean - load;
  const double s = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
  return rate * s;
}

// --- router_losses

struct RouterLossShape {
  int64_t T = 0, E = 0, k = 0;
  bool sigmoid = false;  // P from sigmoid(z) / sum_e sigmoid(z) (DeepSeek-V3), not softmax(z)
};

inline RouterLossShape check_router_losses_args(const at::Tensor& logits, const at::Tensor& counts,
                                                int64_t k, c10::string_view score) {
  check_rank(logits, 2, "logits");
  check_float(logits, "logits");
  check_rank(counts, 1, "counts");
  check_count_dtype(counts, "counts");
  check_same_device(logits, counts, "logits", "counts");
  TORCH_CHECK(score == "softmax" || score == "sigmoid",
              "moeyard: router_losses score must be 'softmax' or 'sigmoid', got '", score, "'");
  RouterLossShape s{logits.size(0), logits.size(1), k, score == "sigmoid"};
  TORCH_CHECK(s.E >= 1, "moeyard: logits must have at least one expert column, got shape ",
              logits.sizes());
  TORCH_CHECK(counts.size(0) == s.E, "moeyard: counts must have E=", s.E,
              " entries (one per logits column), got ", counts.size(0));
  TORCH_CHECK(k >= 1, "moeyard: k must be >= 1, got k=", k);
  check_int32_range(s.T * s.E, "T*E");
  return s;
}

// logsumexp from the row max m and s = sum exp(z - m), as torch.logsumexp: a row whose max is
// +-inf gives that max (torch shifts by 0 there), NaN gives NaN.
template <typename acc_t>
MOEYARD_HD acc_t row_logsumexp(acc_t m, acc_t s) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  return (m == inf || m == -inf) ? m : m + std::log(s);
}

// --- sequence_balance_loss

struct SeqLossShape {
  int64_t N = 0, E = 0, k = 0, B = 0, S = 0;
};

inline SeqLossShape check_sequence_balance_loss_args(const at::Tensor& scores,
                                                     const at::Tensor& experts,
                                                     int64_t num_sequences) {
  check_rank(scores, 2, "scores");
  check_float(scores, "scores");
  check_rank(experts, 2, "experts");
  check_expert_ids(experts, "experts");
  check_same_device(scores, experts, "scores", "experts");
  SeqLossShape s;
  s.N = scores.size(0);
  s.E = scores.size(1);
  s.k = experts.size(1);
  s.B = num_sequences;
  TORCH_CHECK(s.E >= 1, "moeyard: scores must have at least one expert column, got shape ",
              scores.sizes());
  TORCH_CHECK(experts.size(0) == s.N, "moeyard: experts has ", experts.size(0),
              " rows but scores has N=", s.N);
  TORCH_CHECK(s.k >= 1, "moeyard: experts must have at least one slot (k >= 1), got shape ",
              experts.sizes());
  TORCH_CHECK(num_sequences >= 1, "moeyard: num_sequences must be >= 1, got ", num_sequences);
  TORCH_CHECK(s.N % num_sequences == 0, "moeyard: num_sequences=", num_sequences,
              " must divide the number of tokens N=", s.N);
  s.S = s.N / s.B;
  check_int32_range(s.N * s.E, "N*E");
  check_int32_range(s.N * s.k, "N*k");
  return s;
}

}  // namespace moeyard
