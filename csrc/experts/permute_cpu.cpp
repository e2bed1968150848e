// permute / unpermute / unpermute_backward on the CPU.
//
// permute: out[r] = x[row_source[r] / k], a row copy (memcpy, any dtype), zero for unused rows.
// unpermute: out[t] = sum_j w[t,j] * y[token_row[t,j]], a gather: each token sums its k rows in
//   slot order j = 0..k-1 in fp32 (fp64 for fp64), so the result is deterministic and does not
//   depend on the thread count.
// unpermute_backward: grad_y[r] = w[t,j] * grad[t] (row_source[r] = t*k + j, zero for unused
//   rows); grad_weights[t,j] = dot(grad[t], y[token_row[t,j]]) summed over d in order.
// Rows (permute, grad_y) and tokens (unpermute, grad_weights) run in parallel (at::parallel_for).
// Bytes: permute R*d reads+writes; unpermute T*k*d reads, T*d writes; backward R*d + 2*T*k*d.
// Every entry of row_source and token_row is checked to lie in [-1, T*k) / [-1, R) first.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "experts/permute.h"

namespace moeyard {

void gather_rows_cpu(const at::Tensor& x, const at::Tensor& index, int64_t div,
                     const at::Tensor& out) {
  const int64_t R = out.size(0), n = x.size(0) * div;
  if (R == 0 || out.size(1) == 0) return;
  const size_t row_bytes = static_cast<size_t>(out.size(1)) * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int32_t* idx = index.const_data_ptr<int32_t>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      char* o = dst + r * row_bytes;
      if (idx[r] < 0 || idx[r] >= n)
        std::memset(o, 0, row_bytes);  // all-zero bits are +0 in every floating dtype
      else
        std::memcpy(o, src + (idx[r] / div) * row_bytes, row_bytes);
    }
  });
}

namespace {

at::Tensor permute_cpu(const at::Tensor& x_in, const at::Tensor& row_source_in,
                       const at::Tensor& token_row_in) {
  const PermuteShape s = check_permute_args(x_in, row_source_in, token_row_in);
  auto x = x_in.contiguous();
  auto row_source = row_source_in.contiguous();
  check_plan_values_cpu(row_source, token_row_in.contiguous(), s);
  auto out = at::empty({s.R, s.d}, x.options());
  gather_rows_cpu(x, row_source, s.k, out);
  return out;
}

template <typename scalar_t>
void unpermute_cpu_kernel(const PermuteShape& s, const scalar_t* y, const int32_t* token_row,
                          const acc_type_t<scalar_t>* w, scalar_t* out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = s.d, k = s.k;
  at::parallel_for(0, s.T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = token_row[t * k + j];
        if (r < 0) continue;
        const scalar_t* yr = y + r * d;
        if (w) {
          const acc_t wj = w[t * k + j];
          for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<acc_t>(yr[i]) * wj;
        } else {
          for (int64_t i = 0; i < d; ++i) acc[i] += static_cast<acc_t>(yr[i]);
        }
      }
      scalar_t* o = out + t * d;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& row_source_in,
                         const at::Tensor& token_row_in, const std::optional<at::Tensor>& weights) {
  const PermuteShape s = check_unpermute_args(y_in, row_source_in, token_row_in, weights);
  auto y = y_in.contiguous();
  auto row_source = row_source_in.contiguous();
  auto token_row = token_row_in.contiguous();
  check_plan_values_cpu(row_source, token_row, s);
  auto out = at::empty({s.T, s.d}, y.options());
  if (s.T == 0 || s.d == 0) return out;
  const at::Tensor w = weights_as_acc(weights, y.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    unpermute_cpu_kernel<scalar_t>(s, y.const_data_ptr<scalar_t>(),
                                   token_row.const_data_ptr<int32_t>(),
                                   w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                   out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

template <typename scalar_t>
void unpermute_backward_cpu_kernel(const PermuteShape& s, const scalar_t* grad, const scalar_t* y,
                                   const int32_t* row_source, const int32_t* token_row,
                                   const acc_type_t<scalar_t>* w, scalar_t* grad_y,
                                   acc_type_t<scalar_t>* grad_w) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = s.d, k = s.k;
  if (d > 0) {
    at::parallel_for(0, s.R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = grad_y + r * d;
        const int32_t src = row_source[r];
        if (src < 0) {
          for (int64_t i = 0; i < d; ++i) o[i] = scalar_t(0);
          continue;
        }
        const scalar_t* g = grad + (src / k) * d;
        const acc_t wj = w ? w[src] : acc_t(1);  // weights [T,k] contiguous: w[t*k + j]
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * wj);
      }
    });
  }
  if (grad_w) {
    at::parallel_for(0, s.T * k, 64, [&](int64_t begin, int64_t end) {
      for (int64_t tj = begin; tj < end; ++tj) {
        const int32_t r = token_row[tj];
        acc_t dot = 0;
        if (r >= 0) {
          const scalar_t* g = grad + (tj / k) * d;
          const scalar_t* yr = y + r * d;
          for (int64_t i = 0; i < d; ++i) dot += static_cast<acc_t>(g[i]) * static_cast<acc_t>(yr[i]);
        }
        grad_w[tj] = dot;
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& row_source_in,
    const at::Tensor& token_row_in, const std::optional<at::Tensor>& weights,
    bool compute_grad_weights) {
  const PermuteShape s =
      check_unpermute_backward_args(grad_in, y_in, row_source_in, token_row_in, weights);
  auto y = y_in.contiguous();
  auto grad = grad_in.to(y.scalar_type()).contiguous();  // autograd passes y's dtype already
  auto row_source = row_source_in.contiguous();
  auto token_row = token_row_in.contiguous();
  check_plan_values_cpu(row_source, token_row, s);
  const auto acc = acc_dtype(y.scalar_type());
  auto grad_y = at::empty({s.R, s.d}, y.options());
  at::Tensor grad_w_acc = compute_grad_weights
                              ? at::empty({s.T, s.k}, y.options().dtype(acc))
                              : at::Tensor();
  const at::Tensor w = weights_as_acc(weights, y.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_backward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        unpermute_backward_cpu_kernel<scalar_t>(
            s, grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            row_source.const_data_ptr<int32_t>(), token_row.const_data_ptr<int32_t>(),
            w.defined() ? w.const_data_ptr<acc_t>() : nullptr, grad_y.mutable_data_ptr<scalar_t>(),
            grad_w_acc.defined() ? grad_w_acc.mutable_data_ptr<acc_t>() : nullptr);
      });
  return {grad_y, finish_grad_weights(grad_w_acc, compute_grad_weights, weights, y)};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moeyard
