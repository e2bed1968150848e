// sparsemixer and its backward on the CPU: one token per iteration, tokens in parallel.
//
// Layout: logits [T,E] (any float dtype, read as fp32, fp64 for fp64), noise [T,2,E+1] fp32
// (per slot: E Gumbel perturbations, then one uniform draw), weights [T,2] fp32/fp64, experts
// [T,2] int32, all contiguous (inputs are made so). Per token and slot: one pass for the slot's
// maximum (expert 1 excluded in slot 2), one for the window mask, the softmax sum and the two
// selection keys (sampled and plain argmax, common/order.h). O(E) per token, no scratch beyond
// the token's E logits. The backward recomputes each slot's masked softmax from the logits and the
// chosen experts: grad[e] = sum_j g_j p_j[e_j] (onehot(e_j)[e] - p_j[e]), O(E) per token.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "routing/sparsemixer.h"

namespace moeyard {
namespace {

// One slot's softmax over its window: the maximum m of the candidates (every expert but
// `excluded`, NaN if one is NaN) and sum of exp(z - m) over the candidates inside the window.
template <typename acc_t>
struct Window {
  acc_t m, sum;
};

template <typename acc_t>
Window<acc_t> slot_window(const std::vector<acc_t>& z, int64_t excluded, acc_t two_eps) {
  const int64_t E = static_cast<int64_t>(z.size());
  acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    if (e == excluded) continue;
    nan |= z[e] != z[e];
    m = std::max(m, z[e]);
  }
  if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t e = 0; e < E; ++e)
    if (e != excluded && !sparsemixer_masked(z[e], m, two_eps)) sum += std::exp(z[e] - m);
  return {m, sum};
}

// p_j[e] of a slot: the masked softmax (0 outside the window and for the excluded expert).
template <typename acc_t>
acc_t window_prob(acc_t z, const Window<acc_t>& w, acc_t two_eps) {
  return sparsemixer_masked(z, w.m, two_eps) ? acc_t(0) : std::exp(z - w.m) / w.sum;
}

template <typename scalar_t>
void sparsemixer_cpu_kernel(const SparsemixerParams& p, const scalar_t* logits, const float* noise,
                            acc_type_t<scalar_t>* weights, int32_t* experts) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t E = p.E;
  const acc_t two_eps = static_cast<acc_t>(p.two_eps);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) z[e] = static_cast<acc_t>(logits[t * E + e]);
      int64_t excluded = -1;
      for (int64_t j = 0; j < 2; ++j) {
        const auto w = slot_window(z, excluded, two_eps);
        const float* g = p.training ? noise + (t * 2 + j) * (E + 1) : nullptr;
        uint64_t best = 0, sampled = 0;  // argmax of the window, and of window + Gumbel
        for (int64_t e = 0; e < E; ++e) {
          if (e == excluded) continue;
          const auto id = static_cast<uint32_t>(e);
          best = std::max(best, pack_key(static_cast<float>(z[e]), id));
          if (g != nullptr) {
            const float v = sparsemixer_masked(z[e], w.m, two_eps)
                                ? kNegInf
                                : static_cast<float>(z[e] + static_cast<acc_t>(g[e]));
            sampled = std::max(sampled, pack_key(v, id));
          }
        }
        const int64_t chosen = key_index(g != nullptr ? sampled : best);
        acc_t weight = window_prob(z[chosen], w, two_eps);
        if (g != nullptr) weight *= midpoint_scale<acc_t>(chosen, key_index(best), g[E]);
        weights[t * 2 + j] = weight;
        experts[t * 2 + j] = static_cast<int32_t>(chosen);
        excluded = chosen;
      }
    }
  });
}

template <typename scalar_t>
void sparsemixer_backward_cpu_kernel(const SparsemixerParams& p, const acc_type_t<scalar_t>* grad,
                                     const scalar_t* logits, const int32_t* experts,
                                     scalar_t* grad_logits) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t E = p.E;
  const acc_t two_eps = static_cast<acc_t>(p.two_eps);
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z(E), dz(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        z[e] = static_cast<acc_t>(logits[t * E + e]);
        dz[e] = 0;
      }
      int64_t excluded = -1;
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t chosen = experts[t * 2 + j];
        const auto w = slot_window(z, excluded, two_eps);
        const acc_t c = grad[t * 2 + j] * window_prob(z[chosen], w, two_eps);
        for (int64_t e = 0; e < E; ++e)
          if (e != excluded) dz[e] -= c * window_prob(z[e], w, two_eps);
        dz[chosen] += c;
        excluded = chosen;
      }
      for (int64_t e = 0; e < E; ++e) grad_logits[t * E + e] = static_cast<scalar_t>(dz[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparsemixer_cpu(const at::Tensor& logits_in, double jitter_eps,
                                                   const std::optional<at::Tensor>& noise_in) {
  const auto p = check_sparsemixer_args(logits_in, jitter_eps, noise_in);
  auto logits = logits_in.contiguous();
  auto [weights, experts] = sparsemixer_outputs(logits);
  if (p.T == 0) return {weights, experts};
  at::Tensor noise = p.training ? noise_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparsemixer_cpu", [&] {
        sparsemixer_cpu_kernel<scalar_t>(p, logits.const_data_ptr<scalar_t>(),
                                         p.training ? noise.const_data_ptr<float>() : nullptr,
                                         weights.mutable_data_ptr<acc_type_t<scalar_t>>(),
                                         experts.mutable_data_ptr<int32_t>());
      });
  return {weights, experts};
}

at::Tensor sparsemixer_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                    const at::Tensor& experts_in, double jitter_eps) {
  const auto p = check_sparsemixer_backward_args(grad_in, logits_in, experts_in, jitter_eps);
  auto logits = logits_in.contiguous();
  auto grad = grad_in.contiguous();
  auto experts = experts_in.contiguous();
  const int32_t* ex = experts.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < p.T * 2; ++i)
    TORCH_CHECK(ex[i] >= 0 && ex[i] < p.E, "moeyard: experts[", i / 2, ", ", i % 2, "] = ", ex[i],
                " is not an expert id in [0, E=", p.E, ")");
  auto grad_logits = at::empty_like(logits);
  if (p.T == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparsemixer_backward_cpu", [&] {
        sparsemixer_backward_cpu_kernel<scalar_t>(p, grad.const_data_ptr<acc_type_t<scalar_t>>(),
                                                  logits.const_data_ptr<scalar_t>(), ex,
                                                  grad_logits.mutable_data_ptr<scalar_t>());
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("sparsemixer", &sparsemixer_cpu);
  m.impl("_sparsemixer_backward", &sparsemixer_backward_cpu);
}

}  // namespace moeyard
