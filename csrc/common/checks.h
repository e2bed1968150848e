// Input checks shared by every op's CPU and CUDA entry points. Each failure is a TORCH_CHECK that
// names the argument and the offending value, so users see a Python exception, never a crash.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

namespace moeyard {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK(t.dim() == rank, "moeyard: ", name, " must have ", rank, " dimensions, got shape ",
              t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "moeyard: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

// Expert ids: int32 (moeyard's routers) or int64 (torch.topk's, so Hugging Face's routers'). The
// kernels that read ids are templates over the two (AT_DISPATCH_INDEX_TYPES: index_t), so neither
// is converted on the way in; the plans and routings they return stay int32.
inline void check_expert_ids(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kInt || st == at::kLong, "moeyard: ", name,
              " must be int32 or int64 expert ids, got ", st);
}

// Floating-point data: one of the four dtypes every kernel is instantiated for.
inline void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "moeyard: ", name, " must be a floating-point tensor (float32, float64, float16 or "
              "bfloat16), got ", st);
}

// Accumulation type of every reduction and of router outputs: fp64 for fp64 data, else fp32.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na,
                              const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "moeyard: ", na, " (", a.device(), ") and ", nb, " (",
              b.device(), ") must be on the same device");
}

// Sizes used as int32 indices on the device must stay below 2^31.
inline void check_int32_range(int64_t n, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "moeyard: ", what, " = ", n,
              " overflows int32 indexing (must be < 2^31)");
}

// The plan tensors every consumer takes: row_source [R] int32, token_row [T,k] int32.
inline void check_plan_maps(const at::Tensor& row_source, const at::Tensor& token_row) {
  check_rank(row_source, 1, "row_source");
  check_rank(token_row, 2, "token_row");
  check_dtype(row_source, at::kInt, "row_source");
  check_dtype(token_row, at::kInt, "token_row");
  check_same_device(row_source, token_row, "row_source", "token_row");
  TORCH_CHECK(token_row.size(1) >= 1, "moeyard: token_row must have at least one slot, got shape ",
              token_row.sizes());
}

// Router score functions, parsed once from the schema's string.
enum class Score { Softmax, Sigmoid, None, Relu };

inline Score parse_score(const std::string& s) {
  if (s == "softmax") return Score::Softmax;
  if (s == "sigmoid") return Score::Sigmoid;
  if (s == "none") return Score::None;
  TORCH_CHECK(false, "moeyard: score must be 'softmax', 'sigmoid' or 'none', got '", s, "'");
}

enum class DropPolicy { Position, Score };

inline DropPolicy parse_drop_policy(const std::string& s) {
  if (s == "position") return DropPolicy::Position;
  if (s == "score") return DropPolicy::Score;
  TORCH_CHECK(false, "moeyard: drop_policy must be 'position' or 'score', got '", s, "'");
}

}  // namespace moeyard
