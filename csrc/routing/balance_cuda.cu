// update_expert_bias / router_losses / sequence_balance_loss on the GPU. Deterministic: every
// floating-point sum is done in a fixed order (per-block partials written to a buffer, reduced by a
// later kernel in block order); no floating-point atomics. No host synchronization; temporaries
// come from at::empty on the device; all launches on the current stream.
//
// update_expert_bias: one block; fp64 sum of load (strided per thread, butterfly per warp, warps
//   in order), then bias[e] += float(rate * sign(mean - load[e])). O(E), one launch.
// router_losses: kernel 1, nblocks (a function of T only) blocks of W warps, each block a
//   contiguous range of rows; a warp per row computes max, sum exp(z - max) and logsumexp with
//   shuffles and adds the softmax (score="sigmoid": sigmoid(z) / (sum_e sigmoid(z) + 1e-20), one
//   more shuffle sum) into its own shared-memory column accumulator [E] (lane e%32 owns column e:
//   no races) and lse^2 into a register; the block writes sum over warps (in order) to
//   partial [nblocks, E] and [nblocks]. The row is read once from HBM (the two re-reads of a row
//   hit L1). Kernel 2, one 32x32 block: column sums over blocks in a fixed order, then
//   balance = E * sum_e (counts_e / (T k)) * (colsum_e / T) and z = sum lse^2 / T.
//   Bytes: T*E*sizeof(logit) + nblocks*E*8. Shared memory W*(E+1)*sizeof(acc) <= 48 KiB, so
//   E <= 12287 (fp64: 6143); sequence_balance_loss adds a 4-byte histogram: E <= 6143 (fp64: 4095).
// sequence_balance_loss: kernel 1, one block per chunk of up to kBalanceChunkRows rows of one
//   sequence, as above with s / (sum_e s + 1e-20) and an integer histogram of the chosen experts
//   (shared-memory int atomics: exact, order-free); kernel 2, one block per sequence: sum_e
//   f_e P_e over its chunks in order; kernel 3, one block: mean over sequences in order.
//   Expert ids (int32 or int64, read as they are) outside [-1, E) are ignored here (as -1); the
//   CPU kernel raises on them.
// Accumulation in fp32 (fp64 for fp64 inputs).
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/cuda_utils.cuh"
#include "routing/balance.h"

namespace moeyard {
namespace {

constexpr int kMaxWarps = 8;
constexpr int64_t kMaxSmem = 48 * 1024;
constexpr int64_t kMaxPartialBlocks = 1024;
constexpr int kReduceThreads = 256;

// Sum over a 1-D block in a fixed order; the result is valid in thread 0. red: >= 32 entries.
template <typename T>
__device__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += red[w];
  return total;
}

// Warps per block for per-warp accumulators of (E + 1) entries of acc_bytes each, plus
// extra_per_expert * E bytes shared by the block; at most kMaxWarps, within kMaxSmem.
int warps_for(int64_t E, int64_t acc_bytes, int64_t extra_per_expert, const char* op) {
  const int64_t per_warp = (E + 1) * acc_bytes;
  const int64_t w = std::min<int64_t>(kMaxWarps, (kMaxSmem - extra_per_expert * E) / per_warp);
  TORCH_CHECK(w >= 1, "moeyard: ", op, " on CUDA supports up to ",
              (kMaxSmem - acc_bytes) / (acc_bytes + extra_per_expert),
              " experts for this dtype, got E=", E);
  return static_cast<int>(w);
}

// ------------------------------------------------------------------------ update_expert_bias

template <typename load_t>
__global__ void update_expert_bias_kernel(float* __restrict__ bias, int64_t stride,
                                          const load_t* __restrict__ load, int64_t E,
                                          double rate) {
  __shared__ double red[32];
  __shared__ double mean_s;
  double sum = 0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) sum += static_cast<double>(load[e]);
  const double total = block_sum(sum, red);
  if (threadIdx.x == 0) mean_s = total / static_cast<double>(E);
  __syncthreads();
  const double mean = mean_s;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
    bias[e * stride] += static_cast<float>(sign_step(mean, static_cast<double>(load[e]), rate));
}

void update_expert_bias_cuda(const at::Tensor& bias, const at::Tensor& load_in, double rate) {
  const int64_t E = check_update_expert_bias_args(bias, load_in, rate);
  if (E == 0) return;
  const c10::cuda::CUDAGuard guard(bias.device());
  auto load = load_in.contiguous();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, load.scalar_type(),
                             "update_expert_bias_cuda", [&] {
                               update_expert_bias_kernel<scalar_t>
                                   <<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                                       bias.mutable_data_ptr<float>(), bias.stride(0),
                                       load.const_data_ptr<scalar_t>(), E, rate);
                               C10_CUDA_KERNEL_LAUNCH_CHECK();
                             });
}

// ----------------------------------------------------------------------------- router_losses

template <typename scalar_t, typename acc_t>
__global__ void router_losses_partial_kernel(const scalar_t* __restrict__ logits, int64_t T, int E,
                                             bool sigmoid, int64_t rows_per_block,
                                             acc_t* __restrict__ part,
                                             acc_t* __restrict__ zpart) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int W = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);  // [W, E]
  acc_t* zw = acc + static_cast<int64_t>(W) * E;     // [W]
  for (int i = threadIdx.x; i < W * E; i += blockDim.x) acc[i] = acc_t(0);
  __syncthreads();
  acc_t* mine = acc + static_cast<int64_t>(warp) * E;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t t1 = t0 + rows_per_block < T ? t0 + rows_per_block : T;
  acc_t zs = 0;
  for (int64_t t = t0 + warp; t < t1; t += W) {
    const scalar_t* row = logits + t * E;
    acc_t m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = nan_max(m, static_cast<acc_t>(to_float(row[e])));
    m = warp_nan_max(m);
    acc_t sum = 0;
    for (int e = lane; e < E; e += 32) sum += exp(static_cast<acc_t>(to_float(row[e])) - m);
    sum = warp_sum(sum);
    const acc_t lse = row_logsumexp(m, sum);
    zs += lse * lse;
    if (sigmoid) {
      acc_t ssum = 0;
      for (int e = lane; e < E; e += 32)
        ssum += acc_t(1) / (acc_t(1) + exp(-static_cast<acc_t>(to_float(row[e]))));
      ssum = warp_sum(ssum) + acc_t(1e-20);
      for (int e = lane; e < E; e += 32)
        mine[e] += acc_t(1) / (acc_t(1) + exp(-static_cast<acc_t>(to_float(row[e])))) / ssum;
    } else {
      for (int e = lane; e < E; e += 32)
        mine[e] += exp(static_cast<acc_t>(to_float(row[e])) - m) / sum;
    }
  }
  if (lane == 0) zw[warp] = zs;
  __syncthreads();
  acc_t* out = part + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    acc_t v = 0;
    for (int w = 0; w < W; ++w) v += acc[static_cast<int64_t>(w) * E + e];
    out[e] = v;
  }
  if (threadIdx.x == 0) {
    acc_t z = 0;
    for (int w = 0; w < W; ++w) z += zw[w];
    zpart[blockIdx.x] = z;
  }
}

// One block of 32x32 threads: thread (ty, tx) sums blocks ty, ty+32, ... of column c0+tx, row ty=0
// adds the 32 partials in order.
template <typename acc_t>
__global__ void router_losses_finish_kernel(const acc_t* __restrict__ part,
                                            const acc_t* __restrict__ zpart, int nblocks, int E,
                                            const acc_t* __restrict__ counts, acc_t Tk, acc_t Ta,
                                            acc_t* __restrict__ balance,
                                            acc_t* __restrict__ zloss) {
  __shared__ acc_t tile[32][33];
  __shared__ acc_t red[32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  acc_t bal = 0;
  for (int c0 = 0; c0 < E; c0 += 32) {
    const int e = c0 + tx;
    acc_t v = 0;
    if (e < E)
      for (int b = ty; b < nblocks; b += 32) v += part[static_cast<int64_t>(b) * E + e];
    tile[ty][tx] = v;
    __syncthreads();
    if (ty == 0 && e < E) {
      acc_t colsum = 0;
      for (int i = 0; i < 32; ++i) colsum += tile[i][tx];
      bal += (counts[e] / Tk) * (colsum / Ta);
    }
    __syncthreads();
  }
  acc_t zv = 0;
  for (int b = ty * 32 + tx; b < nblocks; b += 32 * 32) zv += zpart[b];
  zv = warp_sum(zv);  // a warp is one ty row
  if (tx == 0) red[ty] = zv;
  __syncthreads();
  if (ty == 0) {
    bal = warp_sum(bal);
    if (tx == 0) {
      acc_t z = 0;
      for (int i = 0; i < 32; ++i) z += red[i];
      *balance = static_cast<acc_t>(E) * bal;
      *zloss = z / Ta;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> router_losses_cuda(const at::Tensor& logits_in,
                                                      const at::Tensor& counts_in, int64_t k,
                                                      c10::string_view score) {
  const RouterLossShape s = check_router_losses_args(logits_in, counts_in, k, score);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto acc = acc_dtype(logits_in.scalar_type());
  auto opts = logits_in.options().dtype(acc);
  if (s.T == 0) return {at::zeros({}, opts), at::zeros({}, opts)};
  auto logits = logits_in.contiguous();
  auto counts = counts_in.to(acc).contiguous();
  auto balance = at::empty({}, opts), zloss = at::empty({}, opts);
  const int64_t nblocks = std::min(ceil_div(s.T, kBalanceChunkRows), kMaxPartialBlocks);
  const int64_t rows_per_block = ceil_div(s.T, nblocks);
  auto part = at::empty({nblocks, s.E}, opts);
  auto zpart = at::empty({nblocks}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "router_losses_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int W = warps_for(s.E, sizeof(acc_t), 0, "router_losses");
    const size_t smem = static_cast<size_t>(W) * (s.E + 1) * sizeof(acc_t);
    router_losses_partial_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(nblocks), W * 32, smem, stream>>>(
            logits.const_data_ptr<scalar_t>(), s.T, static_cast<int>(s.E), s.sigmoid,
            rows_per_block,
            part.mutable_data_ptr<acc_t>(), zpart.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    router_losses_finish_kernel<acc_t><<<1, dim3(32, 32), 0, stream>>>(
        part.const_data_ptr<acc_t>(), zpart.const_data_ptr<acc_t>(), static_cast<int>(nblocks),
        static_cast<int>(s.E), counts.const_data_ptr<acc_t>(), static_cast<acc_t>(s.T * s.k),
        static_cast<acc_t>(s.T), balance.mutable_data_ptr<acc_t>(),
        zloss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {balance, zloss};
}

// --------------------------------------------------------------------- sequence_balance_loss

// Block idx = b * C + c: rows [b*S + c*kBalanceChunkRows, b*S + min(S, (c+1)*kBalanceChunkRows)).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void seq_loss_partial_kernel(const scalar_t* __restrict__ scores,
                                        const index_t* __restrict__ experts, int64_t S, int E,
                                        int k, int64_t C, acc_t* __restrict__ part,
                                        int32_t* __restrict__ cpart) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int W = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);                                    // [W, E]
  int32_t* hist = reinterpret_cast<int32_t*>(acc + static_cast<int64_t>(W) * E);  // [E]
  for (int i = threadIdx.x; i < W * E; i += blockDim.x) acc[i] = acc_t(0);
  for (int i = threadIdx.x; i < E; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  acc_t* mine = acc + static_cast<int64_t>(warp) * E;
  const int64_t idx = blockIdx.x;
  const int64_t b = idx / C, c = idx % C;
  const int64_t t0 = b * S + c * kBalanceChunkRows;
  const int64_t t1 = b * S + ((c + 1) * kBalanceChunkRows < S ? (c + 1) * kBalanceChunkRows : S);
  for (int64_t t = t0 + warp; t < t1; t += W) {
    const scalar_t* row = scores + t * E;
    acc_t z = 0;
    for (int e = lane; e < E; e += 32) z += static_cast<acc_t>(to_float(row[e]));
    z = warp_sum(z) + acc_t(1e-20);
    for (int e = lane; e < E; e += 32) mine[e] += static_cast<acc_t>(to_float(row[e])) / z;
    for (int j = lane; j < k; j += 32) {
      const index_t ex = experts[t * k + j];
      if (ex >= 0 && ex < E) atomicAdd(&hist[ex], 1);  // integer: exact in any order
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    acc_t v = 0;
    for (int w = 0; w < W; ++w) v += acc[static_cast<int64_t>(w) * E + e];
    part[idx * E + e] = v;
    cpart[idx * E + e] = hist[e];
  }
}

// Block b: sum_e (count_e * E/(kS)) * (colsum_e / S) for sequence b.
template <typename acc_t>
__global__ void seq_loss_sequence_kernel(const acc_t* __restrict__ part,
                                         const int32_t* __restrict__ cpart, int64_t C, int E,
                                         acc_t f_scale, acc_t Sa, acc_t* __restrict__ seq) {
  __shared__ acc_t red[32];
  const int64_t b = blockIdx.x;
  acc_t v = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    acc_t colsum = 0;
    int64_t count = 0;
    for (int64_t c = 0; c < C; ++c) {
      colsum += part[(b * C + c) * E + e];
      count += cpart[(b * C + c) * E + e];
    }
    v += (static_cast<acc_t>(count) * f_scale) * (colsum / Sa);
  }
  const acc_t total = block_sum(v, red);
  if (threadIdx.x == 0) seq[b] = total;
}

template <typename acc_t>
__global__ void seq_loss_mean_kernel(const acc_t* __restrict__ seq, int64_t B,
                                     acc_t* __restrict__ out) {
  __shared__ acc_t red[32];
  acc_t v = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) v += seq[b];
  const acc_t total = block_sum(v, red);
  if (threadIdx.x == 0) *out = total / static_cast<acc_t>(B);
}

at::Tensor sequence_balance_loss_cuda(const at::Tensor& scores_in, const at::Tensor& experts_in,
                                      int64_t num_sequences) {
  const SeqLossShape s = check_sequence_balance_loss_args(scores_in, experts_in, num_sequences);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const auto acc = acc_dtype(scores_in.scalar_type());
  auto opts = scores_in.options().dtype(acc);
  if (s.N == 0) return at::zeros({}, opts);
  auto scores = scores_in.contiguous();
  auto experts = experts_in.contiguous();
  const int64_t C = ceil_div(s.S, kBalanceChunkRows);
  const int64_t nblocks = s.B * C;
  check_int32_range(nblocks, "number of sequence chunks");
  auto part = at::empty({nblocks, s.E}, opts);
  auto cpart = at::empty({nblocks, s.E}, opts.dtype(at::kInt));
  auto seq = at::empty({s.B}, opts);
  auto out = at::empty({}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "sequence_balance_loss_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int W = warps_for(s.E, sizeof(acc_t), 4, "sequence_balance_loss");
    const size_t smem = static_cast<size_t>(W) * s.E * sizeof(acc_t) + s.E * 4;
    AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "sequence_balance_loss_cuda", [&] {
      seq_loss_partial_kernel<scalar_t, acc_t, index_t>
          <<<static_cast<unsigned>(nblocks), W * 32, smem, stream>>>(
              scores.const_data_ptr<scalar_t>(), experts.const_data_ptr<index_t>(), s.S,
              static_cast<int>(s.E), static_cast<int>(s.k), C, part.mutable_data_ptr<acc_t>(),
              cpart.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const acc_t f_scale =
        static_cast<acc_t>(static_cast<double>(s.E) / static_cast<double>(s.k * s.S));
    seq_loss_sequence_kernel<acc_t><<<static_cast<unsigned>(s.B), kReduceThreads, 0, stream>>>(
        part.const_data_ptr<acc_t>(), cpart.const_data_ptr<int32_t>(), C, static_cast<int>(s.E),
        f_scale, static_cast<acc_t>(s.S), seq.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    seq_loss_mean_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(
        seq.const_data_ptr<acc_t>(), s.B, out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("update_expert_bias", &update_expert_bias_cuda);
  m.impl("router_losses", &router_losses_cuda);
  m.impl("sequence_balance_loss", &sequence_balance_loss_cuda);
}

}  // namespace moeyard
