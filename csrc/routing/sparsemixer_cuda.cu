// sparsemixer and its backward on the GPU: one warp per token, kWarpsPerBlock tokens per block.
//
// Layout: logits [T,E] (any float dtype; fp32 math, fp64 for fp64), noise [T,2,E+1] fp32 (per
// slot: E Gumbel perturbations, then one uniform draw), weights [T,2] fp32/fp64, experts [T,2]
// int32, all contiguous. Each lane holds VPL = ceil(E/32) logits in registers (expert
// e = lane + 32*i). Per slot: warp max (NaN-propagating) of the candidates (expert 1 excluded in
// slot 2), warp sum of exp(z - max) inside the sparsity window, and warp argmaxes of packed 64-bit
// keys (common/order.h: larger first, ties to the lower id, NaN lowest) for the plain and the
// Gumbel-perturbed window; the chosen logit is shuffled from its lane and lane 0 writes the slot.
// The backward recomputes both windows from the logits and the chosen experts and writes
// grad[e] = sum_j g_j p_j[e_j] (onehot(e_j)[e] - p_j[e]). Bytes: T*E*sizeof(logit) read (plus
// T*2*(E+1)*4 of noise in training), T*2*(4 + sizeof(weight)) written; the backward reads the
// logits and writes their gradient once. Per token O(VPL) instructions per lane per slot and
// O(log 32) shuffles. E <= 1024 (VPL <= 32). No shared memory, no host synchronization.
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "routing/sparsemixer.h"

namespace moeyard {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxExperts = 1024;

template <typename acc_t>
struct Window {
  acc_t m, sum;
};

// One slot's window over the warp's registers: the candidates' maximum and their sum of
// exp(z - m) inside the sparsity window (every expert but `excluded`).
template <int VPL, typename acc_t>
__device__ __forceinline__ Window<acc_t> slot_window(const acc_t (&z)[VPL], int lane, int E,
                                                     int excluded, acc_t two_eps) {
  acc_t m = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E && e != excluded) m = nan_max(m, z[i]);
  }
  m = warp_nan_max(m);
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E && e != excluded && !sparsemixer_masked(z[i], m, two_eps)) sum += exp(z[i] - m);
  }
  return {m, warp_sum(sum)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t window_prob(acc_t z, const Window<acc_t>& w, acc_t two_eps) {
  return sparsemixer_masked(z, w.m, two_eps) ? acc_t(0) : exp(z - w.m) / w.sum;
}

// The logit of expert e (held by lane e % 32 in register e / 32), on every lane.
template <int VPL, typename acc_t>
__device__ __forceinline__ acc_t logit_of(const acc_t (&z)[VPL], int e) {
  acc_t v = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i)
    if (i == e / 32) v = z[i];
  return __shfl_sync(kFullMask, v, e & 31);
}

template <int VPL, typename scalar_t>
__device__ __forceinline__ void load_row(acc_type_t<scalar_t> (&z)[VPL], const scalar_t* row,
                                         int lane, int E) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    z[i] = e < E ? static_cast<acc_type_t<scalar_t>>(to_float(row[e]))
                 : acc_type_t<scalar_t>(-INFINITY);
  }
}

template <int VPL, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sparsemixer_kernel(SparsemixerParams p, const scalar_t* __restrict__ logits,
                       const float* __restrict__ noise, acc_t* __restrict__ weights,
                       int32_t* __restrict__ experts) {
  const int E = static_cast<int>(p.E);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.T) return;
  const acc_t two_eps = static_cast<acc_t>(p.two_eps);
  acc_t z[VPL];
  load_row<VPL>(z, logits + t * E, lane, E);
  int excluded = -1;
  for (int j = 0; j < 2; ++j) {
    const Window<acc_t> w = slot_window<VPL>(z, lane, E, excluded, two_eps);
    const float* g = p.training ? noise + (t * 2 + j) * (E + 1) : nullptr;
    uint64_t best = 0, sampled = 0;  // argmax of the window, and of window + Gumbel
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      if (e >= E || e == excluded) continue;
      const uint64_t key = pack_key(static_cast<float>(z[i]), static_cast<uint32_t>(e));
      best = key > best ? key : best;
      if (g != nullptr) {
        const float v = sparsemixer_masked(z[i], w.m, two_eps)
                            ? -INFINITY
                            : static_cast<float>(z[i] + static_cast<acc_t>(g[e]));
        const uint64_t s = pack_key(v, static_cast<uint32_t>(e));
        sampled = s > sampled ? s : sampled;
      }
    }
    best = warp_max_u64(best);
    if (g != nullptr) sampled = warp_max_u64(sampled);
    const int chosen = static_cast<int>(key_index(g != nullptr ? sampled : best));
    const acc_t zc = logit_of<VPL>(z, chosen);
    if (lane == 0) {
      acc_t weight = window_prob(zc, w, two_eps);
      if (g != nullptr) weight *= midpoint_scale<acc_t>(chosen, key_index(best), g[E]);
      weights[t * 2 + j] = weight;
      experts[t * 2 + j] = chosen;
    }
    excluded = chosen;
  }
}

template <int VPL, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sparsemixer_backward_kernel(SparsemixerParams p, const acc_t* __restrict__ grad,
                                const scalar_t* __restrict__ logits,
                                const int32_t* __restrict__ experts,
                                scalar_t* __restrict__ grad_logits) {
  const int E = static_cast<int>(p.E);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.T) return;
  const acc_t two_eps = static_cast<acc_t>(p.two_eps);
  acc_t z[VPL], dz[VPL];
  load_row<VPL>(z, logits + t * E, lane, E);
#pragma unroll
  for (int i = 0; i < VPL; ++i) dz[i] = 0;
  int excluded = -1;
  for (int j = 0; j < 2; ++j) {
    const int chosen = experts[t * 2 + j];
    if (chosen < 0 || chosen >= E) continue;  // not an expert id (unchecked here: no host sync)
    const Window<acc_t> w = slot_window<VPL>(z, lane, E, excluded, two_eps);
    const acc_t c = grad[t * 2 + j] * window_prob(logit_of<VPL>(z, chosen), w, two_eps);
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int e = lane + 32 * i;
      if (e < E && e != excluded) dz[i] -= c * window_prob(z[i], w, two_eps);
      if (e == chosen) dz[i] += c;
    }
    excluded = chosen;
  }
  scalar_t* out = grad_logits + t * E;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    if (e < E) out[e] = static_cast<scalar_t>(dz[i]);
  }
}

// Calls f(std::integral_constant<int, VPL>) with the smallest VPL (registers per lane) for E.
template <typename F>
void with_vpl(int64_t E, F&& f) {
  if (E <= 32)
    f(std::integral_constant<int, 1>());
  else if (E <= 64)
    f(std::integral_constant<int, 2>());
  else if (E <= 128)
    f(std::integral_constant<int, 4>());
  else if (E <= 256)
    f(std::integral_constant<int, 8>());
  else if (E <= 512)
    f(std::integral_constant<int, 16>());
  else
    f(std::integral_constant<int, 32>());
}

void check_cuda_experts(const SparsemixerParams& p) {
  TORCH_CHECK(p.E <= kMaxExperts, "moeyard: sparsemixer on CUDA supports up to ", kMaxExperts,
              " experts, got E=", p.E);
}

std::tuple<at::Tensor, at::Tensor> sparsemixer_cuda(const at::Tensor& logits_in, double jitter_eps,
                                                    const std::optional<at::Tensor>& noise_in) {
  const auto p = check_sparsemixer_args(logits_in, jitter_eps, noise_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_cuda_experts(p);
  auto logits = logits_in.contiguous();
  auto [weights, experts] = sparsemixer_outputs(logits);
  if (p.T == 0) return {weights, experts};
  at::Tensor noise = p.training ? noise_in->contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kWarpsPerBlock)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparsemixer_cuda", [&] {
        using acc_t = acc_type_t<scalar_t>;
        with_vpl(p.E, [&](auto vpl) {
          sparsemixer_kernel<decltype(vpl)::value, scalar_t, acc_t>
              <<<grid, kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
                  p, logits.const_data_ptr<scalar_t>(),
                  p.training ? noise.const_data_ptr<float>() : nullptr,
                  weights.mutable_data_ptr<acc_t>(), experts.mutable_data_ptr<int32_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {weights, experts};
}

at::Tensor sparsemixer_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                     const at::Tensor& experts_in, double jitter_eps) {
  const auto p = check_sparsemixer_backward_args(grad_in, logits_in, experts_in, jitter_eps);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  check_cuda_experts(p);
  auto logits = logits_in.contiguous();
  auto grad = grad_in.contiguous();
  auto experts = experts_in.contiguous();
  auto grad_logits = at::empty_like(logits);
  if (p.T == 0) return grad_logits;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.T, kWarpsPerBlock)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparsemixer_backward_cuda", [&] {
        using acc_t = acc_type_t<scalar_t>;
        with_vpl(p.E, [&](auto vpl) {
          sparsemixer_backward_kernel<decltype(vpl)::value, scalar_t, acc_t>
              <<<grid, kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
                  p, grad.const_data_ptr<acc_t>(), logits.const_data_ptr<scalar_t>(),
                  experts.const_data_ptr<int32_t>(), grad_logits.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("sparsemixer", &sparsemixer_cuda);
  m.impl("_sparsemixer_backward", &sparsemixer_backward_cuda);
}

}  // namespace moeyard
