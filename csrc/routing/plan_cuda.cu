// plan on the GPU: the dispatch plan of a routing (counts, offsets, row_source, token_row), with no
// host synchronization: every size is known from the shapes, all work is queued on the current
// stream. A stable counting sort of the T*k assignments by expert, in priority order (slot-major:
// assignment i = j*T + q is slot j of the q-th token in priority order), in four launches:
//
// 0. drop_policy 'score' only: token priority order = the T tokens sorted by confidence (max of
//    their weights over slots with an expert, NaN if any of those is NaN, -inf with none; order
//    bits of common/order.h, NaN last), a stable CUB radix sort on the inverted 32-bit key so ties
//    keep the lower token first. 'position': token order, no sort.
// 1. count: each warp takes a chunk of kChunk consecutive assignments and counts them per expert
//    (shared-memory counters; id outside [0, E) -> pseudo-expert E). block_counts [E+1][warps].
// 2. block scan: one warp per expert turns its row of block_counts into exclusive offsets across
//    warps; the row total is the expert's count.
// 3. scan (one block): seg_start = exclusive cumsum of counts (seg_start[E] = valid assignments),
//    offsets = exclusive cumsum of the kept counts (min(count, C) with a capacity).
// 4. scatter: each warp walks its chunk again, 32 assignments at a time; __match_any_sync groups
//    the lanes with the same expert, a lane's rank among them plus the warp's running counter gives
//    the assignment's position in the sorted order (stable). Position p within expert e: dropless
//    row = seg_start[e] + p; capacity row = e*C + p if p < C, else dropped. Capacity rows nobody
//    fills get -1 in the same launch.
// Ids are int32 or int64, read as they are (the kernels are templates over the id type). Unlike
// the CPU kernel, ids outside [-1, E) cannot be reported without a host synchronization: they are
// treated as -1 (not counted, no row, token_row -1, no weight in the confidence).
// Work O(T*k + E*T*k/kChunk); temporaries (E+1) * T*k/kChunk + 2(E+1) ints (+ 16 T bytes and
// CUB scratch for 'score'). Counters sit in shared memory for E < kMaxSharedExperts, else in the
// warp's global row of block_counts.
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

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>(ceil_div(n, kThreads)); }

// Sort keys of the tokens for drop_policy 'score': ascending key = descending confidence.
template <typename scalar_t, typename index_t>
__global__ void plan_confidence_kernel(const index_t* __restrict__ experts,
                                       const scalar_t* __restrict__ weights, int64_t T, int64_t k,
                                       int32_t E, uint32_t* __restrict__ keys,
                                       int32_t* __restrict__ tokens) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  float conf = -INFINITY;
  for (int64_t j = 0; j < k; ++j) {
    const index_t e = experts[t * k + j];
    if (e < 0 || e >= E) continue;
    const float w = static_cast<float>(weights[t * k + j]);
    conf = (w != w || w > conf) ? w : conf;  // NaN propagates, as torch's max does
  }
  keys[t] = ~order_bits(conf);
  tokens[t] = static_cast<int32_t>(t);
}

constexpr int kPlanWarps = 4;  // warps per block of the count and scatter kernels
constexpr int kChunk = 256;    // assignments per warp
constexpr int64_t kMaxSharedExperts = 48 * 1024 / (kPlanWarps * 4) - 1;

// Assignment i of the priority order: its expert (E for none) and source t*k + j. The id is
// compared as read (int32 or int64) and narrowed only once it is known to be in [0, E).
template <typename index_t>
__device__ __forceinline__ int32_t assignment(int64_t i, const index_t* __restrict__ experts,
                                              const int32_t* __restrict__ order, int64_t T,
                                              int64_t k, int32_t E, int32_t& src) {
  const int64_t j = i / T, q = i - j * T;
  const int64_t t = order != nullptr ? order[q] : q;
  src = static_cast<int32_t>(t * k + j);
  const index_t e = experts[src];
  return (e >= 0 && e < E) ? static_cast<int32_t>(e) : E;
}

// block_counts [E+1][nw]: assignments of each expert in each warp's chunk. Without shared
// counters block_counts must be zero on entry.
template <bool kShared, typename index_t>
__global__ void __launch_bounds__(kPlanWarps * 32)
    plan_count_kernel(const index_t* __restrict__ experts, const int32_t* __restrict__ order,
                      int64_t T, int64_t k, int32_t E, int64_t n, int64_t nw,
                      int32_t* __restrict__ block_counts) {
  extern __shared__ int32_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kPlanWarps + warp;
  if (gw >= nw) return;
  const int32_t E1 = E + 1;
  int32_t* cnt = smem + warp * E1;
  if (kShared) {
    for (int32_t e = lane; e < E1; e += 32) cnt[e] = 0;
    __syncwarp();
  }
  const int64_t end = min(n, (gw + 1) * kChunk);
  for (int64_t i = gw * kChunk + lane; i < end; i += 32) {
    int32_t src;
    const int32_t e = assignment(i, experts, order, T, k, E, src);
    atomicAdd(kShared ? &cnt[e] : &block_counts[e * nw + gw], 1);
  }
  if (kShared) {
    __syncwarp();
    for (int32_t e = lane; e < E1; e += 32) block_counts[e * nw + gw] = cnt[e];
  }
}

// One warp per expert (E+1 rows): exclusive scan of its row across warps; totals[e] = row sum for
// the E real experts.
__global__ void __launch_bounds__(kPlanWarps * 32)
    plan_block_scan_kernel(int32_t* __restrict__ block_counts, int64_t nw, int32_t E1,
                           int32_t* __restrict__ totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t e = blockIdx.x * kPlanWarps + warp;
  if (e >= E1) return;
  int32_t* row = block_counts + static_cast<int64_t>(e) * nw;
  int32_t carry = 0;
  for (int64_t base = 0; base < nw; base += 32) {
    const int64_t b = base + lane;
    const int32_t v = b < nw ? row[b] : 0;
    int32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t u = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += u;
    }
    if (b < nw) row[b] = carry + incl - v;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0 && e < E1 - 1) totals[e] = carry;  // row E (no expert) has no count
}

// One block; C < 0 = dropless. counts [E] -> seg_start [E+1], offsets [E+1].
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
  if (threadIdx.x == 0) {
    seg_start[E] = carry_all;
    offsets[E] = carry_kept;
  }
}

// C < 0 = dropless. block_offsets = block_counts after plan_block_scan_kernel.
template <bool kShared, typename index_t>
__global__ void __launch_bounds__(kPlanWarps * 32)
    plan_scatter_kernel(const index_t* __restrict__ experts, const int32_t* __restrict__ order,
                        int64_t T, int64_t k, int32_t E, int64_t n, int64_t nw, int64_t C,
                        int32_t* __restrict__ block_offsets, const int32_t* __restrict__ seg_start,
                        const int32_t* __restrict__ counts, int32_t* __restrict__ row_source,
                        int32_t* __restrict__ token_row) {
  extern __shared__ int32_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (C >= 0) {  // capacity rows beyond an expert's count stay unused
    const int64_t R = static_cast<int64_t>(E) * C;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < R;
         r += static_cast<int64_t>(gridDim.x) * blockDim.x)
      if (r % C >= counts[r / C]) row_source[r] = -1;
  }
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kPlanWarps + warp;
  if (gw >= nw) return;
  const int32_t E1 = E + 1;
  // Running position of each expert's next assignment in the sorted order.
  auto counter = [&](int32_t e) -> int32_t& {
    return kShared ? smem[warp * E1 + e] : block_offsets[e * nw + gw];
  };
  for (int32_t e = lane; e < E1; e += 32) counter(e) = seg_start[e] + block_offsets[e * nw + gw];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  const int64_t end = min(n, (gw + 1) * kChunk);
  for (int64_t base = gw * kChunk; base < end; base += 32) {
    const int64_t i = base + lane;
    const bool active = i < end;
    int32_t src = 0;
    const int32_t e = active ? assignment(i, experts, order, T, k, E, src) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int32_t rank = __popc(peers & lower);
    const int32_t pos = active ? counter(e) + rank : 0;
    __syncwarp();
    if (active && rank == 0) counter(e) += __popc(peers);
    __syncwarp();
    if (!active) continue;
    if (e == E) {  // no expert: no row
      token_row[src] = -1;
      if (C < 0) row_source[pos] = -1;
      continue;
    }
    int32_t row = pos;
    if (C >= 0) {
      const int64_t p = pos - seg_start[e];
      row = p < C ? static_cast<int32_t>(e * C + p) : -1;
    }
    if (row >= 0) row_source[row] = src;
    token_row[src] = row;
  }
}

// Scratch for a CUB call, on the device of `like`.
at::Tensor cub_scratch(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// Steps 0-4 for experts [T,k] of ids index_t (int32 or int64, read as they are); n = T*k > 0.
template <typename index_t>
void launch_plan(const PlanParams& p, const index_t* ex,
                 const std::optional<at::Tensor>& weights_in, at::Tensor& counts,
                 at::Tensor& offsets, at::Tensor& row_source, at::Tensor& token_row) {
  const int64_t T = p.T, k = p.k, n = T * k;
  const int32_t E = static_cast<int32_t>(p.E);
  const int64_t C = p.dropless() ? -1 : p.C;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto iopts = counts.options();

  // 0. token priority order (drop_policy 'score')
  at::Tensor order;
  if (p.policy == DropPolicy::Score) {
    auto w = weights_in->contiguous();
    auto conf_keys = at::empty({T}, iopts);
    auto tokens = at::empty({T}, iopts);
    auto sorted_keys = at::empty({T}, iopts);
    order = at::empty({T}, iopts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "plan_cuda", [&] {
      plan_confidence_kernel<scalar_t, index_t><<<blocks_for(T), kThreads, 0, stream>>>(
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
    auto scratch = cub_scratch(counts, bytes);
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        scratch.mutable_data_ptr(), bytes, kin, kout, tokens.const_data_ptr<int32_t>(),
        order.mutable_data_ptr<int32_t>(), static_cast<int>(T), 0, 32, stream));
  }
  const int32_t* ord = order.defined() ? order.const_data_ptr<int32_t>() : nullptr;

  // 1-4. counting sort. One temporary: block_counts [E+1][nw], then seg_start [E+1].
  const int64_t nw = ceil_div(n, kChunk), E1 = p.E + 1;
  const bool shared = p.E < kMaxSharedExperts;
  auto scratch = shared ? at::empty({E1 * nw + E1}, iopts) : at::zeros({E1 * nw + E1}, iopts);
  int32_t* block_counts = scratch.mutable_data_ptr<int32_t>();
  int32_t* seg_start = block_counts + E1 * nw;
  int32_t* cnt = counts.mutable_data_ptr<int32_t>();
  const dim3 grid(static_cast<unsigned>(ceil_div(nw, kPlanWarps)));
  const int64_t smem = shared ? kPlanWarps * E1 * static_cast<int64_t>(sizeof(int32_t)) : 0;
  if (shared) {
    plan_count_kernel<true, index_t><<<grid, kPlanWarps * 32, smem, stream>>>(
        ex, ord, T, k, E, n, nw, block_counts);
  } else {
    plan_count_kernel<false, index_t><<<grid, kPlanWarps * 32, 0, stream>>>(
        ex, ord, T, k, E, n, nw, block_counts);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_block_scan_kernel<<<static_cast<unsigned>(ceil_div(E1, kPlanWarps)), kPlanWarps * 32, 0,
                           stream>>>(block_counts, nw, static_cast<int32_t>(E1), cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  plan_scan_kernel<<<1, kScanThreads, 0, stream>>>(cnt, E, C, seg_start,
                                                   offsets.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto* rs = row_source.mutable_data_ptr<int32_t>();
  auto* tr = token_row.mutable_data_ptr<int32_t>();
  if (shared) {
    plan_scatter_kernel<true, index_t><<<grid, kPlanWarps * 32, smem, stream>>>(
        ex, ord, T, k, E, n, nw, C, block_counts, seg_start, cnt, rs, tr);
  } else {
    plan_scatter_kernel<false, index_t><<<grid, kPlanWarps * 32, 0, stream>>>(
        ex, ord, T, k, E, n, nw, C, block_counts, seg_start, cnt, rs, tr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_cuda(
    const at::Tensor& experts_in, int64_t num_experts, std::optional<int64_t> capacity,
    c10::string_view drop_policy, const std::optional<at::Tensor>& weights_in) {
  const PlanParams p =
      check_plan_args(experts_in, num_experts, capacity, std::string(drop_policy), weights_in);
  const c10::cuda::CUDAGuard guard(experts_in.device());
  auto experts = experts_in.contiguous();
  at::Tensor counts, offsets, row_source, token_row;
  std::tie(counts, offsets, row_source, token_row) = plan_outputs(experts, p);
  if (p.T * p.k == 0) {
    counts.zero_();
    offsets.zero_();
    row_source.fill_(-1);
    return {counts, offsets, row_source, token_row};
  }
  AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "plan_cuda", [&] {
    launch_plan<index_t>(p, experts.const_data_ptr<index_t>(), weights_in, counts, offsets,
                         row_source, token_row);
  });
  return {counts, offsets, row_source, token_row};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { m.impl("plan", &plan_cuda); }

}  // namespace moeyard
