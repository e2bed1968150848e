// route / relu_route on the GPU: one fused kernel, one warp per token.
//
// The warp stages the token's logits and 64-bit selection keys (common/order.h) in shared memory,
// computes the softmax max/sum with shuffles, optionally keeps the topk_group best groups (group
// score = sum of its top-2 keys), then runs k rounds of a warp-wide max over the keys: each lane
// caches the best key of its strided slice and only the lane that lost its best rescans. Weights
// come from the selected logits. Bytes: T*E*sizeof(logit) read, T*k*8 written; work O(E + k*E/32)
// per lane. Shared memory per warp: E*(8 + sizeof(acc)) + k*4 + n_group*8 bytes.
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "routing/route.h"

namespace moeyard {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxSmemPerBlock = 48 * 1024;

template <typename scalar_t, typename acc_t>
__global__ void route_kernel(RouteParams p, const scalar_t* __restrict__ logits,
                             const float* __restrict__ bias, acc_t* __restrict__ weights,
                             int32_t* __restrict__ experts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = static_cast<int>(p.E), k = static_cast<int>(p.k);
  const int G = static_cast<int>(p.n_group), gs = E / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t per_warp = static_cast<size_t>(E) * (8 + sizeof(acc_t)) + k * 4 + G * 8;
  const size_t per_warp_aligned = (per_warp + 15) / 16 * 16;
  unsigned char* base = smem_raw + warp * per_warp_aligned;
  uint64_t* keys = reinterpret_cast<uint64_t*>(base);
  uint64_t* gkeys = keys + E;
  acc_t* z = reinterpret_cast<acc_t*>(gkeys + G);
  int32_t* sel = reinterpret_cast<int32_t*>(z + E);

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.T) return;
  const scalar_t* row = logits + t * E;

  acc_t m = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    z[e] = to_float(row[e]);
    m = nan_max(m, z[e]);
  }
  m = warp_nan_max(m);
  acc_t sum = 0;
  if (p.score == Score::Softmax) {
    for (int e = lane; e < E; e += 32) sum += exp(z[e] - m);
    sum = warp_sum(sum);
  }
  auto score = [&](int e) -> acc_t {
    return p.score == Score::Softmax ? exp(z[e] - m) / sum : pointwise_score(z[e], p.score);
  };
  auto key_value = [&](int e) -> float {
    float v = p.key_on_logits() ? static_cast<float>(z[e]) : static_cast<float>(score(e));
    return bias ? v + bias[e] : v;
  };
  for (int e = lane; e < E; e += 32) keys[e] = pack_key(key_value(e), e);
  __syncwarp();

  if (G > 1) {
    // Group scores: per group, a warp-wide top-2 of the keys; value = sum of the two key values.
    for (int g = 0; g < G; ++g) {
      uint64_t b1 = 0, b2 = 0;
      for (int i = lane; i < gs; i += 32) {
        const uint64_t kk = keys[g * gs + i];
        if (kk > b1) { b2 = b1; b1 = kk; } else if (kk > b2) { b2 = kk; }
      }
      const uint64_t w1 = warp_max_u64(b1);
      const uint64_t w2 = warp_max_u64(b1 == w1 ? b2 : b1);
      if (lane == 0) {
        float gv = 0.f;
        const int n = gs < 2 ? 1 : 2;
        for (int i = 0; i < n; ++i) {
          const float v = key_value(key_index(i == 0 ? w1 : w2));
          gv += v != v ? -INFINITY : v;
        }
        gkeys[g] = pack_key(gv, g);
      }
    }
    __syncwarp();
    // Keep the topk_group best groups: a group is kept when fewer than topk_group beat it.
    for (int g = lane; g < G; g += 32) {
      int better = 0;
      for (int h = 0; h < G; ++h) better += gkeys[h] > gkeys[g];
      if (better >= p.topk_group)
        for (int i = 0; i < gs; ++i) keys[g * gs + i] = 0;
    }
    __syncwarp();
  }

  // k rounds of warp argmax over the unique keys.
  uint64_t best = 0;
  for (int e = lane; e < E; e += 32) best = keys[e] > best ? keys[e] : best;
  for (int j = 0; j < k; ++j) {
    const uint64_t win = warp_max_u64(best);
    const int e = static_cast<int>(key_index(win));
    if (lane == 0) sel[j] = e;
    if ((e & 31) == lane) {
      keys[e] = 0;
      best = 0;
      for (int i = lane; i < E; i += 32) best = keys[i] > best ? keys[i] : best;
    }
  }
  __syncwarp();

  // Weights of the selected experts.
  acc_t* w = weights + t * k;
  int32_t* ex = experts + t * k;
  if (p.topk_before_score) {
    acc_t mk = -INFINITY, sk = 0;
    for (int j = lane; j < k; j += 32) mk = nan_max(mk, z[sel[j]]);
    mk = warp_nan_max(mk);
    for (int j = lane; j < k; j += 32) sk += exp(z[sel[j]] - mk);
    sk = warp_sum(sk);
    for (int j = lane; j < k; j += 32) {
      w[j] = exp(z[sel[j]] - mk) / sk * static_cast<acc_t>(p.scale);
      ex[j] = sel[j];
    }
    return;
  }
  acc_t sk = 0;
  for (int j = lane; j < k; j += 32) sk += score(sel[j]);
  sk = warp_sum(sk);
  const acc_t norm = p.renormalize ? static_cast<acc_t>(p.scale) / (sk + acc_t(1e-20))
                                   : static_cast<acc_t>(p.scale);
  for (int j = lane; j < k; j += 32) {
    const acc_t v = score(sel[j]);
    const bool inactive = p.score == Score::Relu && !(v > 0);
    w[j] = inactive ? acc_t(0) : v * norm;
    ex[j] = inactive ? -1 : sel[j];
  }
}

std::tuple<at::Tensor, at::Tensor> route_cuda_impl(const at::Tensor& logits_in, const RouteParams& p,
                                                   const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto [weights, experts] = route_outputs(logits, p.k);
  if (p.T == 0) return {weights, experts};
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t per_warp = p.E * (8 + sizeof(acc_t)) + p.k * 4 + p.n_group * 8;
    const int64_t smem = (per_warp + 15) / 16 * 16 * kWarpsPerBlock;
    TORCH_CHECK(smem <= kMaxSmemPerBlock, "moeyard: route on CUDA supports E up to about ",
                kMaxSmemPerBlock / kWarpsPerBlock / (8 + sizeof(acc_t) + 4), " experts, got E=", p.E);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kWarpsPerBlock)));
    route_kernel<scalar_t, acc_t><<<grid, kWarpsPerBlock * 32, smem,
                                    at::cuda::getCurrentCUDAStream()>>>(
        p, logits.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
        weights.mutable_data_ptr<acc_t>(), experts.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, experts};
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& logits, int64_t k,
                                              c10::string_view score, bool topk_before_score,
                                              const std::optional<at::Tensor>& bias,
                                              int64_t n_group, int64_t topk_group,
                                              bool renormalize, double scale) {
  auto p = check_route_args(logits, k, std::string(score), topk_before_score, bias, n_group,
                            topk_group, renormalize, scale);
  return route_cuda_impl(logits, p, bias);
}

std::tuple<at::Tensor, at::Tensor> relu_route_cuda(const at::Tensor& logits, int64_t k_max) {
  return route_cuda_impl(logits, relu_route_params(logits, k_max), std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("route", &route_cuda);
  m.impl("relu_route", &relu_route_cuda);
}

}  // namespace moeyard
