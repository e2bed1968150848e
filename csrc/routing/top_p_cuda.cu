// top_p_route on the GPU: one warp per token, no shared memory.
//
// Each lane holds VPL = ceil(E/32) logits of the token in registers (expert e = lane + 32*i) with
// their 32-bit selection keys (common/order.h on the logits: larger first, NaN lowest, 0 = taken).
// Softmax max and sum are warp shuffles. Then slot by slot, as route's top-k: the warp's largest
// key (__reduce_max_sync) and the lowest expert id holding it (__reduce_min_sync); the winning
// lane's probability exp(z - max) / sum is broadcast by a shuffle, so every lane adds the same
// values in the same order to the running sum and takes the same decision; slot j is kept while
// the probabilities of slots 0..j-1 sum to at most p. The first slot not kept ends the loop and
// the warp fills the remaining slots with -1 / 0. Bytes: T*E*sizeof(logit) read, T*k_max*(4 +
// sizeof(weight)) written; per token O(E/32 + n*(VPL + 3)) instructions per lane for the n slots
// kept (plus one). E <= 1024 (VPL <= 32).
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "routing/route.h"

namespace moeyard {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxExperts = 1024;

template <int VPL, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    top_p_kernel(TopPParams p, const scalar_t* __restrict__ logits, acc_t* __restrict__ weights,
                 int32_t* __restrict__ experts) {
  const int E = static_cast<int>(p.E), k = static_cast<int>(p.k);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.T) return;
  const scalar_t* row = logits + t * E;

  acc_t z[VPL];
  uint32_t key[VPL];
  acc_t m = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    z[i] = e < E ? static_cast<acc_t>(to_float(row[e])) : acc_t(-INFINITY);
    key[i] = e < E ? order_bits(static_cast<float>(z[i])) : 0u;
    m = nan_max(m, z[i]);
  }
  m = warp_nan_max(m);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) sum += lane + 32 * i < E ? exp(z[i] - m) : acc_t(0);
  sum = warp_sum(sum);

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
  acc_t* w = weights + t * k;
  int32_t* ex = experts + t * k;
  acc_t before = 0;  // probability of the slots already kept: the same in every lane
  int j = 0;
  for (; j < k && top_p_keeps(before, p.p); ++j) {
    const uint32_t top = __reduce_max_sync(kFullMask, best);
    const uint32_t win = __reduce_min_sync(
        kFullMask, best == top ? static_cast<uint32_t>(lane + 32 * best_i) : 0xffffffffu);
    acc_t zw = 0;
#pragma unroll
    for (int i = 0; i < VPL; ++i)
      if (i == best_i) zw = z[i];
    const acc_t prob = __shfl_sync(kFullMask, exp(zw - m) / sum, static_cast<int>(win & 31u));
    if (static_cast<int>(win & 31u) == lane) {
#pragma unroll
      for (int i = 0; i < VPL; ++i)
        if (i == best_i) key[i] = 0u;
      w[j] = prob;
      ex[j] = static_cast<int32_t>(win);
      rescan();
    }
    before += prob;
  }
  for (int jj = j + lane; jj < k; jj += 32) {
    w[jj] = acc_t(0);
    ex[jj] = -1;
  }
}

template <int VPL, typename scalar_t, typename acc_t>
void launch_top_p(const TopPParams& p, const scalar_t* logits, acc_t* weights, int32_t* experts) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kWarpsPerBlock)));
  top_p_kernel<VPL, scalar_t, acc_t><<<grid, kWarpsPerBlock * 32, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(p, logits, weights,
                                                                           experts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> top_p_route_cuda(const at::Tensor& logits_in, double p,
                                                    int64_t k_max) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto tp = check_top_p_args(logits_in, p, k_max);
  TORCH_CHECK(tp.E <= kMaxExperts, "moeyard: top_p_route on CUDA supports up to ", kMaxExperts,
              " experts, got E=", tp.E);
  auto logits = logits_in.contiguous();
  auto [weights, experts] = route_outputs(logits, tp.k);
  if (tp.T == 0) return {weights, experts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "top_p", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const auto* x = logits.const_data_ptr<scalar_t>();
    auto* w = weights.mutable_data_ptr<acc_t>();
    auto* e = experts.mutable_data_ptr<int32_t>();
    if (tp.E <= 32) launch_top_p<1>(tp, x, w, e);
    else if (tp.E <= 64) launch_top_p<2>(tp, x, w, e);
    else if (tp.E <= 128) launch_top_p<4>(tp, x, w, e);
    else if (tp.E <= 256) launch_top_p<8>(tp, x, w, e);
    else if (tp.E <= 512) launch_top_p<16>(tp, x, w, e);
    else launch_top_p<32>(tp, x, w, e);
  });
  return {weights, experts};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { m.impl("top_p_route", &top_p_route_cuda); }

}  // namespace moeyard
