// Shared by plan_{cpu,cuda} and expert_choice_{cpu,cuda}: argument checks and output allocation,
// so the CPU and CUDA kernels accept the same inputs and return the same shapes and dtypes.
// Semantics: python/moeyard/reference.py (plan, _token_priority, expert_choice).
//
// A plan maps each assignment (token t, slot j) of a routing to one row of the expert-ordered
// buffer: counts [E] (assignments per expert before drops), offsets [E+1] (exclusive cumsum of the
// kept rows), row_source [R] (t*k + j of each row, -1 unused) and token_row [T,k] (row of each
// assignment, -1 dropped or no expert), all int32. The routing itself may be int32 or int64.
#pragma once
#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "common/checks.h"

namespace moeyard {

struct PlanParams {
  int64_t T = 0, k = 0, E = 0;
  int64_t C = -1;  // capacity; -1 = dropless
  DropPolicy policy = DropPolicy::Position;
  int64_t R = 0;  // rows: T*k dropless, E*C with a capacity
  bool dropless() const { return C < 0; }
};

inline PlanParams check_plan_args(const at::Tensor& experts, int64_t num_experts,
                                  std::optional<int64_t> capacity, const std::string& drop_policy,
                                  const std::optional<at::Tensor>& weights) {
  check_rank(experts, 2, "experts");
  check_expert_ids(experts, "experts");
  PlanParams p;
  p.T = experts.size(0);
  p.k = experts.size(1);
  p.E = num_experts;
  p.policy = parse_drop_policy(drop_policy);
  TORCH_CHECK(num_experts >= 1, "moeyard: num_experts must be >= 1, got ", num_experts);
  check_int32_range(num_experts, "num_experts");
  check_int32_range(p.T * p.k, "T*k");
  if (capacity.has_value()) {
    TORCH_CHECK(*capacity >= 0, "moeyard: capacity must be >= 0 (or None for dropless), got ",
                *capacity);
    check_int32_range(*capacity, "capacity");  // so that E*C below cannot overflow int64
    check_int32_range(p.E * *capacity, "num_experts*capacity");
    p.C = *capacity;
    p.R = p.E * p.C;
  } else {
    p.R = p.T * p.k;
  }
  // weights are read only for 'score', but are an argument like any other: on experts' device.
  if (weights.has_value()) check_same_device(experts, *weights, "experts", "weights");
  if (p.policy == DropPolicy::Score) {
    TORCH_CHECK(weights.has_value(),
                "moeyard: drop_policy='score' needs the routing weights [T,k], got weights=None");
    const auto& w = *weights;
    check_rank(w, 2, "weights");
    check_float(w, "weights");
    TORCH_CHECK(w.size(0) == p.T && w.size(1) == p.k, "moeyard: weights must have the shape of "
                "experts ", experts.sizes(), ", got ", w.sizes());
  }
  return p;
}

// counts [E], offsets [E+1], row_source [R], token_row [T,k]: int32 on experts' device, unfilled.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_outputs(
    const at::Tensor& experts, const PlanParams& p) {
  const auto opts = experts.options().dtype(at::kInt);
  return {at::empty({p.E}, opts), at::empty({p.E + 1}, opts), at::empty({p.R}, opts),
          at::empty({p.T, p.k}, opts)};
}

// --- expert choice ---

struct ExpertChoiceParams {
  int64_t T = 0, E = 0, C = 0;
  int64_t take = 0;  // tokens each expert takes: min(C, T)
};

inline ExpertChoiceParams check_expert_choice_args(const at::Tensor& scores, int64_t capacity) {
  check_rank(scores, 2, "scores");
  check_float(scores, "scores");
  ExpertChoiceParams p;
  p.T = scores.size(0);
  p.E = scores.size(1);
  p.C = capacity;
  TORCH_CHECK(capacity >= 0, "moeyard: capacity must be >= 0, got ", capacity);
  check_int32_range(p.E, "E");
  check_int32_range(capacity, "capacity");  // so that E*C below cannot overflow int64
  check_int32_range(p.E * p.C, "E*capacity");
  check_int32_range(p.T * p.E, "T*E");
  p.take = std::min(p.C, p.T);
  return p;
}

// weights [T,E] (fp64 for fp64 scores, else fp32), experts [T,E], counts [E], offsets [E+1],
// row_source [E*C], token_row [T,E]. counts and offsets are filled here (every expert takes
// min(C,T) tokens; expert e's rows start at e*C); the others are left for the kernel.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expert_choice_outputs(const at::Tensor& scores, const ExpertChoiceParams& p) {
  const auto wdtype = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto iopts = scores.options().dtype(at::kInt);
  auto counts = at::full({p.E}, p.take, iopts);
  auto offsets = at::arange(p.E + 1, iopts).mul_(p.take);  // E*take <= E*C fits int32
  return {at::empty({p.T, p.E}, scores.options().dtype(wdtype)), at::empty({p.T, p.E}, iopts),
          counts, offsets, at::empty({p.E * p.C}, iopts), at::empty({p.T, p.E}, iopts)};
}

}  // namespace moeyard
