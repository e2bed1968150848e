// plan on the GPU: the dispatch plan of a routing (counts, offsets, row_source, token_row), with no
// host synchronization: every size is known from the shapes, all work is queued on the current
// stream.
//
// 1. count: histogram of the expert ids (shared-memory atomics per block, then one global atomic
//    per expert and block; global atomics when E does not fit in shared memory).
// 2. scan (one block): seg_start = exclusive cumsum of counts, offsets = exclusive cumsum of the
//    kept counts (min(count, C) with a capacity).
// 3. drop_policy 'score' only: token priority order = the T tokens sorted by confidence (max of
//    their weights over slots with an expert, NaN if any of those is NaN, -inf with none; order
//    bits of common/order.h, NaN last), a stable radix sort on the inverted 32-bit key so ties
//    keep the lower token first.
// 4. sort input i = j*T + q (slot-major priority), t = order[q]: key = expert of (t, j) (E for an
//    empty slot), value = t*k + j; stable radix sort on the key's low bits_for(E) bits, so each
//    expert's assignments stay in priority order and empty slots come last.
// 5. scatter: sorted position r of expert e, p = r - seg_start[e]; dropless row = r; with capacity
//    C row = e*C + p if p < C, else dropped. row_source is pre-filled with -1 only with a capacity
//    (dropless, every row is written).
// Unlike the CPU kernel, ids outside [-1, E) cannot be reported without a host synchronization:
// they are treated as -1 (not counted, no row, token_row -1, no weight in the confidence).
// Work O(T*k) (radix sort passes: ceil(bits_for(E) / 8)), temporaries ~ 16*T*k + 12*T bytes plus
// CUB's scratch.
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "common/cuda_utils.cuh"
#include "common/order.h"
#include "routing/plan.h"

namespace moeyard {
namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int64_t kMaxSmemHistogram = 48 * 1024;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

template <bool kShared>
__global__ void plan_count_kernel(const int32_t* __restrict__ experts, int64_t n, int32_t E,
                                  int32_t* __restrict__ counts) {
  extern __shared__ int32_t hist[];
  if (kShared) {
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int32_t e = experts[i];
    if (e >= 0 && e < E) atomicAdd(kShared ? &hist[e] : &counts[e], 1);
  }
  if (kShared) {
    __syncthreads();
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x)
      if (hist[e] != 0) atomicAdd(&counts[e], hist[e]);
  }
}

// One block; C < 0 = dropless. seg_start [E], offsets [E+1].
__global__ void plan_scan_kernel(const int32_t* __restrict__ counts, int32_t E, int64_t C,
                                 int32_t* __restrict__ seg_start, int32_t* __restrict__ offsets) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int32_t carry_all = 0, carry_kept = 0;  // totals are at most T*k < 2^31
  for (int32_t base = 0; base < E; base += kScanThreads) {
    const int32_t e = base + static_cast<int32_t>(threadIdx.x);
    const int32_t c = e < E ? counts[e] : 0;
    const int32_t kept = C < 0 ? c : static_cast<int32_t>(c < C ? c : C);
    int32_t ex_all, ex_kept, tot_all, tot_kept;
    Scan(tmp).ExclusiveSum(c, ex_all, tot_all);
    __syncthreads();
    Scan(tmp).ExclusiveSum(kept, ex_kept, tot_kept);
    __syncthreads();
    if (e < E) {
      seg_start[e] = carry_all + ex_all;
      offsets[e] = carry_kept + ex_kept;
    }
    carry_all += tot_all;
    carry_kept += tot_kept;
  }
  if (threadIdx.x == 0) offsets[E] = carry_kept;
}

// Sort keys of the tokens for drop_policy 'score': ascending key = descending confidence.
template <typename scalar_t>
__global__ void plan_confidence_kernel(const int32_t* __restrict__ experts,
                                       const scalar_t* __restrict__ weights, int64_t T, int64_t k,
                                       int32_t E, uint32_t* __restrict__ keys,
                                       int32_t* __restrict__ tokens) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float conf = -INFINITY;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t e = experts[t * k + j];
    if (e < 0 || e >= E) continue;
    const float w = static_cast<float>(weights[t * k + j]);
    conf = (w != w || w > conf) ? w : conf;  // NaN propagates, as torch's max does
  }
  keys[t] = ~order_bits(conf);
  tokens[t] = static_cast<int32_t>(t);
}

// order == nullptr: token order (drop_policy 'position').
__global__ void plan_sort_input_kernel(const int32_t* __restrict__ experts,
                                       const int32_t* __restrict__ order, int64_t T, int64_t k,
                                       int32_t E, uint32_t* __restrict__ keys,
                                       int32_t* __restrict__ values) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * k) return;
  const int64_t j = i / T, q = i - j * T;
  const int64_t t = order ? order[q] : q;
  const int64_t src = t * k + j;
  const int32_t e = experts[src];
  keys[i] = (e >= 0 && e < E) ? static_cast<uint32_t>(e) : static_cast<uint32_t>(E);
  values[i] = static_cast<int32_t>(src);
}

// C < 0 = dropless.
__global__ void plan_scatter_kernel(const uint32_t* __restrict__ keys,
                                    const int32_t* __restrict__ values,
                                    const int32_t* __restrict__ seg_start, int64_t n, int32_t E,
                                    int64_t C, int32_t* __restrict__ row_source,
                                    int32_t* __restrict__ token_row) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const uint32_t e = keys[r];
  const int32_t src = values[r];
  const bool valid = e < static_cast<uint32_t>(E);
  if (C < 0) {
    row_source[r] = valid ? src : -1;
    token_row[src] = valid ? static_cast<int32_t>(r) : -1;
    return;
  }
  int32_t row = -1;
  if (valid) {
    const int64_t p = r - seg_start[e];
    if (p < C) {
      row = static_cast<int32_t>(static_cast<int64_t>(e) * C + p);
      row_source[row] = src;
    }
  }
  token_row[src] = row;
}

// Scratch for a CUB call, on the device of `like`.
at::Tensor cub_scratch(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_cuda(
    const at::Tensor& experts_in, int64_t num_experts, std::optional<int64_t> capacity,
    c10::string_view drop_policy, const std::optional<at::Tensor>& weights_in) {
  const PlanParams p =
      check_plan_args(experts_in, num_experts, capacity, std::string(drop_policy), weights_in);
  const c10::cuda::CUDAGuard guard(experts_in.device());
  auto experts = experts_in.contiguous();
  auto [counts, offsets, row_source, token_row] = plan_outputs(experts, p);
  const int64_t T = p.T, k = p.k, n = T * k;
  const int32_t E = static_cast<int32_t>(p.E);
  const int64_t C = p.dropless() ? -1 : p.C;
  if (n == 0) {
    counts.zero_();
    offsets.zero_();
    row_source.fill_(-1);
    return {counts, offsets, row_source, token_row};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto iopts = experts.options().dtype(at::kInt);
  const int32_t* ex = experts.const_data_ptr<int32_t>();

  // 1. counts
  counts.zero_();
  {
    const int64_t smem = static_cast<int64_t>(E) * sizeof(int32_t);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, kThreads), 4 * sms));
    if (smem <= kMaxSmemHistogram) {
      plan_count_kernel<true><<<blocks, kThreads, smem, stream>>>(
          ex, n, E, counts.mutable_data_ptr<int32_t>());
    } else {
      plan_count_kernel<false><<<blocks, kThreads, 0, stream>>>(
          ex, n, E, counts.mutable_data_ptr<int32_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. seg_start, offsets
  auto seg_start = at::empty({p.E}, iopts);
  plan_scan_kernel<<<1, kScanThreads, 0, stream>>>(counts.const_data_ptr<int32_t>(), E, C,
                                                   seg_start.mutable_data_ptr<int32_t>(),
                                                   offsets.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. token priority order (drop_policy 'score')
  at::Tensor order;
  if (p.policy == DropPolicy::Score) {
    auto w = weights_in->contiguous();
    auto conf_keys = at::empty({T}, iopts);
    auto tokens = at::empty({T}, iopts);
    auto sorted_keys = at::empty({T}, iopts);
    order = at::empty({T}, iopts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "plan_cuda", [&] {
      plan_confidence_kernel<scalar_t><<<blocks_for(T), kThreads, 0, stream>>>(
          ex, w.const_data_ptr<scalar_t>(), T, k, E,
          reinterpret_cast<uint32_t*>(conf_keys.mutable_data_ptr<int32_t>()),
          tokens.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const auto* kin = reinterpret_cast<const uint32_t*>(conf_keys.const_data_ptr<int32_t>());
    auto* kout = reinterpret_cast<uint32_t*>(sorted_keys.mutable_data_ptr<int32_t>());
    size_t bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, bytes, kin, kout, tokens.const_data_ptr<int32_t>(),
        order.mutable_data_ptr<int32_t>(), static_cast<int>(T), 0, 32, stream));
    auto scratch = cub_scratch(experts, bytes);
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        scratch.mutable_data_ptr(), bytes, kin, kout, tokens.const_data_ptr<int32_t>(),
        order.mutable_data_ptr<int32_t>(), static_cast<int>(T), 0, 32, stream));
  }

  // 4. sort the assignments by expert, stable on the priority order
  auto keys_in = at::empty({n}, iopts), keys_out = at::empty({n}, iopts);
  auto vals_in = at::empty({n}, iopts), vals_out = at::empty({n}, iopts);
  auto* kin = reinterpret_cast<uint32_t*>(keys_in.mutable_data_ptr<int32_t>());
  auto* kout = reinterpret_cast<uint32_t*>(keys_out.mutable_data_ptr<int32_t>());
  plan_sort_input_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      ex, order.defined() ? order.const_data_ptr<int32_t>() : nullptr, T, k, E, kin,
      vals_in.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int end_bit = bits_for(E);
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(kin), kout, vals_in.const_data_ptr<int32_t>(),
      vals_out.mutable_data_ptr<int32_t>(), static_cast<int>(n), 0, end_bit, stream));
  auto scratch = cub_scratch(experts, bytes);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      scratch.mutable_data_ptr(), bytes, static_cast<const uint32_t*>(kin), kout,
      vals_in.const_data_ptr<int32_t>(), vals_out.mutable_data_ptr<int32_t>(),
      static_cast<int>(n), 0, end_bit, stream));

  // 5. rows
  if (!p.dropless()) row_source.fill_(-1);
  plan_scatter_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      kout, vals_out.const_data_ptr<int32_t>(), seg_start.const_data_ptr<int32_t>(), n, E, C,
      row_source.mutable_data_ptr<int32_t>(), token_row.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, offsets, row_source, token_row};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { m.impl("plan", &plan_cuda); }

}  // namespace moeyard
