// expert_choice on the CPU: expert e takes its take = min(C, T) best tokens by scores[:, e]
// (compared in fp32, larger first, NaN last, ties to the lower token: common/order.h), and the
// result is returned both as router outputs and as the plan of those choices (R = E*C rows).
//
// Pass 1, experts in parallel: partial sort of the T packed 64-bit keys of column e; the i-th best
// token gets row e*C + i, recorded in row_of [T,E] (-1 = not chosen).
// Pass 2, tokens in parallel: the experts that took token t, in ascending id, fill slots
// j = 0, 1, ... of weights/experts/token_row [T,E] (-1 / 0 after them); row_source[row] = t*E + j.
// Rows e*C + i with i >= take stay -1. Work O(E * T log take + T*E); memory T*E int32 scratch.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/order.h"
#include "routing/plan.h"

namespace moeyard {
namespace {

template <typename scalar_t, typename acc_t>
void expert_choice_cpu_kernel(const ExpertChoiceParams& p, const scalar_t* scores, acc_t* weights,
                              int32_t* experts, int32_t* row_source, int32_t* token_row) {
  const int64_t T = p.T, E = p.E, C = p.C, take = p.take;
  std::vector<int32_t> row_of(T * E, -1);
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(T);
    for (int64_t e = begin; e < end; ++e) {
      for (int64_t t = 0; t < T; ++t)
        keys[t] = pack_key(static_cast<float>(scores[t * E + e]), static_cast<uint32_t>(t));
      std::partial_sort(keys.begin(), keys.begin() + take, keys.end(), std::greater<>());
      for (int64_t i = 0; i < take; ++i)
        row_of[static_cast<int64_t>(key_index(keys[i])) * E + e] = static_cast<int32_t>(e * C + i);
      for (int64_t i = take; i < C; ++i) row_source[e * C + i] = -1;
    }
  });
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t j = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int32_t r = row_of[t * E + e];
        if (r < 0) continue;
        weights[t * E + j] = static_cast<acc_t>(scores[t * E + e]);
        experts[t * E + j] = static_cast<int32_t>(e);
        token_row[t * E + j] = r;
        row_source[r] = static_cast<int32_t>(t * E + j);
        ++j;
      }
      for (; j < E; ++j) {
        weights[t * E + j] = acc_t(0);
        experts[t * E + j] = -1;
        token_row[t * E + j] = -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expert_choice_cpu(const at::Tensor& scores_in, int64_t capacity) {
  const ExpertChoiceParams p = check_expert_choice_args(scores_in, capacity);
  auto scores = scores_in.contiguous();
  auto [weights, experts, counts, offsets, row_source, token_row] = expert_choice_outputs(scores, p);
  if (p.T == 0 || p.E == 0) {
    row_source.fill_(-1);
    return {weights, experts, counts, offsets, row_source, token_row};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "expert_choice_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    expert_choice_cpu_kernel<scalar_t, acc_t>(
        p, scores.const_data_ptr<scalar_t>(), weights.mutable_data_ptr<acc_t>(),
        experts.mutable_data_ptr<int32_t>(), row_source.mutable_data_ptr<int32_t>(),
        token_row.mutable_data_ptr<int32_t>());
  });
  return {weights, experts, counts, offsets, row_source, token_row};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { m.impl("expert_choice", &expert_choice_cpu); }

}  // namespace moeyard
