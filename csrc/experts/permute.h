// Shared by permute_cpu.cpp and permute_cuda.cu: argument checks and shapes of permute, unpermute
// and unpermute_backward, so both devices accept and reject the same inputs.
// Semantics: python/moeyard/reference.py (permute, unpermute); unpermute_backward is the gradient of
// unpermute (grad_y[r] = w[t,j] * grad[t] for row_source[r] = t*k + j, zero for unused rows;
// grad_weights[t,j] = dot(grad[t], y[token_row[t,j]]), zero where token_row is -1).
//
// Plan encoding (csrc/routing, reference.plan): row_source [R] int32 holds t*k + j or -1 for an
// unused row; token_row [T,k] int32 holds the row of assignment (t, j) or -1; k = token_row.size(1).
//
// Sizes: R and T*k must stay below 2^31 (the maps store them in int32). Products with the hidden
// size d (R*d, T*d, T*k*d: DeepSeek-V3's k = 8, d = 7168 pass 2^31 at T = 37,450) are not
// limited: every kernel (CPU and CUDA) computes element offsets in int64, and the CUDA grids have
// one block per row or token (R, T < 2^31) or per 8 assignments, within the 2^31 - 1 blocks of a
// grid's x dimension.
#pragma once
#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace moeyard {

struct PermuteShape {
  int64_t T = 0;  // tokens: token_row.size(0)
  int64_t k = 0;  // slots per token: token_row.size(1)
  int64_t R = 0;  // plan rows: row_source.size(0)
  int64_t d = 0;  // hidden size
};

inline PermuteShape plan_shape(const at::Tensor& row_source, const at::Tensor& token_row) {
  check_plan_maps(row_source, token_row);
  PermuteShape s;
  s.T = token_row.size(0);
  s.k = token_row.size(1);
  s.R = row_source.size(0);
  check_int32_range(s.T * s.k, "T*k");
  check_int32_range(s.R, "R");
  return s;
}

inline void check_weights(const std::optional<at::Tensor>& weights, const at::Tensor& token_row,
                          const at::Tensor& data, const char* data_name) {
  if (!weights.has_value()) return;
  const auto& w = *weights;
  check_rank(w, 2, "weights");
  check_float(w, "weights");
  check_same_device(data, w, data_name, "weights");
  TORCH_CHECK(w.sizes() == token_row.sizes(), "moeyard: weights must have the shape of token_row ",
              token_row.sizes(), ", got ", w.sizes());
}

// permute(x [T,d], row_source [R], token_row [T,k]) -> [R,d].
inline PermuteShape check_permute_args(const at::Tensor& x, const at::Tensor& row_source,
                                       const at::Tensor& token_row) {
  check_rank(x, 2, "x");
  check_float(x, "x");
  PermuteShape s = plan_shape(row_source, token_row);
  check_same_device(x, row_source, "x", "row_source");
  TORCH_CHECK(x.size(0) == s.T, "moeyard: x has ", x.size(0), " rows but token_row has T=", s.T,
              " tokens");
  s.d = x.size(1);
  return s;
}

// unpermute(y [R,d], row_source [R], token_row [T,k], weights [T,k]?) -> [T,d].
inline PermuteShape check_unpermute_args(const at::Tensor& y, const at::Tensor& row_source,
                                         const at::Tensor& token_row,
                                         const std::optional<at::Tensor>& weights) {
  check_rank(y, 2, "y");
  check_float(y, "y");
  PermuteShape s = plan_shape(row_source, token_row);
  check_same_device(y, row_source, "y", "row_source");
  TORCH_CHECK(y.size(0) == s.R, "moeyard: y has ", y.size(0), " rows but row_source has R=", s.R,
              " rows");
  check_weights(weights, token_row, y, "y");
  s.d = y.size(1);
  return s;
}

// unpermute_backward(grad [T,d], y [R,d], row_source, token_row, weights?, compute_grad_weights).
inline PermuteShape check_unpermute_backward_args(const at::Tensor& grad, const at::Tensor& y,
                                                  const at::Tensor& row_source,
                                                  const at::Tensor& token_row,
                                                  const std::optional<at::Tensor>& weights) {
  PermuteShape s = check_unpermute_args(y, row_source, token_row, weights);
  check_rank(grad, 2, "grad");
  check_float(grad, "grad");
  check_same_device(grad, y, "grad", "y");
  TORCH_CHECK(grad.size(0) == s.T && grad.size(1) == s.d, "moeyard: grad must have shape [T=", s.T,
              ", d=", s.d, "], got ", grad.sizes());
  return s;
}

// CPU only (reading the maps on a GPU would need a host sync): every entry of row_source lies in
// [-1, T*k) and every entry of token_row in [-1, R). The CUDA kernels treat out-of-range entries
// as -1 instead. Both tensors must be contiguous CPU int32 tensors.
inline void check_plan_values_cpu(const at::Tensor& row_source, const at::Tensor& token_row,
                                  const PermuteShape& s) {
  const int32_t* rs = row_source.const_data_ptr<int32_t>();
  const int64_t n = s.T * s.k;
  for (int64_t r = 0; r < s.R; ++r)
    TORCH_CHECK(rs[r] >= -1 && rs[r] < n, "moeyard: row_source[", r, "] = ", rs[r],
                " is out of range [-1, T*k=", n, ")");
  const int32_t* tr = token_row.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tr[i] >= -1 && tr[i] < s.R, "moeyard: token_row[", i / s.k, ", ", i % s.k,
                "] = ", tr[i], " is out of range [-1, R=", s.R, ")");
}

// out[r] = x[index[r] / div] where 0 <= index[r] < x.size(0) * div, a zero row elsewhere: the row
// copy of permute (index = row_source, div = k) and of the grouped_mm backend's operand gathers.
// x [*, d], index [R] int32, out [R, d], all contiguous and on one device; no host sync on CUDA.
void gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, int64_t div,
                     const at::Tensor& out);
#ifdef MOEYARD_WITH_CUDA
void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, int64_t div,
                      const at::Tensor& out);
#endif

// Weights in the accumulation type of the data (as the reference does), contiguous; undefined
// when there are none.
inline at::Tensor weights_as_acc(const std::optional<at::Tensor>& weights, at::ScalarType data) {
  if (!weights.has_value()) return at::Tensor();
  return weights->to(acc_dtype(data)).contiguous();
}

// dtype of grad_weights: that of weights, float32 without weights.
inline at::ScalarType grad_weights_dtype(const std::optional<at::Tensor>& weights) {
  return weights.has_value() ? weights->scalar_type() : at::kFloat;
}

// unpermute_backward's second output: the accumulated dot products in the weights' dtype, or an
// empty [0] tensor when they were not asked for.
inline at::Tensor finish_grad_weights(const at::Tensor& grad_w_acc, bool compute_grad_weights,
                                      const std::optional<at::Tensor>& weights,
                                      const at::Tensor& y) {
  const auto dtype = grad_weights_dtype(weights);
  return compute_grad_weights ? grad_w_acc.to(dtype) : at::empty({0}, y.options().dtype(dtype));
}

}  // namespace moeyard
