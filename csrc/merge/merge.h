// SMEAR merged-expert compute (merge_ops.cpp): declarations shared with registration.cpp.
#pragma once
#include <cstdint>

namespace moeyard {

// merged_linear processes examples in chunks whose merged weights [chunk, N, K] take at most this
// many bytes (at least one example per chunk). Process-wide; returns the previous value.
int64_t set_merge_budget(int64_t bytes);

}  // namespace moeyard
