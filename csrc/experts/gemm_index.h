// Integer helpers of the grouped GEMM kernels (grouped_mm_cuda.cu), for host and device, kept in
// a header without torch so a plain host program can check them: division by a divisor fixed for
// a launch, and the order in which a segment's output tiles are handed out.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MOEYARD_IDX_HD __host__ __device__ __forceinline__
#else
#define MOEYARD_IDX_HD inline
#endif

namespace moeyard {

// n / d for 0 <= n < 2^31 and a divisor 1 <= d < 2^31 fixed for a launch (the row divisor k of a
// RowIndex): one 32 x 32 -> 64-bit multiply and a shift instead of the ~20-instruction integer
// division. With l = ceil(log2 d) and m = ceil(2^(31+l) / d): m d = 2^(31+l) + e with
// 0 <= e < d <= 2^l, so n m / 2^(31+l) = n/d + n e / (d 2^(31+l)) lies in [n/d, n/d + 1/d), whose
// floor is floor(n/d) (Granlund and Montgomery, PLDI 1994, section 4). m < 2^32 (m = 2^31 for
// d = 1, and 2^(31+l)/d < 2^32 for d > 2^(l-1)), and n m < 2^63.
struct RowDiv {
  uint32_t magic = 1u << 31;
  int shift = 31;

  RowDiv() = default;  // d = 1
  explicit RowDiv(int64_t d) {
    int l = 0;
    while ((int64_t(1) << l) < d) ++l;
    magic = static_cast<uint32_t>(((uint64_t(1) << (31 + l)) + uint64_t(d) - 1) / uint64_t(d));
    shift = 31 + l;
  }
  MOEYARD_IDX_HD int32_t operator()(int32_t n) const {
    return static_cast<int32_t>((uint64_t(static_cast<uint32_t>(n)) * magic) >> shift);
  }
};

// Tile order inside one segment (an expert's rows x cols grid of 128 x 128 output tiles): groups
// of G consecutive row tiles, each group walked column by column with its row tiles fastest, so
// the G tiles that share a column's B panel run side by side and the group's G A panels are reused
// for every column. G = 1 is the column-fastest order. A bijection of [0, rows*cols).
MOEYARD_IDX_HD void grouped_tile(int64_t local, int rows, int cols, int G, int& row, int& col) {
  const int first = static_cast<int>(local / (int64_t(G) * cols)) * G;
  const int in_group = G < rows - first ? G : rows - first;
  const int64_t within = local - int64_t(first) * cols;
  row = first + static_cast<int>(within % in_group);
  col = static_cast<int>(within / in_group);
}

// G for a segment of rows x cols tiles. `fit` is how many operand panels (128 rows or columns x
// the K extent: 128 x 4096 bf16 = 1 MiB) fit the L2 share, half the L2 (H100 50 MB, H200 60 MB:
// 25 / 30 MB), since its two partitions each keep a copy of data that SMs on both sides read.
// `concurrent` tiles run at once (the persistent grid: P = 132 blocks on an H100 or H200), so one
// wave covers G row tiles x P/G columns and needs G A panels and ceil(P/G) B panels, one column
// more where it straddles two; the tiles of a wave walk K together, so a panel they share is read
// from HBM once per wave at most.
//  - If all of the segment's B panels fit beside one wave's A panels (cols + ceil(P/cols) + 1 <=
//    fit), G = 1: B stays in L2 and every panel is read from HBM once (qwen3moe: 12-16 columns of
//    0.2-0.5 MiB panels, fit >= 48).
//  - Else the largest G with G + ceil(P/G) + 1 <= fit: the group's A panels stay in L2 while its
//    columns stream, so B is read once per group instead of once per row tile (mixtral's dW1,
//    count 2048 rows: 0.5 MiB panels, fit 47.7, G 42, so all 32 row tiles in one group).
//  - Where no G fits (G + ceil(P/G) + 1 >= 24 for P = 132), G = sqrt(P) ~ 11: the wave with the
//    fewest distinct panels (mixtral gate_up, K 4096: fit 23.8 on an H100; K 14336: fit 6.8).
// G is then evened out over the segment's row tiles (same number of groups: mixtral's 16 row
// tiles per expert go 8 + 8, so its 235 MB of gate_up weights per expert are read twice, not 16
// times). Modelled bytes per product: benchmarks/NOTES.md, benchmarks/l2_model.py.
MOEYARD_IDX_HD int tile_group(float fit, int concurrent, int rows, int cols) {
  if (rows < 1 || cols < 1) return 1;
  if (float(cols + (concurrent + cols - 1) / cols + 1) <= fit) return 1;
  const float c = fit - 2.f;  // G + P/G <= c covers G + ceil(P/G) + 1 <= fit
  const float disc = c * c - 4.f * float(concurrent);
  int g = disc >= 0.f ? static_cast<int>(0.5f * (c + sqrtf(disc)))
                      : static_cast<int>(sqrtf(float(concurrent)) + 0.5f);
  g = g < 1 ? 1 : (g > rows ? rows : g);
  const int groups = (rows + g - 1) / g;
  return (rows + groups - 1) / groups;
}

}  // namespace moeyard
