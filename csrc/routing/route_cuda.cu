// route / relu_route on the GPU: one fused kernel, one warp per token.
//
// Each lane holds VPL = ceil(E/32) logits of the token in registers (expert e = lane + 32*i) with
// their 32-bit selection keys (common/order.h: NaN lowest, 0 = taken/excluded). Softmax max/sum
// are warp shuffles. Group-limited routing: per group a warp-wide top-2 (REDUX max), the group
// keys in shared memory, the topk_group best groups kept, the rest of the keys zeroed. Top-k: k
// rounds of two single-instruction warp reductions (__reduce_max_sync on the key, then
// __reduce_min_sync on the expert id among the lanes holding that key: ties to the lower id); the
// winning lane clears its key and rescans its VPL registers. Selected logits go to shared memory,
// weights are computed by lanes j < k. Bytes: T*E*sizeof(logit) read, T*k*(4+sizeof(weight))
// written; per token O(E/32 + k*(VPL + 2)) instructions per lane. E <= 1024 (VPL <= 32).
// Shared memory per warp: k*(4 + sizeof(acc)) + n_group*9 bytes.
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "routing/route.h"

namespace moeyard {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxSmemPerBlock = 48 * 1024;
constexpr int64_t kMaxExperts = 1024;

template <typename acc_t>
__host__ __device__ int64_t route_smem_per_warp(const RouteParams& p) {
  return (p.k * (4 + static_cast<int64_t>(sizeof(acc_t))) + p.n_group * 9 + 15) / 16 * 16;
}

template <int VPL, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_kernel(RouteParams p, const scalar_t* __restrict__ logits,
                 const float* __restrict__ bias, acc_t* __restrict__ weights,
                 int32_t* __restrict__ experts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = static_cast<int>(p.E), k = static_cast<int>(p.k);
  const int G = static_cast<int>(p.n_group), gs = E / G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* base = smem_raw + warp * route_smem_per_warp<acc_t>(p);
  uint64_t* gkeys = reinterpret_cast<uint64_t*>(base);  // [G] group keys
  acc_t* zsel = reinterpret_cast<acc_t*>(gkeys + G);     // [k] logits of the selected experts
  int32_t* sel = reinterpret_cast<int32_t*>(zsel + k);   // [k] selected experts
  uint8_t* gkept = reinterpret_cast<uint8_t*>(sel + k);  // [G] group kept?

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.T) return;
  const scalar_t* row = logits + t * E;

  acc_t z[VPL];
  acc_t m = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    z[i] = e < E ? static_cast<acc_t>(to_float(row[e])) : acc_t(-INFINITY);
    m = nan_max(m, z[i]);
  }
  m = warp_nan_max(m);
  acc_t sum = 0;
  if (p.score == Score::Softmax) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) sum += lane + 32 * i < E ? exp(z[i] - m) : acc_t(0);
    sum = warp_sum(sum);
  }
  auto score = [&](acc_t zv) -> acc_t {
    return p.score == Score::Softmax ? exp(zv - m) / sum : pointwise_score(zv, p.score);
  };
  uint32_t key[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    float v = p.key_on_logits() ? static_cast<float>(z[i]) : static_cast<float>(score(z[i]));
    if (bias != nullptr && e < E) v += bias[e];
    key[i] = e < E ? order_bits(v) : 0u;
  }

  if (G > 1) {
    for (int g = 0; g < G; ++g) {  // group value: sum of its two best selection values
      uint32_t b1 = 0, b2 = 0;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && e / gs == g) {
          if (key[i] > b1) { b2 = b1; b1 = key[i]; } else if (key[i] > b2) { b2 = key[i]; }
        }
      }
      const uint32_t w1 = __reduce_max_sync(kFullMask, b1);
      const bool tie = __popc(__ballot_sync(kFullMask, b1 == w1)) > 1;
      const uint32_t w2 = tie ? w1 : __reduce_max_sync(kFullMask, b1 == w1 ? b2 : b1);
      if (lane == 0) {
        const float v1 = order_value(w1), v2 = gs > 1 ? order_value(w2) : 0.f;
        gkeys[g] = pack_key((v1 != v1 ? -INFINITY : v1) + (v2 != v2 ? -INFINITY : v2), g);
      }
    }
    __syncwarp();
    for (int g = lane; g < G; g += 32) {  // kept when fewer than topk_group groups beat it
      int better = 0;
      for (int h = 0; h < G; ++h) better += gkeys[h] > gkeys[g];
      gkept[g] = better < p.topk_group;
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E && !gkept[e / gs]) key[i] = 0u;
    }
  }

  // k rounds of warp argmax: max key, then the lowest expert id holding it.
  uint32_t best = 0;
  int best_i = 0;
  auto rescan = [&] {
    best = 0;
    best_i = 0;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
      if (key[i] > best) { best = key[i]; best_i = i; }
  };
  rescan();
  for (int j = 0; j < k; ++j) {
    const uint32_t top = __reduce_max_sync(kFullMask, best);
    const uint32_t win = __reduce_min_sync(
        kFullMask, best == top ? static_cast<uint32_t>(lane + 32 * best_i) : 0xffffffffu);
    if (static_cast<int>(win & 31u) == lane) {
      acc_t zw = 0;
#pragma unroll
      for (int i = 0; i < VPL; ++i)
        if (i == best_i) { zw = z[i]; key[i] = 0u; }
      sel[j] = static_cast<int32_t>(win);
      zsel[j] = zw;
      rescan();
    }
  }
  __syncwarp();

  // Weights of the selected experts.
  acc_t* w = weights + t * k;
  int32_t* ex = experts + t * k;
  if (p.topk_before_score) {  // softmax over the k selected logits
    acc_t mk = -INFINITY, sk = 0;
    for (int j = lane; j < k; j += 32) mk = nan_max(mk, zsel[j]);
    mk = warp_nan_max(mk);
    for (int j = lane; j < k; j += 32) sk += exp(zsel[j] - mk);
    sk = warp_sum(sk);
    for (int j = lane; j < k; j += 32) {
      w[j] = exp(zsel[j] - mk) / sk * static_cast<acc_t>(p.scale);
      ex[j] = sel[j];
    }
    return;
  }
  acc_t sk = 0;
  for (int j = lane; j < k; j += 32) sk += score(zsel[j]);
  sk = warp_sum(sk);
  const acc_t norm = p.renormalize ? static_cast<acc_t>(p.scale) / (sk + acc_t(1e-20))
                                   : static_cast<acc_t>(p.scale);
  for (int j = lane; j < k; j += 32) {
    const acc_t v = score(zsel[j]);
    const bool inactive = p.score == Score::Relu && !(v > 0);
    w[j] = inactive ? acc_t(0) : v * norm;
    ex[j] = inactive ? -1 : sel[j];
  }
}

template <int VPL, typename scalar_t, typename acc_t>
void launch_route(const RouteParams& p, const scalar_t* logits, const float* bias, acc_t* weights,
                  int32_t* experts) {
  const int64_t smem = route_smem_per_warp<acc_t>(p) * kWarpsPerBlock;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kWarpsPerBlock)));
  route_kernel<VPL, scalar_t, acc_t><<<grid, kWarpsPerBlock * 32, smem,
                                       at::cuda::getCurrentCUDAStream()>>>(p, logits, bias,
                                                                           weights, experts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> route_cuda_impl(const at::Tensor& logits_in, const RouteParams& p,
                                                   const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  TORCH_CHECK(p.E <= kMaxExperts, "moeyard: route on CUDA supports up to ", kMaxExperts,
              " experts, got E=", p.E);
  auto logits = logits_in.contiguous();
  auto [weights, experts] = route_outputs(logits, p.k);
  if (p.T == 0) return {weights, experts};
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "route_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    TORCH_CHECK(route_smem_per_warp<acc_t>(p) * kWarpsPerBlock <= kMaxSmemPerBlock,
                "moeyard: route on CUDA: k=", p.k, " with n_group=", p.n_group,
                " needs more shared memory than a block has");
    const auto* x = logits.const_data_ptr<scalar_t>();
    const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
    auto* w = weights.mutable_data_ptr<acc_t>();
    auto* e = experts.mutable_data_ptr<int32_t>();
    if (p.E <= 32) launch_route<1>(p, x, bp, w, e);
    else if (p.E <= 64) launch_route<2>(p, x, bp, w, e);
    else if (p.E <= 128) launch_route<4>(p, x, bp, w, e);
    else if (p.E <= 256) launch_route<8>(p, x, bp, w, e);
    else if (p.E <= 512) launch_route<16>(p, x, bp, w, e);
    else launch_route<32>(p, x, bp, w, e);
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
