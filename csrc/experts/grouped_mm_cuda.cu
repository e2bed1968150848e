// The expert-compute primitives on the GPU (declared and specified in grouped_mm.h).
//
// One tile core serves both grouped products:
//   rows_gemm    out[r] = epilogue(a[src(r)] @ b[e])     tiles over (segment, 128 rows, 128 cols)
//   weight_grad  out[e] = sum_r lhs[.]^T rhs[.]           tiles over (expert, 128 x 128 of M x N)
// A block of 256 threads (8 warps, 2 x 4, each 64 x 32) computes one 128 x 128 tile at a time,
// walking K in steps of 32 through a cp.async pipeline (3 stages for 16-bit types, 2 for fp32).
// bf16/fp16 use tensor cores (mma.sync m16n8k16, fragments from ldmatrix, sm_80 and newer);
// fp32 uses CUDA-core FMAs from the same shared tiles with the same ownership of output elements,
// so both share the epilogues (full fp32 precision, no TF32).
//
// Persistent scheduling: the grid is as many blocks as fit on the GPU at once; block b takes
// tiles b, b + grid, ... A tiny kernel first turns the offsets into a prefix of row tiles per
// segment on the device, so no host sync and no launch per expert; a skewed load just means more
// tiles of one expert, spread over every SM. Within a segment (an expert) tiles go in groups of G
// row tiles walked column by column (gemm_index.h: grouped_tile, and tile_group for G from the L2
// size), so the blocks running at once share their B panels and the group's A panels stay in L2.
// Rows are gathered through an index while loading (no permuted copy); cp.async's zero-fill
// handles rows and columns past the edges.
//
// FLOPs 2*R*K*N per product; bytes: the output once, b once per group of row tiles, the
// gathered rows of a once where the group's A panels stay in L2 (benchmarks/NOTES.md counts them
// for the mixtral and qwen3moe shapes). Operand rows must be 16-byte aligned for the
// cp.async path; otherwise the same kernel loads element by element (correct, slower, and said so
// once by a warning).
#include <c10/util/Exception.h>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/cuda_utils.cuh"
#include "experts/gemm_index.h"
#include "experts/grouped_mm.h"

namespace moeyard {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kThreads = 256;
constexpr int kPad = 8;  // elements of padding per shared row: conflict-free ldmatrix rows

template <typename T>
struct Cfg {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  static constexpr int kStages = kTensorCores ? 3 : 2;
  static constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte chunk
};

// Shared tile [outer][inner + pad]; inner is the dimension contiguous in global memory.
template <int Outer, int Inner>
struct Tile {
  static constexpr int kOuter = Outer, kInner = Inner, kLd = Inner + kPad, kSize = Outer * kLd;
};

// ------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t* b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ----------------------------------------------------------------------------- loading
//
// A 16-byte chunk of a shared tile comes from kVec consecutive global elements, of which `valid`
// (0..kVec) exist; the rest are zero. Vec: cp.async with zero-fill; else element loads.

// load_clamped takes 0 <= valid <= kVec; load_chunk clamps any count.
template <typename T, bool Vec>
__device__ __forceinline__ void load_clamped(T* dst, const T* src, int valid,
                                             const T* any_valid) {
  if constexpr (Vec) {
    cp_async16(dst, valid > 0 ? src : any_valid, valid * int(sizeof(T)));
  } else {
#pragma unroll
    for (int i = 0; i < Cfg<T>::kVec; ++i) dst[i] = i < valid ? src[i] : T(0.f);
  }
}

template <typename T, bool Vec>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, int valid, const T* any_valid) {
  constexpr int V = Cfg<T>::kVec;
  load_clamped<T, Vec>(dst, src, valid > 0 ? (valid < V ? valid : V) : 0, any_valid);
}

// Chunks of a tile owned by one thread.
template <typename T, typename TileT>
constexpr int chunks_per_thread() {
  return TileT::kOuter * TileT::kInner / Cfg<T>::kVec / kThreads;
}

template <typename T, typename TileT>
__device__ __forceinline__ void chunk_pos(int c, int& outer, int& inner) {
  constexpr int per_row = TileT::kInner / Cfg<T>::kVec;
  const int id = threadIdx.x + c * kThreads;
  outer = id / per_row;
  inner = (id % per_row) * Cfg<T>::kVec;
}

// ------------------------------------------------------------------------------ compute
//
// Warp w owns rows (w / 4) * 64 .. +64 and columns (w % 4) * 32 .. +32 of the tile: 4 x 4
// fragments of 16 x 8. Lane l holds, of fragment (i, j), rows g and g + 8 (g = l / 4) and
// columns 2 t, 2 t + 1 (t = l % 4): acc[i][j][0..3] = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// A operand stored [m][k] (AKM = false) or [k][m]; B stored [n][k] (BKN = false) or [k][n].

template <typename T, bool AKM, bool BKN>
struct Operands {
  using TileA = std::conditional_t<AKM, Tile<kBK, kBM>, Tile<kBM, kBK>>;
  using TileB = std::conditional_t<BKN, Tile<kBK, kBN>, Tile<kBN, kBK>>;
  static constexpr int kStageSize = TileA::kSize + TileB::kSize;
  static constexpr size_t kSmemBytes = size_t(Cfg<T>::kStages) * kStageSize * sizeof(T);

  __device__ static T a_at(const T* s, int m, int k) {
    return AKM ? s[k * TileA::kLd + m] : s[m * TileA::kLd + k];
  }
  __device__ static T b_at(const T* s, int k, int n) {
    return BKN ? s[k * TileB::kLd + n] : s[n * TileB::kLd + k];
  }

  // acc += A_tile @ B_tile over the kBK columns of one stage.
  __device__ static void mma_stage(const T* sa, const T* sb, float (&acc)[4][4][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    if constexpr (Cfg<T>::kTensorCores) {
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t a[4][4], b[4][2];
        const int i = lane >> 3, j = lane & 7;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          const int m0 = wm + mi * 16;
          const T* p = AKM ? sa + (kk + (i >> 1) * 8 + j) * TileA::kLd + m0 + (i & 1) * 8
                           : sa + (m0 + (lane & 15)) * TileA::kLd + kk + (lane >> 4) * 8;
          ldmatrix_x4<AKM>(a[mi], p);
        }
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          const int n0 = wn + nj * 16 + (i >> 1) * 8;
          const T* p = BKN ? sb + (kk + (i & 1) * 8 + j) * TileB::kLd + n0
                           : sb + (n0 + j) * TileB::kLd + kk + (i & 1) * 8;
          uint32_t r[4];
          ldmatrix_x4<BKN>(r, p);
          b[2 * nj][0] = r[0];
          b[2 * nj][1] = r[1];
          b[2 * nj + 1][0] = r[2];
          b[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], a[mi], b[ni]);
      }
    } else {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll 4
      for (int k = 0; k < kBK; ++k) {
        float a[4][2], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
          a[mi][0] = static_cast<float>(a_at(sa, wm + mi * 16 + g, k));
          a[mi][1] = static_cast<float>(a_at(sa, wm + mi * 16 + g + 8, k));
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          b[ni][0] = static_cast<float>(b_at(sb, k, wn + ni * 8 + 2 * t));
          b[ni][1] = static_cast<float>(b_at(sb, k, wn + ni * 8 + 2 * t + 1));
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            acc[mi][ni][0] += a[mi][0] * b[ni][0];
            acc[mi][ni][1] += a[mi][0] * b[ni][1];
            acc[mi][ni][2] += a[mi][1] * b[ni][0];
            acc[mi][ni][3] += a[mi][1] * b[ni][1];
          }
      }
    }
  }
};

// The main loop shared by both kernels: k-steps 0..ktiles-1 through the multi-stage pipeline.
// load(stage_ptr_a, stage_ptr_b, kt) issues the loads of step kt; after_load(kt) runs in
// iteration kt after its loads are issued, before its MMAs (between the same two barriers).
template <typename T, typename Ops, typename Load, typename AfterLoad>
__device__ __forceinline__ void main_loop(T* smem, int ktiles, float (&acc)[4][4][4], Load load,
                                          AfterLoad after_load) {
  constexpr int S = Cfg<T>::kStages;
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < ktiles) load(smem + st * Ops::kStageSize, smem + st * Ops::kStageSize + Ops::TileA::kSize, st);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();
    const int next = kt + S - 1;
    if (next < ktiles) {
      T* st = smem + (next % S) * Ops::kStageSize;
      load(st, st + Ops::TileA::kSize, next);
    }
    cp_async_commit();
    after_load(kt);
    const T* st = smem + (kt % S) * Ops::kStageSize;
    Ops::mma_stage(st, st + Ops::TileA::kSize, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // the shared tiles are free for the next tile
}

__device__ __forceinline__ void zero_acc(float (&acc)[4][4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Source row of an index entry v (v < 0 or v / div >= limit: no row).
__device__ __forceinline__ int64_t source_of(int32_t v, RowDiv div, int64_t limit) {
  const int64_t s = v < 0 ? -1 : div(v);
  return s < limit ? s : -1;
}

// Source row of position p through an optional index.
__device__ __forceinline__ int64_t source_row(const int32_t* index, RowDiv div, int64_t p,
                                              int64_t limit) {
  return index == nullptr ? p : source_of(index[p], div, limit);
}

// Rows of a 2-D operand read through an optional index (see RowIndex in grouped_mm.h).
template <typename T>
struct Gathered {
  const T* data;
  int64_t ld, rows;
  const int32_t* index;  // null: position p reads row p
  RowDiv div;

  // Row pointer of position p, or null (no row).
  __device__ __forceinline__ const T* row(int64_t p) const {
    const int64_t r = source_row(index, div, p, rows);
    return r >= 0 ? data + r * ld : nullptr;
  }
};

// The division by a RowIndex's divisor (k: index entries are token * k + slot).
inline RowDiv row_div(const RowIndex& rows) {
  TORCH_CHECK(rows.div >= 1 && rows.div < (int64_t(1) << 31),
              "moeyard: the row divisor must lie in [1, 2^31), got ", rows.div);
  return RowDiv(rows.div);
}

template <typename T>
Gathered<T> gathered(const at::Tensor& t, const RowIndex& rows) {
  return Gathered<T>{t.const_data_ptr<T>(), t.stride(0), t.size(0),
                     rows.index ? rows.index->const_data_ptr<int32_t>() : nullptr, row_div(rows)};
}

// ---------------------------------------------------------------------------- segments

struct SegParams {
  const int32_t* offsets;
  int E;
  int64_t R;
  int64_t capacity;  // < 0: dropless
};

// Segment s: first row, rows covered, rows used. Dropless has a tail segment E (rows past
// offsets[E], all unused). Clamped so that bad offsets can never address outside [0, R).
__device__ __forceinline__ void segment_of(const SegParams& p, int s, int64_t& start,
                                           int64_t& len, int64_t& count) {
  if (s == p.E) {
    start = min64(max64(p.offsets[p.E], 0), p.R);
    len = p.R - start;
    count = 0;
    return;
  }
  const int64_t n = max64(int64_t(p.offsets[s + 1]) - p.offsets[s], 0);
  if (p.capacity >= 0) {
    start = s * p.capacity;
    len = p.capacity;
    count = min64(n, p.capacity);
  } else {
    start = min64(max64(p.offsets[s], 0), p.R);
    len = min64(n, p.R - start);
    count = len;
  }
}

inline int num_segments(const Segments& seg) {
  return static_cast<int>(seg.E + (seg.capacity ? 0 : 1));
}

// prefix[s] = row tiles of segments 0..s-1 (prefix[S] = all row tiles). One block.
constexpr int kScanThreads = 1024;

__global__ void __launch_bounds__(kScanThreads) row_tile_prefix_kernel(SegParams p, int S,
                                                                       int32_t* prefix) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  int carry = 0;
  if (threadIdx.x == 0) prefix[0] = 0;
  for (int base = 0; base < S; base += kScanThreads) {
    const int s = base + threadIdx.x;
    int tiles = 0;
    if (s < S) {
      int64_t start, len, count;
      segment_of(p, s, start, len, count);
      tiles = static_cast<int>((len + kBM - 1) / kBM);
    }
    int inclusive, total;
    Scan(temp).InclusiveSum(tiles, inclusive, total);
    if (s < S) prefix[s + 1] = carry + inclusive;
    carry += total;
    __syncthreads();  // temp is reused
  }
}

// ---------------------------------------------------------------------------- rows_gemm

template <typename T>
struct RowsParams {
  SegParams seg;
  Gathered<T> a;
  const T* b;
  int64_t sbe, sbk, sbn;  // strides of b [E, K, N]
  int K, N;               // N: columns of the product
  const T* bias;          // [E, N] contiguous rows, or null
  int64_t ldbias;
  T* out;
  int64_t ldo;
  T* pre;  // [R, N] or null
  int64_t ldp;
  bool pair_out, pair_pre;  // rows aligned for two-element stores
  Activation act;
  int n_tiles;
  const int32_t* prefix;
  float l2_rows;  // the tile order's L2 share over the bytes of one K row of a 128-wide panel
};

// Column map of the product tile: local column l of column tile nt -> column of b, and whether
// it exists. Gated on halves: each 16 local columns are 8 gate columns then the 8 matching up
// columns, so a thread's fragments j and j+1 hold gate and up of the same output column.
template <typename T>
__device__ __forceinline__ int b_column(const RowsParams<T>& p, int nt, int l, int& valid) {
  if (p.act.glu == Glu::Halves) {
    const int I = p.N / 2;
    const int j = nt * (kBN / 2) + (l >> 4) * 8 + (l & 7);
    valid = I - j;
    return ((l & 15) >= 8 ? I : 0) + j;
  }
  const int n = nt * kBN + l;
  valid = p.N - n;
  return n;
}

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x, y;
};

// Writes v0 (and v1 when `both`) at columns c (and c + 1) of row r; one paired store when the
// launcher found the rows aligned for it (c is always even).
template <typename T>
__device__ __forceinline__ void store2(T* base, int64_t ld, bool paired, int64_t r, int64_t c,
                                       float v0, float v1, bool both) {
  T* q = base + r * ld + c;
  if (paired && both) {
    *reinterpret_cast<Pair<T>*>(q) = Pair<T>{static_cast<T>(v0), static_cast<T>(v1)};
    return;
  }
  q[0] = static_cast<T>(v0);
  if (both) q[1] = static_cast<T>(v1);
}

template <typename T, bool Vec, bool BKN>
__global__ void __launch_bounds__(kThreads, 1) rows_gemm_kernel(const RowsParams<T> p) {
  using Ops = Operands<T, false, BKN>;
  constexpr int V = Cfg<T>::kVec;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int S = p.seg.E + (p.seg.capacity >= 0 ? 0 : 1);
  const int64_t total = int64_t(p.prefix[S]) * p.n_tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32, g = lane >> 2, t = lane & 3;
  const float panels_fit = p.l2_rows / float(p.K > 0 ? p.K : 1);
  int group_seg = -1, group = 1;  // tile_group of segment group_seg (a block's tiles come in runs)

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    // Segment s owns tiles prefix[s] * n_tiles .. prefix[s + 1] * n_tiles - 1, in grouped order.
    const int mt = static_cast<int>(tile / p.n_tiles);
    int lo = 0, hi = S;  // the segment s with prefix[s] <= mt < prefix[s + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (p.prefix[mid] <= mt) lo = mid; else hi = mid;
    }
    const int s = lo;
    const int seg_tiles = p.prefix[s + 1] - p.prefix[s];
    if (s != group_seg) {
      group = tile_group(panels_fit, static_cast<int>(gridDim.x), seg_tiles, p.n_tiles);
      group_seg = s;
    }
    int smt, nt;
    grouped_tile(tile - int64_t(p.prefix[s]) * p.n_tiles, seg_tiles, p.n_tiles, group, smt, nt);
    int64_t start, len, count;
    segment_of(p.seg, s, start, len, count);
    const int64_t m0 = int64_t(smt) * kBM;
    const int rows = static_cast<int>(min64(kBM, len - m0));
    const int used = static_cast<int>(max64(0, min64(kBM, count - m0)));
    const int e = min(s, p.seg.E - 1);
    const T* b_e = p.b + e * p.sbe;

    // Per-thread chunk sources that stay fixed over k: A rows, B columns.
    constexpr int CA = chunks_per_thread<T, typename Ops::TileA>();
    constexpr int CB = chunks_per_thread<T, typename Ops::TileB>();
    const T* a_row[CA];
#pragma unroll
    for (int c = 0; c < CA; ++c) {
      int o, i;
      chunk_pos<T, typename Ops::TileA>(c, o, i);
      a_row[c] = o < used ? p.a.row(start + m0 + o) : nullptr;
    }
    const T* b_fixed[CB];  // BKN: column base (k added per step); else row base of column n
    int b_valid[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      int o, i;
      chunk_pos<T, typename Ops::TileB>(c, o, i);
      int valid;
      const int col = b_column(p, nt, BKN ? i : o, valid);
      b_valid[c] = valid;
      b_fixed[c] = valid > 0 ? b_e + int64_t(col) * p.sbn : nullptr;
    }

    float acc[4][4][4];
    zero_acc(acc);
    const int ktiles = used > 0 ? (p.K + kBK - 1) / kBK : 0;
    main_loop<T, Ops>(smem, ktiles, acc, [&](T* sa, T* sb, int kt) {
      const int k0 = kt * kBK;
#pragma unroll
      for (int c = 0; c < CA; ++c) {
        int o, i;
        chunk_pos<T, typename Ops::TileA>(c, o, i);
        const int valid = a_row[c] ? p.K - (k0 + i) : 0;
        load_chunk<T, Vec>(sa + o * Ops::TileA::kLd + i, a_row[c] ? a_row[c] + k0 + i : p.a.data,
                           valid, p.a.data);
      }
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        int o, i;
        chunk_pos<T, typename Ops::TileB>(c, o, i);
        if constexpr (BKN) {  // o = k, i = n: chunk of V columns at row k0 + o
          const bool ok = b_fixed[c] != nullptr && k0 + o < p.K;
          load_chunk<T, Vec>(sb + o * Ops::TileB::kLd + i,
                             ok ? b_fixed[c] + int64_t(k0 + o) * p.sbk : p.b,
                             ok ? min(b_valid[c], V) : 0, p.b);
        } else {  // o = n, i = k: chunk of V k-values of column o
          const bool ok = b_fixed[c] != nullptr;
          load_chunk<T, Vec>(sb + o * Ops::TileB::kLd + i, ok ? b_fixed[c] + k0 + i : p.b,
                             ok ? p.K - (k0 + i) : 0, p.b);
        }
      }
    }, [](int) {});

    // Epilogue: bias, activation, zeros for unused rows; pre-activation kept if asked.
    const T* bias = p.bias ? p.bias + e * p.ldbias : nullptr;
    const auto bias_at = [&](int col) { return bias ? static_cast<float>(bias[col]) : 0.f; };
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = wm + mi * 16 + g + h * 8;
        if (lr >= rows) continue;
        const bool on = lr < used;
        const int64_t r = start + m0 + lr;
        if (p.act.glu == Glu::Halves) {
#pragma unroll
          for (int ni = 0; ni < 4; ni += 2) {  // fragments ni: gate, ni + 1: up
            int valid;
            const int j = b_column(p, nt, wn + ni * 8 + 2 * t, valid);
            if (valid <= 0) continue;
            const bool both = valid > 1;
            const int I = p.N / 2;
            const float g0 = acc[mi][ni][2 * h] + bias_at(j);
            const float g1 = both ? acc[mi][ni][2 * h + 1] + bias_at(j + 1) : 0.f;
            const float u0 = acc[mi][ni + 1][2 * h] + bias_at(I + j);
            const float u1 = both ? acc[mi][ni + 1][2 * h + 1] + bias_at(I + j + 1) : 0.f;
            if (p.pre) {
              store2(p.pre, p.ldp, p.pair_pre, r, j, on ? g0 : 0.f, on ? g1 : 0.f, both);
              store2(p.pre, p.ldp, p.pair_pre, r, I + j, on ? u0 : 0.f, on ? u1 : 0.f, both);
            }
            store2(p.out, p.ldo, p.pair_out, r, j, on ? glu_value<float>(p.act, g0, u0) : 0.f,
                   on ? glu_value<float>(p.act, g1, u1) : 0.f, both);
          }
        } else {
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int col = nt * kBN + wn + ni * 8 + 2 * t;
            if (col >= p.N) continue;
            const bool both = col + 1 < p.N;  // always for GPT-OSS (N even)
            const float v0 = acc[mi][ni][2 * h] + bias_at(col);
            const float v1 = both ? acc[mi][ni][2 * h + 1] + bias_at(col + 1) : 0.f;
            if (p.pre) store2(p.pre, p.ldp, p.pair_pre, r, col, on ? v0 : 0.f, on ? v1 : 0.f, both);
            if (p.act.glu == Glu::OssPairs)  // (gate, up) = (col, col + 1) -> column col / 2
              p.out[r * p.ldo + col / 2] =
                  static_cast<T>(on ? glu_value<float>(p.act, v0, v1) : 0.f);
            else
              store2(p.out, p.ldo, p.pair_out, r, col, on ? act_value<float>(p.act.fn, v0) : 0.f,
                     on ? act_value<float>(p.act.fn, v1) : 0.f, both);
          }
        }
      }
  }
}

// -------------------------------------------------------------------------- weight_grad

template <typename T>
struct WgradParams {
  SegParams seg;
  Gathered<T> lhs, rhs;
  int M, N;
  T* out;
  int64_t soe, som, son;
  int m_tiles, n_tiles;
  float l2_rows;  // as in RowsParams; the K extent of expert e is its row count
};

// Row offsets of one K step of the weight gradient: for each of its kBK rows, the element offset
// (row * ld) of the row that lhs and rhs read, or -1 where there is none (past the expert's count,
// an index entry < 0 or past the operand). 16 bytes: one LDS.128 per chunk row.
struct alignas(16) RowPair {
  int64_t lhs, rhs;
};

// Staging of one operand's rows, lane o for row o of a K step (q = step * kBK + o of the expert's
// `count` rows from `first`): fetch_entry loads the index entry one iteration before row_offset
// turns it into an offset, so the load's latency hides behind that iteration's MMAs instead of
// stalling the cp.async issue.
template <typename T>
__device__ __forceinline__ int32_t fetch_entry(const Gathered<T>& op, int64_t first, int64_t count,
                                               int64_t q) {
  return op.index != nullptr && q < count ? op.index[first + q] : -1;
}

template <typename T>
__device__ __forceinline__ int64_t row_offset(const Gathered<T>& op, int64_t first, int64_t count,
                                              int64_t q, int32_t entry) {
  if (q >= count) return -1;
  const int64_t r = op.index != nullptr ? source_of(entry, op.div, op.rows) : first + q;
  return r >= 0 && r < op.rows ? r * op.ld : -1;
}

template <typename T, bool Vec>
__global__ void __launch_bounds__(kThreads, 1) weight_grad_kernel(const WgradParams<T> p) {
  using Ops = Operands<T, true, true>;
  using TileT = typename Ops::TileA;
  static_assert(std::is_same_v<TileT, typename Ops::TileB>, "lhs and rhs chunks share rows");
  static_assert(kBK == 32, "one lane of a staging warp per row of a K step");
  constexpr int S = Cfg<T>::kStages, V = Cfg<T>::kVec, C = chunks_per_thread<T, TileT>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  RowPair* staged = reinterpret_cast<RowPair*>(smem_raw + Ops::kSmemBytes);  // [S][kBK]
  const int64_t per_expert = int64_t(p.m_tiles) * p.n_tiles;
  const int64_t total = per_expert * p.seg.E;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32, g = lane >> 2, t = lane & 3;
  int group_expert = -1, group = 1;  // tile_group of expert group_expert

  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int e = static_cast<int>(tile / per_expert);
    int64_t start, len, count;
    segment_of(p.seg, e, start, len, count);
    if (e != group_expert) {  // G from the expert's row count, its K extent
      group = tile_group(p.l2_rows / float(max64(count, 1)), static_cast<int>(gridDim.x),
                         p.m_tiles, p.n_tiles);
      group_expert = e;
    }
    int mt, nt;
    grouped_tile(tile - e * per_expert, p.m_tiles, p.n_tiles, group, mt, nt);
    const int m0 = mt * kBM, n0 = nt * kBN;
    const int ktiles = static_cast<int>((count + kBK - 1) / kBK);

    // Steps 0..S-1 are staged here (the prologue loads read 0..S-2, iteration 0 stages S and
    // loads S-1); step j >= S is staged in iteration j - S, into slot j % S, which nothing reads
    // then: iteration j - S loads step j - 1 from slot (j - 1) % S, and the last reader of the
    // slot's previous step j - S loaded it in iteration j - 2S + 1 < j - S, before the barrier
    // that opens iteration j - S. Iteration j - S + 1 loads step j after its own opening barrier.
    // The previous tile's last reads came before main_loop's closing barrier.
    int32_t entry = -1;  // staging warps: the index entry of the next step to stage
    const auto put = [&](const Gathered<T>& op, int field, int step, int32_t v) {
      int64_t* slot = reinterpret_cast<int64_t*>(staged + (step % S) * kBK + lane);
      slot[field] = row_offset(op, start, count, int64_t(step) * kBK + lane, v);
    };
    const auto prologue = [&](const Gathered<T>& op, int field) {
      int32_t first[S];
#pragma unroll
      for (int j = 0; j < S; ++j)
        first[j] = fetch_entry(op, start, count, int64_t(j) * kBK + lane);
#pragma unroll
      for (int j = 0; j < S; ++j)
        if (j < ktiles) put(op, field, j, first[j]);
      entry = fetch_entry(op, start, count, int64_t(S) * kBK + lane);
    };
    const auto stage = [&](const Gathered<T>& op, int field, int j) {  // and fetch j + 1
      put(op, field, j, entry);
      entry = fetch_entry(op, start, count, int64_t(j + 1) * kBK + lane);
    };
    if (warp == 0) prologue(p.lhs, 0);
    if (warp == 1) prologue(p.rhs, 1);
    __syncthreads();

    // Per-tile parts of this thread's chunks: chunk c is row o_c of a K step, columns
    // m0 + i_c (lhs) and n0 + i_c (rhs), of which lvalid / rvalid (0..V) exist.
    const T* lcol[C];
    const T* rcol[C];
    int lvalid[C], rvalid[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      int o, i;
      chunk_pos<T, TileT>(c, o, i);
      lcol[c] = p.lhs.data + m0 + i;
      rcol[c] = p.rhs.data + n0 + i;
      lvalid[c] = max(0, min(p.M - (m0 + i), V));
      rvalid[c] = max(0, min(p.N - (n0 + i), V));
    }

    float acc[4][4][4];
    zero_acc(acc);
    main_loop<T, Ops>(
        smem, ktiles, acc,
        [&](T* sa, T* sb, int kt) {
          const RowPair* rows = staged + (kt % S) * kBK;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            int o, i;
            chunk_pos<T, TileT>(c, o, i);
            const RowPair r = rows[o];
            const int lv = r.lhs >= 0 ? lvalid[c] : 0, rv = r.rhs >= 0 ? rvalid[c] : 0;
            load_clamped<T, Vec>(sa + o * TileT::kLd + i, lv > 0 ? lcol[c] + r.lhs : p.lhs.data,
                                 lv, p.lhs.data);
            load_clamped<T, Vec>(sb + o * TileT::kLd + i, rv > 0 ? rcol[c] + r.rhs : p.rhs.data,
                                 rv, p.rhs.data);
          }
        },
        [&](int kt) {
          const int j = kt + S;
          if (j < ktiles) {
            if (warp == 0) stage(p.lhs, 0, j);
            if (warp == 1) stage(p.rhs, 1, j);
          }
        });

    T* out = p.out + e * p.soe;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + mi * 16 + g + h * 8;
        if (m >= p.M) continue;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int n = n0 + wn + ni * 8 + 2 * t + q;
            if (n < p.N) out[m * p.som + n * p.son] = static_cast<T>(acc[mi][ni][2 * h + q]);
          }
      }
  }
}

// --------------------------------------------------------------- segment_sum, act_backward

// out[s, n] = sum_{p in [begin[s], end[s])} scale[p] * src[src(p), n], fp32, position order.
template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ src, int64_t lds, int64_t rows,
                                   const int32_t* __restrict__ index, RowDiv div,
                                   const float* __restrict__ scale,
                                   const int64_t* __restrict__ begin,
                                   const int64_t* __restrict__ end, T* __restrict__ out,
                                   int64_t ldo, int64_t son, int64_t N) {
  const int64_t s = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t q_end = end[s];
  int64_t q = begin[s];
  float acc = 0.f;
  // U rows in flight: their index entries, then their values, then the adds in position order
  // (the same fp32 sum as one row at a time).
  constexpr int U = 4;
  for (; q + U <= q_end; q += U) {
    int64_t r[U];
    float v[U], w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r[u] = source_row(index, div, q + u, rows);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      v[u] = r[u] >= 0 ? static_cast<float>(src[r[u] * lds + n]) : 0.f;
      w[u] = scale && r[u] >= 0 ? scale[q + u] : 1.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (r[u] >= 0) acc += scale ? w[u] * v[u] : v[u];
  }
  for (; q < q_end; ++q) {
    const int64_t r = source_row(index, div, q, rows);
    if (r < 0) continue;
    const float v = static_cast<float>(src[r * lds + n]);
    acc += scale ? scale[q] * v : v;
  }
  out[s * ldo + n * son] = static_cast<T>(acc);
}

constexpr int kActThreads = 128;

// One block per row: grad_pre, act_w and grad_w (see ActBackward). grad_pre may be pre itself
// (expert_ffn's backward reuses a consumable pre-activation): each thread reads the one or two pre
// elements of its output column before it writes their gradients, and no other thread touches
// them, so pre and grad_pre are not __restrict__.
template <typename T>
__global__ void __launch_bounds__(kActThreads) act_backward_kernel(
    const T* __restrict__ grad_act, const T* pre, const float* __restrict__ row_weight,
    Activation act, int64_t I, int64_t width, T* grad_pre, T* __restrict__ act_w,
    float* __restrict__ grad_w) {
  const int64_t r = blockIdx.x;
  const float w = row_weight[r];
  const T* g = grad_act + r * I;
  const T* h = pre + r * width;
  T* gp = grad_pre + r * width;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < I; j += kActThreads) {
    const float go = static_cast<float>(g[j]);
    const float a = act_backward_at<float>(act, h, gp, width, j, w * go);
    act_w[r * I + j] = static_cast<T>(w * a);
    dot += go * a;
  }
  __shared__ float partial[kActThreads / 32];
  dot = warp_sum(dot);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < kActThreads / 32; ++i) total += partial[i];
    grad_w[r] = total;
  }
}

// ------------------------------------------------------------------------------ launches

inline void check_cuda_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble,
              "moeyard: float64 expert compute runs on the CPU only; use float32, float16 or "
              "bfloat16 on the GPU");
}


inline void warn_unaligned(const char* what) {
  TORCH_WARN_ONCE("moeyard: ", what, " has rows that are not 16-byte aligned (a row size or "
                  "stride that is not a multiple of 8 half-precision / 4 fp32 elements, or an "
                  "offset view); the grouped product loads it element by element, several times "
                  "slower. Pad the hidden sizes or pass contiguous tensors.");
}

// Launch Kernel with as many blocks as fit on the current GPU at once (its shared-memory opt-in
// and occupancy are looked up once per kernel and device).
template <auto Kernel, typename Params>
void launch_persistent(const Params& params, size_t smem) {
  static std::array<std::atomic<int>, 64> blocks_per_sm{};  // 0: not known yet
  const int device = at::cuda::current_device();
  TORCH_CHECK(device < 64, "moeyard: at most 64 GPUs per process");
  int n = blocks_per_sm[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, smem));
    n = n > 0 ? n : 1;
    blocks_per_sm[device].store(n, std::memory_order_relaxed);
  }
  const int grid = n * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tile order's L2 share (half the L2, see tile_group) over one K row of a 128-wide panel.
template <typename T>
float l2_panel_rows() {
  return float(at::cuda::getCurrentDeviceProperties()->l2CacheSize) / 2.f / float(kBM * sizeof(T));
}

SegParams seg_params(const at::Tensor& offsets, const Segments& seg) {
  return SegParams{offsets.const_data_ptr<int32_t>(), static_cast<int>(seg.E), seg.R,
                   seg.capacity ? *seg.capacity : -1};
}

const int32_t* index_ptr(const RowIndex& rows) {
  return rows.index ? rows.index->const_data_ptr<int32_t>() : nullptr;
}

template <typename T>
void launch_rows_gemm(const RowsGemm& p) {
  const int S = num_segments(p.seg);
  auto prefix = at::empty({S + 1}, p.offsets.options());
  RowsParams<T> k{};
  k.seg = seg_params(p.offsets, p.seg);
  row_tile_prefix_kernel<<<1, kScanThreads, 0, at::cuda::getCurrentCUDAStream()>>>(k.seg, S, prefix.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  k.a = gathered<T>(p.a, p.a_rows);
  k.b = p.b.const_data_ptr<T>();
  k.sbe = p.b.stride(0);
  k.sbk = p.b.stride(1);
  k.sbn = p.b.stride(2);
  k.K = static_cast<int>(p.b.size(1));
  k.N = static_cast<int>(p.b.size(2));
  const at::Tensor bias = p.bias ? p.bias->contiguous() : at::Tensor();
  k.bias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  k.ldbias = bias.defined() ? bias.stride(0) : 0;
  k.out = p.out.mutable_data_ptr<T>();
  k.ldo = p.out.stride(0);
  k.pre = p.pre.defined() ? p.pre.mutable_data_ptr<T>() : nullptr;
  k.ldp = p.pre.defined() ? p.pre.stride(0) : 0;
  k.act = p.act;
  const auto pairs_ok = [](const void* base, int64_t ld) {
    return reinterpret_cast<uintptr_t>(base) % (2 * sizeof(T)) == 0 && ld % 2 == 0;
  };
  k.pair_out = pairs_ok(k.out, k.ldo);
  const bool halves = p.act.glu == Glu::Halves;
  k.pair_pre = k.pre && pairs_ok(k.pre, k.ldp) && (!halves || (k.N / 2) % 2 == 0);
  k.n_tiles = static_cast<int>(halves ? ceil_div(k.N / 2, kBN / 2) : ceil_div(k.N, kBN));
  k.prefix = prefix.const_data_ptr<int32_t>();
  k.l2_rows = l2_panel_rows<T>();
  const bool bkn = p.b.stride(2) == 1;
  constexpr int V = Cfg<T>::kVec;
  const int64_t b_outer = bkn ? k.sbk : k.sbn;
  const bool vec = aligned(k.a.data, 16) && aligned(k.b, 16) && k.a.ld % V == 0 &&
                   b_outer % V == 0 && k.sbe % V == 0 &&
                   (!bkn || !halves || (k.N / 2) % V == 0);
  if (!vec) warn_unaligned("an operand of a grouped product");
  constexpr size_t smem_kn = Operands<T, false, true>::kSmemBytes;
  constexpr size_t smem_nk = Operands<T, false, false>::kSmemBytes;
  if (bkn && vec) launch_persistent<rows_gemm_kernel<T, true, true>>(k, smem_kn);
  if (bkn && !vec) launch_persistent<rows_gemm_kernel<T, false, true>>(k, smem_kn);
  if (!bkn && vec) launch_persistent<rows_gemm_kernel<T, true, false>>(k, smem_nk);
  if (!bkn && !vec) launch_persistent<rows_gemm_kernel<T, false, false>>(k, smem_nk);
}

template <typename T>
void launch_weight_grad(const WeightGrad& p) {
  WgradParams<T> k{};
  k.seg = seg_params(p.offsets, p.seg);
  k.lhs = gathered<T>(p.lhs, p.lhs_rows);
  k.rhs = gathered<T>(p.rhs, p.rhs_rows);
  k.M = static_cast<int>(p.out.size(1));
  k.N = static_cast<int>(p.out.size(2));
  k.out = p.out.mutable_data_ptr<T>();
  k.soe = p.out.stride(0);
  k.som = p.out.stride(1);
  k.son = p.out.stride(2);
  if (k.som == 1 && k.son != 1) {
    // out[e] is m-contiguous (the gradient of a transposed, nn.Linear-style weight): compute
    // out[e]^T = sum rhs^T lhs instead, so that the epilogue's stores run along memory.
    std::swap(k.lhs, k.rhs);
    std::swap(k.M, k.N);
    std::swap(k.som, k.son);
  }
  k.m_tiles = static_cast<int>(ceil_div(k.M, kBM));
  k.n_tiles = static_cast<int>(ceil_div(k.N, kBN));
  k.l2_rows = l2_panel_rows<T>();
  constexpr int V = Cfg<T>::kVec;
  const bool vec = aligned(k.lhs.data, 16) && aligned(k.rhs.data, 16) && k.lhs.ld % V == 0 &&
                   k.rhs.ld % V == 0;
  if (!vec) warn_unaligned("an operand of a weight gradient");
  constexpr size_t smem =
      Operands<T, true, true>::kSmemBytes + Cfg<T>::kStages * kBK * sizeof(RowPair);
  static_assert(Operands<T, true, true>::kSmemBytes % alignof(RowPair) == 0);
  if (vec)
    launch_persistent<weight_grad_kernel<T, true>>(k, smem);
  else
    launch_persistent<weight_grad_kernel<T, false>>(k, smem);
}

template <typename Fn>
void dispatch_16_32(at::ScalarType t, Fn fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "moeyard: unsupported dtype ", t, " for expert compute on CUDA");
  }
}

}  // namespace

void rows_gemm_cuda(const RowsGemm& p) {
  check_cuda_dtype(p.a);
  TORCH_CHECK(p.b.size(1) < (int64_t(1) << 31) && p.b.size(2) < (int64_t(1) << 31),
              "moeyard: K and N must be below 2^31");
  dispatch_16_32(p.a.scalar_type(), [&](auto v) { launch_rows_gemm<decltype(v)>(p); });
}

void weight_grad_cuda(const WeightGrad& p) {
  check_cuda_dtype(p.lhs);
  dispatch_16_32(p.lhs.scalar_type(), [&](auto v) { launch_weight_grad<decltype(v)>(p); });
}

void segment_sum_cuda(const SegmentSum& p) {
  check_cuda_dtype(p.src);
  const int64_t S = p.out.size(0), N = p.out.size(1);
  if (S == 0 || N == 0) return;
  const auto begin = p.begin.to(at::kLong).contiguous(), end = p.end.to(at::kLong).contiguous();
  const auto scale = p.scale ? p.scale->to(at::kFloat).contiguous() : at::Tensor();
  const auto src = p.src.contiguous();
  constexpr int threads = 256;
  TORCH_CHECK(ceil_div(N, threads) < 65536, "moeyard: segment_sum width too large");
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(ceil_div(N, threads)));
  dispatch_16_32(src.scalar_type(), [&](auto v) {
    using T = decltype(v);
    segment_sum_kernel<T><<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<T>(), src.stride(0), src.size(0), index_ptr(p.rows),
        row_div(p.rows), scale.defined() ? scale.const_data_ptr<float>() : nullptr,
        begin.const_data_ptr<int64_t>(), end.const_data_ptr<int64_t>(), p.out.mutable_data_ptr<T>(),
        p.out.stride(0), p.out.stride(1), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void act_backward_cuda(const ActBackward& p) {
  check_cuda_dtype(p.pre);
  const int64_t R = p.pre.size(0);
  if (R == 0) return;
  const auto grad_act = p.grad_act.contiguous(), pre = p.pre.contiguous();
  const auto row_weight = p.row_weight.to(at::kFloat).contiguous();
  dispatch_16_32(pre.scalar_type(), [&](auto v) {
    using T = decltype(v);
    act_backward_kernel<T><<<static_cast<unsigned>(R), kActThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        grad_act.const_data_ptr<T>(), pre.const_data_ptr<T>(), row_weight.const_data_ptr<float>(),
        p.act, grad_act.size(1), pre.size(1), p.grad_pre.mutable_data_ptr<T>(),
        p.act_w.mutable_data_ptr<T>(), p.grad_w.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moeyard
