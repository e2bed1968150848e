// Integer helpers of the grouped GEMM kernels (grouped_mm_cuda.cu), for host and device, kept in
// a header without torch so a plain host program can check them: division by a divisor fixed for
// a launch.
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

}  // namespace moeyard
