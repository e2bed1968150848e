// top_p_route on the CPU: one token per iteration, tokens in parallel.
// Per token: softmax of the row (max, sum of exp), the experts ordered by their logits (common/
// order.h keys: larger first, ties to the lower id, NaN last) by a partial sort of the k_max best,
// then slots 0, 1, ... filled while the probabilities already taken sum to at most p (summed in
// slot order in the accumulation type); the remaining slots get expert -1 and weight 0.
// O(E log k_max) per token; no scratch beyond two rows per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "routing/route.h"

namespace moeyard {
namespace {

template <typename scalar_t>
void top_p_cpu_kernel(const TopPParams& p, const scalar_t* logits, acc_type_t<scalar_t>* weights,
                      int32_t* experts) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t E = p.E, k = p.k;
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(E);
    std::vector<uint64_t> keys(E);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * E;
      acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
      bool nan = false;
      for (int64_t e = 0; e < E; ++e) {
        z[e] = static_cast<acc_t>(row[e]);
        nan |= z[e] != z[e];
        m = std::max(m, z[e]);
        keys[e] = pack_key(static_cast<float>(z[e]), static_cast<uint32_t>(e));
      }
      if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
      for (int64_t e = 0; e < E; ++e) sum += std::exp(z[e] - m);
      std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<>());

      acc_t* w = weights + t * k;
      int32_t* ex = experts + t * k;
      acc_t before = 0;  // probability of the slots already kept
      int64_t j = 0;
      for (; j < k && top_p_keeps(before, p.p); ++j) {
        const uint32_t e = key_index(keys[j]);
        w[j] = std::exp(z[e] - m) / sum;
        ex[j] = static_cast<int32_t>(e);
        before += w[j];
      }
      for (; j < k; ++j) {
        w[j] = 0;
        ex[j] = -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> top_p_route_cpu(const at::Tensor& logits_in, double p,
                                                   int64_t k_max) {
  const auto tp = check_top_p_args(logits_in, p, k_max);
  auto logits = logits_in.contiguous();
  auto [weights, experts] = route_outputs(logits, tp.k);
  if (tp.T == 0) return {weights, experts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "top_p_cpu", [&] {
    top_p_cpu_kernel<scalar_t>(tp, logits.const_data_ptr<scalar_t>(),
                               weights.mutable_data_ptr<acc_type_t<scalar_t>>(),
                               experts.mutable_data_ptr<int32_t>());
  });
  return {weights, experts};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { m.impl("top_p_route", &top_p_route_cpu); }

}  // namespace moeyard
