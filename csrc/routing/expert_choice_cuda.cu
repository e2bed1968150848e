// expert_choice on the GPU: expert e takes its take = min(C, T) best tokens by scores[:, e]
// (compared in fp32, larger first, NaN last, ties to the lower token: common/order.h), returned as
// router outputs and as the plan of those choices (R = E*C rows). No host synchronization.
//
// 1. keys: tiled transpose of scores [T,E] into keys [E,T] = ~order_bits(score) (ascending key =
//    descending score) and values [E,T] = token id.
// 2. one stable segmented radix sort (segments = experts): each expert's tokens in preference
//    order, equal scores keeping the lower token first.
// 3. rows: for i < take, row_of[t, e] = e*C + i for the i-th token t of expert e (row_of [T,E]
//    scratch, -1 = not chosen); rows e*C + i with i >= take get row_source -1.
// 4. compaction, one warp per token: the experts that took the token, in ascending id (ballot +
//    popc prefix), fill slots j of weights/experts/token_row [T,E] (0 / -1 after them), and
//    row_source[row] = t*E + j.
// Work O(T*E): scores read twice, one 32-bit-key segmented sort of T*E pairs. Scratch: five int32
// arrays of T*E (keys and token ids in and out, row_of) plus CUB's temporary storage.
#include <torch/library.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "common/cuda_utils.cuh"
#include "common/order.h"
#include "routing/plan.h"

namespace moeyard {
namespace {

constexpr int kTile = 32;
constexpr int kTileRows = 8;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename scalar_t>
__global__ void ec_keys_kernel(const scalar_t* __restrict__ scores, int64_t T, int64_t E,
                               int64_t tiles_e, uint32_t* __restrict__ keys,
                               int32_t* __restrict__ tokens) {
  __shared__ uint32_t tile[kTile][kTile + 1];
  const int64_t t0 = (blockIdx.x / tiles_e) * kTile, e0 = (blockIdx.x % tiles_e) * kTile;
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t t = t0 + dy, e = e0 + threadIdx.x;
    if (t < T && e < E) tile[dy][threadIdx.x] = ~order_bits(static_cast<float>(scores[t * E + e]));
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < kTile; dy += kTileRows) {
    const int64_t e = e0 + dy, t = t0 + threadIdx.x;
    if (t < T && e < E) {
      keys[e * T + t] = tile[threadIdx.x][dy];
      tokens[e * T + t] = static_cast<int32_t>(t);
    }
  }
}

__global__ void ec_rows_kernel(const int32_t* __restrict__ sorted_tokens, int64_t T, int64_t E,
                               int64_t C, int64_t take, int32_t* __restrict__ row_of,
                               int32_t* __restrict__ row_source) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= E * C) return;
  const int64_t e = idx / C, i = idx - e * C;
  if (i < take)
    row_of[static_cast<int64_t>(sorted_tokens[e * T + i]) * E + e] = static_cast<int32_t>(idx);
  else
    row_source[idx] = -1;
}

template <typename scalar_t, typename acc_t>
__global__ void ec_compact_kernel(const scalar_t* __restrict__ scores,
                                  const int32_t* __restrict__ row_of, int64_t T, int64_t E,
                                  acc_t* __restrict__ weights, int32_t* __restrict__ experts,
                                  int32_t* __restrict__ token_row,
                                  int32_t* __restrict__ row_source) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (t >= T) return;  // whole warp
  const int64_t base_t = t * E;
  int64_t j = 0;
  for (int64_t base = 0; base < E; base += 32) {
    const int64_t e = base + lane;
    const int32_t r = e < E ? row_of[base_t + e] : -1;
    const unsigned chosen = __ballot_sync(kFullMask, r >= 0);
    if (r >= 0) {
      const int64_t slot = j + __popc(chosen & ((1u << lane) - 1u));
      weights[base_t + slot] = static_cast<acc_t>(to_float(scores[base_t + e]));
      experts[base_t + slot] = static_cast<int32_t>(e);
      token_row[base_t + slot] = r;
      row_source[r] = static_cast<int32_t>(base_t + slot);
    }
    j += __popc(chosen);
  }
  for (int64_t slot = j + lane; slot < E; slot += 32) {
    weights[base_t + slot] = acc_t(0);
    experts[base_t + slot] = -1;
    token_row[base_t + slot] = -1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expert_choice_cuda(const at::Tensor& scores_in, int64_t capacity) {
  const ExpertChoiceParams p = check_expert_choice_args(scores_in, capacity);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  auto scores = scores_in.contiguous();
  auto [weights, experts, counts, offsets, row_source, token_row] = expert_choice_outputs(scores, p);
  const int64_t T = p.T, E = p.E, C = p.C, take = p.take;
  if (T == 0 || E == 0) {  // nothing to choose; E*C rows all unused
    row_source.fill_(-1);
    return {weights, experts, counts, offsets, row_source, token_row};
  }
  if (take == 0) {  // C == 0: no rows, nothing chosen
    weights.zero_();
    experts.fill_(-1);
    token_row.fill_(-1);
    return {weights, experts, counts, offsets, row_source, token_row};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto iopts = scores.options().dtype(at::kInt);
  const int64_t n = T * E;

  // 1. keys [E,T], token ids [E,T]
  auto keys_in = at::empty({n}, iopts), keys_out = at::empty({n}, iopts);
  auto tok_in = at::empty({n}, iopts), tok_out = at::empty({n}, iopts);
  auto* kin = reinterpret_cast<uint32_t*>(keys_in.mutable_data_ptr<int32_t>());
  auto* kout = reinterpret_cast<uint32_t*>(keys_out.mutable_data_ptr<int32_t>());
  const int64_t tiles_e = ceil_div(E, kTile);
  const unsigned tiles = static_cast<unsigned>(ceil_div(T, kTile) * tiles_e);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "expert_choice_cuda_keys", [&] {
    ec_keys_kernel<scalar_t><<<tiles, dim3(kTile, kTileRows), 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), T, E, tiles_e, kin, tok_in.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // 2. per-expert stable sort; segment e = [e*T, (e+1)*T), e*T <= T*E < 2^31
  auto seg = at::arange(E + 1, iopts).mul_(T);
  const int32_t* seg_begin = seg.const_data_ptr<int32_t>();
  size_t bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(kin), kout, tok_in.const_data_ptr<int32_t>(),
      tok_out.mutable_data_ptr<int32_t>(), static_cast<int>(n), static_cast<int>(E), seg_begin,
      seg_begin + 1, 0, 32, stream));
  auto scratch = at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)},
                           scores.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
      scratch.mutable_data_ptr(), bytes, static_cast<const uint32_t*>(kin), kout,
      tok_in.const_data_ptr<int32_t>(), tok_out.mutable_data_ptr<int32_t>(), static_cast<int>(n),
      static_cast<int>(E), seg_begin, seg_begin + 1, 0, 32, stream));

  // 3. row_of [T,E], unused rows of row_source
  auto row_of = at::full({T, E}, -1, iopts);
  ec_rows_kernel<<<static_cast<unsigned>(ceil_div(E * C, kThreads)), kThreads, 0, stream>>>(
      tok_out.const_data_ptr<int32_t>(), T, E, C, take, row_of.mutable_data_ptr<int32_t>(),
      row_source.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 4. per-token compaction
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "expert_choice_cuda_compact", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    ec_compact_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(ceil_div(T, kWarpsPerBlock)), kThreads, 0, stream>>>(
            scores.const_data_ptr<scalar_t>(), row_of.const_data_ptr<int32_t>(), T, E,
            weights.mutable_data_ptr<acc_t>(), experts.mutable_data_ptr<int32_t>(),
            token_row.mutable_data_ptr<int32_t>(), row_source.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, experts, counts, offsets, row_source, token_row};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { m.impl("expert_choice", &expert_choice_cuda); }

}  // namespace moeyard
