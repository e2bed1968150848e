// balanced_assignment on the GPU: the BASE-layer assignment of T tokens to E experts maximizing
// sum_t scores[t, a_t] with every expert taking exactly its capacity (T/E, the first T%E experts
// one more). Same algorithm, rounds and result as assignment_cpu.cpp (whose header describes the
// auction); grid and balance rule in routing/assignment.h; the steps in PyTorch in
// python/moeyard/reference.py. No host synchronization: the whole auction runs on the device.
//
// 1. minmax_kernel (grid-stride, <= 256 blocks): per-block finite min / max of the scores (fp64).
// 2. quantize_kernel (grid-stride): Q [T,E] int32, the scores on the 2^24-step grid.
// 3. auction_kernel, ONE block of 512 threads looping over phases and rounds until every token is
//    assigned. Per round (5 block barriers):
//      bid     groups of G = min(32, pow2 >= E_eff) lanes per unassigned token: best / second-best
//              value over the experts (shuffle merge; equal experts: the first from t mod E_eff,
//              cyclically); the bid, its
//              target, per-expert bid counts (atomics) and the list of experts that got bids;
//      offsets each expert with bids reserves a segment of the bidder list (atomic; the segments'
//              order is irrelevant) and the bidders are scattered into it;
//      select  one warp per expert with bids: keep the best `capacity` of held + new candidates.
//              If they all fit, append; else a warp radix select (8-bit digits, MSB first, over
//              the 96-bit key (bid, ~token): higher bid first, ties to the lower token) finds the
//              capacity-th key, then a ballot compaction keeps the tokens at or above it in the
//              expert's slots and pushes the rest onto the next unassigned list. A full expert's
//              price becomes its lowest kept bid.
//    The outcome of every step is a set, independent of the order atomics hand out positions,
//    so the result is deterministic and equal to the CPU's. Prices live in shared memory for
//    E_eff <= 3072 (global memory above). The greedy completion after max_rounds runs in warp 0,
//    tokens in ascending order.
// Work per round O(U*E/threads + candidates*12/32) plus barriers; scratch: Q (T*E int32), 5 int32
// and 2 int64 arrays of T, 5 int32 arrays of E.
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>

#include "common/cuda_utils.cuh"
#include "routing/assignment.h"

namespace moeyard {
namespace {

using assignment::Grid;
using assignment::Params;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Prices in shared memory up to this many experts (24 KB, which with the 16.5 KB of static shared
// memory stays under the 48 KB a launch gets without opting in); global memory above.
constexpr int kMaxSmemExperts = 3072;
constexpr int kMaxPartials = 256;      // blocks of minmax_kernel
constexpr int kPrepThreads = 256;
constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t v) {
  return static_cast<double>(to_float(v));
}

// (min, max) over the 32 lanes of a warp, in every lane.
__device__ __forceinline__ void warp_min_max(double& lo, double& hi) {
  for (int o = 16; o > 0; o >>= 1) {
    const double ol = __shfl_xor_sync(kFullMask, lo, o), oh = __shfl_xor_sync(kFullMask, hi, o);
    lo = ol < lo ? ol : lo;
    hi = oh > hi ? oh : hi;
  }
}

template <typename scalar_t>
__global__ void minmax_kernel(const scalar_t* __restrict__ scores, int64_t n,
                              double* __restrict__ partial) {
  __shared__ double s_lo[kPrepThreads / 32], s_hi[kPrepThreads / 32];
  double lo = kInf, hi = -kInf;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = to_double(scores[i]);
    if (!assignment::is_finite(v)) continue;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  warp_min_max(lo, hi);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_lo[warp] = lo, s_hi[warp] = hi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kPrepThreads / 32; ++w) {
      lo = s_lo[w] < lo ? s_lo[w] : lo;
      hi = s_hi[w] > hi ? s_hi[w] : hi;
    }
    partial[2 * blockIdx.x] = lo;
    partial[2 * blockIdx.x + 1] = hi;
  }
}

// The grid from the per-block partials; called by every thread of the block (one barrier).
__device__ Grid grid_from_partials(const double* __restrict__ partial, int num_partials) {
  __shared__ double s_lo, s_hi;
  if (threadIdx.x < 32) {
    double lo = kInf, hi = -kInf;
    for (int i = threadIdx.x; i < num_partials; i += 32) {
      const double l = partial[2 * i], h = partial[2 * i + 1];
      lo = l < lo ? l : lo;
      hi = h > hi ? h : hi;
    }
    warp_min_max(lo, hi);
    if (threadIdx.x == 0) s_lo = lo, s_hi = hi;
  }
  __syncthreads();
  const double lo = s_lo, hi = s_hi;
  return lo <= hi ? assignment::make_grid(lo, hi) : Grid{};
}

template <typename scalar_t>
__global__ void quantize_kernel(const scalar_t* __restrict__ scores, int64_t n,
                                const double* __restrict__ partial, int num_partials,
                                int32_t* __restrict__ Q) {
  const Grid g = grid_from_partials(partial, num_partials);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    Q[i] = static_cast<int32_t>(g.quantize(to_double(scores[i])));
}

struct AuctionState {
  const int32_t* Q;        // [T,E] grid values
  const double* partial;   // minmax partials
  int num_partials;
  int32_t* owner;          // [T] the output: expert of each token, -1 while unassigned
  int64_t* bid;            // [T] held bid of an assigned token
  int64_t* new_bid;        // [T] this round's bid
  int32_t* target;         // [T] this round's expert
  int32_t* ulist[2];       // [T] unassigned tokens: this round's, the next round's
  int32_t* bidders;        // [T] this round's bidders grouped by expert
  int32_t* slots;          // [T] held tokens, expert e's from slot_offset(e)
  int32_t* held;           // [E_eff] tokens held   (these five start at zero)
  int32_t* new_count;      // [E_eff] bids this round
  int32_t* new_offset;     // [E_eff] segment start in `bidders`
  int32_t* cursor;         // [E_eff] scatter cursor
  int32_t* active;         // [E_eff] experts with bids this round
  int64_t* price_global;   // [E_eff] prices when E_eff > kMaxSmemExperts
};

struct SharedCounters {
  int32_t unassigned, next_unassigned, num_active, reserved, cur;
};

// 96-bit selection key: bid (larger first), then ~token (lower token first); digit d (0..11) is
// the d-th byte from the top.
__device__ __forceinline__ uint32_t key_digit(uint64_t hi, uint32_t lo, int d) {
  return d < 8 ? static_cast<uint32_t>(hi >> (56 - 8 * d)) & 0xffu
               : (lo >> (24 - 8 * (d - 8))) & 0xffu;
}

// Whether the top `d` digits of the key equal those of the prefix.
__device__ __forceinline__ bool key_prefix_equal(uint64_t hi, uint32_t lo, uint64_t phi,
                                                 uint32_t plo, int d) {
  if (d == 0) return true;
  if (d <= 8) return (hi >> (64 - 8 * d)) == (phi >> (64 - 8 * d));
  return hi == phi && (lo >> (32 - 8 * (d - 8))) == (plo >> (32 - 8 * (d - 8)));
}

// Whether the top `d` (>= 1) digits of the key are >= those of the prefix.
__device__ __forceinline__ bool key_prefix_at_least(uint64_t hi, uint32_t lo, uint64_t phi,
                                                    uint32_t plo, int d) {
  if (d <= 8) return (hi >> (64 - 8 * d)) >= (phi >> (64 - 8 * d));
  return hi > phi || (hi == phi && (lo >> (32 - 8 * (d - 8))) >= (plo >> (32 - 8 * (d - 8))));
}

__device__ __forceinline__ int64_t warp_min_i64(int64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t w = __shfl_xor_sync(kFullMask, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// One warp: expert e keeps the best `capacity` of its held tokens and this round's bidders.
__device__ void select_expert(const AuctionState& st, const Params& p, int64_t* price, int32_t e,
                              int32_t* next_list, int32_t* next_count, int32_t* hist) {
  const int lane = threadIdx.x % 32;
  const unsigned below = (1u << lane) - 1u;
  const int64_t h = st.held[e], n = st.new_count[e], cap = p.capacity(e);
  const int64_t base = p.slot_offset(e), noff = st.new_offset[e], total = h + n;
  auto candidate = [&](int64_t i, uint64_t& khi, uint32_t& klo) -> int32_t {
    int32_t t;
    if (i < h) {
      t = st.slots[base + i];
      khi = static_cast<uint64_t>(st.bid[t]);
    } else {
      t = st.bidders[noff + i - h];
      khi = static_cast<uint64_t>(st.new_bid[t]);
    }
    klo = 0xffffffffu - static_cast<uint32_t>(t);
    return t;
  };

  if (total <= cap) {  // everyone fits
    for (int64_t i = lane; i < n; i += 32) {
      const int32_t t = st.bidders[noff + i];
      st.slots[base + h + i] = t;
      st.owner[t] = e;
      st.bid[t] = st.new_bid[t];
    }
    __syncwarp();
    if (total == cap) {  // now full: price = lowest held bid
      int64_t low = LLONG_MAX;
      for (int64_t i = lane; i < cap; i += 32) {
        const int64_t b = st.bid[st.slots[base + i]];
        low = b < low ? b : low;
      }
      low = warp_min_i64(low);
      if (lane == 0) price[e] = low;
    }
  } else {
    // radix select of the cap-th largest key
    uint64_t phi = 0;
    uint32_t plo = 0;
    int depth = 0;
    int32_t need = static_cast<int32_t>(cap);
    for (int d = 0; d < 12; ++d) {
      for (int b = lane; b < 256; b += 32) hist[b] = 0;
      __syncwarp();
      for (int64_t i = lane; i < total; i += 32) {
        uint64_t khi;
        uint32_t klo;
        candidate(i, khi, klo);
        if (key_prefix_equal(khi, klo, phi, plo, d)) atomicAdd(&hist[key_digit(khi, klo, d)], 1);
      }
      __syncwarp();
      int32_t mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) mine += hist[8 * lane + j];
      int32_t suffix = mine;  // sum over lanes >= this one
      for (int o = 1; o < 32; o <<= 1) {
        const int32_t v = __shfl_down_sync(kFullMask, suffix, o);
        if (lane + o < 32) suffix += v;
      }
      const unsigned ball = __ballot_sync(kFullMask, suffix >= need);
      const int owner_lane = 31 - __clz(ball);  // the lane whose bins hold the need-th key
      int32_t chosen = 0, rest = 0, count = 0;
      if (lane == owner_lane) {
        int32_t acc = suffix - mine;
        for (int j = 7; j >= 0; --j) {
          const int32_t c = hist[8 * lane + j];
          if (acc + c >= need) {
            chosen = 8 * lane + j;
            rest = need - acc;
            count = c;
            break;
          }
          acc += c;
        }
      }
      chosen = __shfl_sync(kFullMask, chosen, owner_lane);
      need = __shfl_sync(kFullMask, rest, owner_lane);
      count = __shfl_sync(kFullMask, count, owner_lane);
      if (d < 8)
        phi |= static_cast<uint64_t>(chosen) << (56 - 8 * d);
      else
        plo |= static_cast<uint32_t>(chosen) << (24 - 8 * (d - 8));
      depth = d + 1;
      __syncwarp();
      if (count == need) break;  // every key with this prefix is kept
    }
    // compaction: keys whose top `depth` digits are >= the prefix are exactly the cap best
    int64_t out = 0, low = LLONG_MAX;
    for (int64_t i0 = 0; i0 < total; i0 += 32) {
      const int64_t i = i0 + lane;
      uint64_t khi = 0;
      uint32_t klo = 0;
      int32_t t = 0;
      if (i < total) t = candidate(i, khi, klo);
      const bool keep = i < total && key_prefix_at_least(khi, klo, phi, plo, depth);
      const bool drop = i < total && !keep;
      const unsigned kb = __ballot_sync(kFullMask, keep);  // every read of the chunk is done
      const unsigned db = __ballot_sync(kFullMask, drop);
      if (keep) {
        st.slots[base + out + __popc(kb & below)] = t;  // in place: never past a slot not yet read
        if (i >= h) {
          st.owner[t] = e;
          st.bid[t] = st.new_bid[t];
        }
        const int64_t b = static_cast<int64_t>(khi);
        low = b < low ? b : low;
      }
      int32_t dbase = 0;
      if (lane == 0 && db) dbase = atomicAdd(next_count, __popc(db));
      dbase = __shfl_sync(kFullMask, dbase, 0);
      if (drop) {
        next_list[dbase + __popc(db & below)] = t;
        if (i < h) st.owner[t] = -1;
      }
      out += __popc(kb);
    }
    low = warp_min_i64(low);
    if (lane == 0) price[e] = low;
  }
  if (lane == 0) {
    st.held[e] = static_cast<int32_t>(total < cap ? total : cap);
    st.new_count[e] = 0;
    st.cursor[e] = 0;
  }
}

// Warp 0 only: the tokens still unassigned, in ascending order, take their best expert with room.
__device__ void complete_greedy(const AuctionState& st, const Params& p, const int64_t* price) {
  const int lane = threadIdx.x % 32;
  const int64_t T = p.T, E = p.E, Ee = p.E_eff, scale = T + 1;
  for (int64_t b0 = 0; b0 < T; b0 += 32) {
    unsigned todo = __ballot_sync(kFullMask, b0 + lane < T && st.owner[b0 + lane] < 0);
    while (todo) {
      const int64_t t = b0 + __ffs(todo) - 1;
      todo &= todo - 1;
      int64_t best = LLONG_MIN;
      int32_t arg = INT_MAX;
      for (int64_t e = lane; e < Ee; e += 32) {
        if (st.held[e] >= p.capacity(e)) continue;
        const int64_t v = static_cast<int64_t>(st.Q[t * E + e]) * scale - price[e];
        if (v > best) best = v, arg = static_cast<int32_t>(e);
      }
      for (int o = 16; o > 0; o >>= 1) {
        const int64_t ob = __shfl_xor_sync(kFullMask, best, o);
        const int32_t oa = __shfl_xor_sync(kFullMask, arg, o);
        if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
      }
      if (lane == 0) {
        st.owner[t] = arg;
        st.held[arg] += 1;
      }
      __syncwarp();
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
auction_kernel(AuctionState st, Params p, int group) {
  extern __shared__ int64_t smem_price[];
  __shared__ int32_t hist[kWarps][256];
  __shared__ SharedCounters sc;
  __shared__ int64_t red[kWarps];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t T = p.T, E = p.E, Ee = p.E_eff, scale = T + 1;
  int64_t* price = Ee <= kMaxSmemExperts ? smem_price : st.price_global;

  const Grid g = grid_from_partials(st.partial, st.num_partials);
  if (assignment::all_equal_in_one_round(g, p)) {
    for (int64_t t = tid; t < T; t += kThreads) st.owner[t] = static_cast<int32_t>(t % Ee);
    return;
  }
  for (int64_t e = tid; e < Ee; e += kThreads) price[e] = 0;
  int64_t eps = g.qmax * scale / assignment::kTheta;
  eps = eps > 1 ? eps : 1;
  int64_t rounds = 0;
  const int per_warp = 32 / group, sub = lane / group, gl = lane % group;

  for (;;) {  // phases
    for (int64_t t = tid; t < T; t += kThreads) {
      st.owner[t] = -1;
      st.ulist[0][t] = static_cast<int32_t>(t);
    }
    for (int64_t e = tid; e < Ee; e += kThreads) st.held[e] = 0;
    if (tid == 0) sc = SharedCounters{static_cast<int32_t>(T), 0, 0, 0, 0};
    __syncthreads();
    for (;;) {  // rounds
      const int32_t U = sc.unassigned;
      if (U == 0) break;
      if (rounds == p.max_rounds) {
        if (warp == 0) complete_greedy(st, p, price);
        return;
      }
      ++rounds;
      const int32_t* cur = sc.cur ? st.ulist[1] : st.ulist[0];
      int32_t* next = sc.cur ? st.ulist[0] : st.ulist[1];

      // bid
      for (int64_t b0 = static_cast<int64_t>(warp) * per_warp; b0 < U; b0 += kWarps * per_warp) {
        const int64_t i = b0 + sub;
        const bool valid = i < U;
        const int32_t t = valid ? cur[i] : 0;
        // equal experts: the first in the cyclic order from t mod E_eff (rank(e) smallest)
        const int64_t first = t % Ee;
        auto rank = [&](int64_t e) { return e >= first ? e - first : e - first + Ee; };
        int64_t best = LLONG_MIN, second = LLONG_MIN;
        int32_t arg = 0;
        if (valid) {
          const int32_t* row = st.Q + static_cast<int64_t>(t) * E;
          for (int64_t e = gl; e < Ee; e += group) {
            const int64_t v = static_cast<int64_t>(row[e]) * scale - price[e];
            if (v > best || (v == best && rank(e) < rank(arg))) {
              second = best;
              best = v;
              arg = static_cast<int32_t>(e);
            } else if (v > second) {
              second = v;
            }
          }
        }
        for (int o = 1; o < group; o <<= 1) {
          const int64_t ob = __shfl_xor_sync(kFullMask, best, o);
          const int64_t os = __shfl_xor_sync(kFullMask, second, o);
          const int32_t oa = __shfl_xor_sync(kFullMask, arg, o);
          if (ob > best || (ob == best && rank(oa) < rank(arg))) {
            second = best > os ? best : os;
            best = ob;
            arg = oa;
          } else {
            second = second > ob ? second : ob;
          }
        }
        if (valid && gl == 0) {
          st.target[t] = arg;
          st.new_bid[t] = price[arg] + (best - second) + eps;  // E_eff >= 2: second is a value
          if (atomicAdd(&st.new_count[arg], 1) == 0) st.active[atomicAdd(&sc.num_active, 1)] = arg;
        }
      }
      __syncthreads();
      // offsets: each expert with bids reserves its segment of `bidders`
      for (int32_t j = tid; j < sc.num_active; j += kThreads) {
        const int32_t e = st.active[j];
        st.new_offset[e] = atomicAdd(&sc.reserved, st.new_count[e]);
      }
      __syncthreads();
      for (int32_t i = tid; i < U; i += kThreads) {
        const int32_t t = cur[i], e = st.target[t];
        st.bidders[st.new_offset[e] + atomicAdd(&st.cursor[e], 1)] = t;
      }
      __syncthreads();
      // select
      for (int32_t j = warp; j < sc.num_active; j += kWarps)
        select_expert(st, p, price, st.active[j], next, &sc.next_unassigned, hist[warp]);
      __syncthreads();
      if (tid == 0) {
        sc.unassigned = sc.next_unassigned;
        sc.next_unassigned = 0;
        sc.num_active = 0;
        sc.reserved = 0;
        sc.cur ^= 1;
      }
      __syncthreads();
    }
    // end of phase: shift the prices to min 0
    int64_t low = LLONG_MAX;
    for (int64_t e = tid; e < Ee; e += kThreads) low = price[e] < low ? price[e] : low;
    low = warp_min_i64(low);
    if (lane == 0) red[warp] = low;
    __syncthreads();
    low = red[0];
    for (int w = 1; w < kWarps; ++w) low = red[w] < low ? red[w] : low;
    for (int64_t e = tid; e < Ee; e += kThreads) price[e] -= low;
    __syncthreads();
    if (eps == 1) return;
    eps = eps / assignment::kTheta > 1 ? eps / assignment::kTheta : 1;
  }
}

at::Tensor balanced_assignment_cuda(const at::Tensor& scores_in, int64_t max_rounds) {
  const Params p = assignment::check_assignment_args(scores_in, max_rounds);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const auto iopts = scores_in.options().dtype(at::kInt);
  auto out = at::zeros({p.T, 1}, iopts);
  if (p.E_eff <= 1) return out;  // T <= 1 or E == 1: every token goes to expert 0
  auto scores = scores_in.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = p.T * p.E, T = p.T, Ee = p.E_eff;
  const int num_partials =
      static_cast<int>(std::min<int64_t>(kMaxPartials, ceil_div(n, 4 * kPrepThreads)));
  auto partial = at::empty({2 * num_partials}, scores.options().dtype(at::kDouble));
  auto Q = at::empty({n}, iopts);
  const unsigned qblocks =
      static_cast<unsigned>(std::min<int64_t>(4096, ceil_div(n, kPrepThreads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "balanced_assignment_cuda", [&] {
    minmax_kernel<scalar_t><<<num_partials, kPrepThreads, 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), n, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    quantize_kernel<scalar_t><<<qblocks, kPrepThreads, 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), n, partial.const_data_ptr<double>(), num_partials,
        Q.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const bool smem_prices = Ee <= kMaxSmemExperts;
  auto tok32 = at::empty({5 * T}, iopts);
  auto tok64 = at::empty({2 * T + (smem_prices ? 0 : Ee)}, scores.options().dtype(at::kLong));
  auto exp32 = at::zeros({5 * Ee}, iopts);
  int32_t* t32 = tok32.mutable_data_ptr<int32_t>();
  int64_t* t64 = tok64.mutable_data_ptr<int64_t>();
  int32_t* e32 = exp32.mutable_data_ptr<int32_t>();
  AuctionState st;
  st.Q = Q.const_data_ptr<int32_t>();
  st.partial = partial.const_data_ptr<double>();
  st.num_partials = num_partials;
  st.owner = out.mutable_data_ptr<int32_t>();
  st.bid = t64;
  st.new_bid = t64 + T;
  st.price_global = smem_prices ? nullptr : t64 + 2 * T;
  st.target = t32;
  st.ulist[0] = t32 + T;
  st.ulist[1] = t32 + 2 * T;
  st.bidders = t32 + 3 * T;
  st.slots = t32 + 4 * T;
  st.held = e32;
  st.new_count = e32 + Ee;
  st.new_offset = e32 + 2 * Ee;
  st.cursor = e32 + 3 * Ee;
  st.active = e32 + 4 * Ee;
  int group = 2;
  while (group < 32 && group < Ee) group *= 2;
  const size_t smem = smem_prices ? static_cast<size_t>(Ee) * sizeof(int64_t) : 0;
  auction_kernel<<<1, kThreads, smem, stream>>>(st, p, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { m.impl("balanced_assignment", &balanced_assignment_cuda); }

}  // namespace moeyard
