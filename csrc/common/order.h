// Total order used by every selection in moeyard (top-k, groups, expert choice, score priority):
// larger value first, ties broken by the lower index, NaN below every number (-inf included),
// -0 equal to +0. A float value and an index pack into one uint64 whose unsigned order is that
// order, so a selection is a max over integers: deterministic on CPU and GPU alike.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOEYARD_HD __host__ __device__ __forceinline__
#else
#define MOEYARD_HD inline
#endif

namespace moeyard {

MOEYARD_HD uint32_t order_bits(float v) {
  if (v != v) return 0u;  // NaN: lowest
  v = v + 0.0f;           // -0 -> +0
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Key of (value, index): compare with >, the larger key wins. Never 0 for index < 2^32 - 1, so 0
// is free to mean "excluded" (for example experts outside the selected groups).
MOEYARD_HD uint64_t pack_key(float v, uint32_t index) {
  return (static_cast<uint64_t>(order_bits(v)) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}

MOEYARD_HD uint32_t key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu);
}

}  // namespace moeyard
