// Total order used by every selection in moeyard (top-k, groups, expert choice, score priority):
// larger value first, ties broken by the lower index, NaN below every number (-inf included),
// -0 equal to +0. A float value and an index pack into one uint64 whose unsigned order is that
// order, so a selection is a max over integers: deterministic on CPU and GPU alike.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define MOEYARD_HD __host__ __device__ __forceinline__
#else
#define MOEYARD_HD inline
#endif

namespace moeyard {

// Order-preserving map of a float onto uint32. NaN maps to 1, below every number (-inf maps to
// 0x007fffff); 0 is never produced, so it is free to mean "excluded" or "already taken".
MOEYARD_HD uint32_t order_bits(float v) {
  if (v != v) return 1u;  // NaN: lowest
  v = v + 0.0f;           // -0 -> +0
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Key of (value, index): compare with >, the larger key wins. Never 0, so 0 is free to mean
// "excluded" (for example experts outside the selected groups).
MOEYARD_HD uint64_t pack_key(float v, uint32_t index) {
  return (static_cast<uint64_t>(order_bits(v)) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}

// The float an order_bits key came from (NaN for the NaN key, +0 for -0).
MOEYARD_HD float order_value(uint32_t bits) {
  if (bits <= 1u)
    return bits == 1u ? std::numeric_limits<float>::quiet_NaN()
                      : -std::numeric_limits<float>::infinity();
  const uint32_t u = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float v;
#if defined(__CUDA_ARCH__)
  v = __uint_as_float(u);
#else
  std::memcpy(&v, &u, sizeof(v));
#endif
  return v;
}

MOEYARD_HD uint32_t key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu);
}

}  // namespace moeyard
