// route / relu_route on the CPU: one token per iteration, tokens in parallel.
// Per token: scores, selection keys (common/order.h), optional group limit, top-k by partial sort of
// unique 64-bit keys, then weights. O(E log k) per token.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "routing/route.h"

namespace moeyard {
namespace {

template <typename scalar_t>
void route_cpu_kernel(const RouteParams& p, const scalar_t* logits, const float* bias,
                      acc_type_t<scalar_t>* weights, int32_t* experts) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t E = p.E, k = p.k, G = p.n_group, gs = E / G;
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(E);
    std::vector<float> kv(E);  // selection value of each expert
    std::vector<uint64_t> keys(E), gkeys(G), top;
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* row = logits + t * E;
      acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
      bool nan = false;
      for (int64_t e = 0; e < E; ++e) {
        z[e] = static_cast<acc_t>(row[e]);
        nan |= z[e] != z[e];
        m = std::max(m, z[e]);
      }
      if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
      auto score = [&](int64_t e) -> acc_t {
        if (p.score == Score::Softmax) return std::exp(z[e] - m) / sum;
        return pointwise_score(z[e], p.score);
      };
      if (p.score == Score::Softmax)
        for (int64_t e = 0; e < E; ++e) sum += std::exp(z[e] - m);
      for (int64_t e = 0; e < E; ++e) {
        kv[e] = p.key_on_logits() ? static_cast<float>(z[e]) : static_cast<float>(score(e));
        if (bias) kv[e] += bias[e];
        keys[e] = pack_key(kv[e], static_cast<uint32_t>(e));
      }
      if (G > 1) {  // group score: sum of the group's two best keys (NaN counts as -inf)
        for (int64_t g = 0; g < G; ++g) {
          top.assign(keys.begin() + g * gs, keys.begin() + (g + 1) * gs);
          const int64_t n = std::min<int64_t>(2, gs);
          std::partial_sort(top.begin(), top.begin() + n, top.end(), std::greater<>());
          float gv = 0.f;
          for (int64_t i = 0; i < n; ++i) {
            const float v = kv[key_index(top[i])];
            gv += v != v ? -std::numeric_limits<float>::infinity() : v;
          }
          gkeys[g] = pack_key(gv, static_cast<uint32_t>(g));
        }
        std::vector<uint64_t> sorted(gkeys);
        std::nth_element(sorted.begin(), sorted.begin() + (p.topk_group - 1), sorted.end(),
                         std::greater<>());
        const uint64_t cut = sorted[p.topk_group - 1];
        for (int64_t g = 0; g < G; ++g)
          if (gkeys[g] < cut) std::fill(keys.begin() + g * gs, keys.begin() + (g + 1) * gs, 0);
      }
      std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<>());

      acc_t* w = weights + t * k;
      int32_t* ex = experts + t * k;
      for (int64_t j = 0; j < k; ++j) ex[j] = static_cast<int32_t>(key_index(keys[j]));
      if (p.topk_before_score) {  // softmax over the k selected logits
        acc_t mk = z[ex[0]], sk = 0;
        for (int64_t j = 0; j < k; ++j) mk = std::max(mk, z[ex[j]]);
        if (nan) mk = std::numeric_limits<acc_t>::quiet_NaN();
        for (int64_t j = 0; j < k; ++j) sk += (w[j] = std::exp(z[ex[j]] - mk));
        for (int64_t j = 0; j < k; ++j) w[j] = w[j] / sk * static_cast<acc_t>(p.scale);
        continue;
      }
      acc_t sk = 0;
      for (int64_t j = 0; j < k; ++j) sk += (w[j] = score(ex[j]));
      const acc_t norm = p.renormalize ? static_cast<acc_t>(p.scale) / (sk + acc_t(1e-20))
                                       : static_cast<acc_t>(p.scale);
      for (int64_t j = 0; j < k; ++j) {
        if (p.score == Score::Relu && !(w[j] > 0)) {
          w[j] = 0;
          ex[j] = -1;
        } else {
          w[j] *= norm;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> route_cpu_impl(const at::Tensor& logits_in, const RouteParams& p,
                                                  const std::optional<at::Tensor>& bias) {
  auto logits = logits_in.contiguous();
  auto [weights, experts] = route_outputs(logits, p.k);
  if (p.T == 0) return {weights, experts};
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_cpu", [&] {
    route_cpu_kernel<scalar_t>(p, logits.const_data_ptr<scalar_t>(),
                               b.defined() ? b.const_data_ptr<float>() : nullptr,
                               weights.mutable_data_ptr<acc_type_t<scalar_t>>(),
                               experts.mutable_data_ptr<int32_t>());
  });
  return {weights, experts};
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t k,
                                             c10::string_view score, bool topk_before_score,
                                             const std::optional<at::Tensor>& bias,
                                             int64_t n_group, int64_t topk_group, bool renormalize,
                                             double scale) {
  auto p = check_route_args(logits, k, std::string(score), topk_before_score, bias, n_group,
                            topk_group, renormalize, scale);
  return route_cpu_impl(logits, p, bias);
}

std::tuple<at::Tensor, at::Tensor> relu_route_cpu(const at::Tensor& logits, int64_t k_max) {
  return route_cpu_impl(logits, relu_route_params(logits, k_max), std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("route", &route_cpu);
  m.impl("relu_route", &relu_route_cpu);
}

}  // namespace moeyard
