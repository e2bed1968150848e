// permute / unpermute / unpermute_backward on the GPU. Every output element is written by exactly
// one thread that gathers its inputs: no atomics, results are deterministic.
//
// permute: one block per plan row r copies x[row_source[r] / k] (or writes zeros) as raw words,
//   16 bytes per load when the row size and both pointers allow (else 8, 4 or 2). Bytes: R*d*2.
// unpermute: one block per token t; each thread owns a vector of up to 16 bytes of the output and
//   sums w[t,j] * y[token_row[t,j]] over j = 0..k-1 in slot order, in fp32 (fp64 for fp64).
//   Bytes: T*k*d read, T*d written.
// unpermute_backward: grad_y, one block per plan row (a gather through row_source, zeros for
//   unused rows), R*d read + written; grad_weights, one warp per (t, j), a warp-reduced dot product
//   of grad[t] and y[token_row[t,j]] (fixed reduction order), 2*T*k*d read.
//
// Plan entries out of range (row_source outside [-1, T*k), token_row outside [-1, R)) are treated
// as -1 here: checking them would need a host synchronization. The CPU kernels raise on them.
// No host synchronization anywhere; all launches on the current stream.
#include <torch/library.h>

#include <tuple>

#include "common/cuda_utils.cuh"
#include "experts/permute.h"

namespace moeyard {
namespace {

constexpr int kMaxRowThreads = 256;
constexpr int kWarpsPerBlock = 8;

// Threads of a row kernel: enough for one vector each, a multiple of 32, at most kMaxRowThreads.
inline int row_threads(int64_t nvec) {
  const int64_t t = ceil_div(nvec, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kMaxRowThreads ? kMaxRowThreads : t));
}

// ------------------------------------------------------------------------------------ permute

template <typename W>
__global__ void permute_kernel(const W* __restrict__ x, const int32_t* __restrict__ row_source,
                               W* __restrict__ out, int64_t n_assign, int64_t k,
                               int64_t words) {
  const int64_t r = blockIdx.x;
  const int32_t src = row_source[r];
  W* o = out + r * words;
  if (src < 0 || src >= n_assign) {
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) o[i] = W{};
    return;
  }
  const W* in = x + (src / k) * words;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) o[i] = in[i];
}

template <typename W>
void launch_permute(const void* x, const int32_t* index, void* out, int64_t R, int64_t n_valid,
                    int64_t div, int64_t row_bytes) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(W));
  permute_kernel<W><<<static_cast<unsigned>(R), row_threads(words), 0,
                      at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const W*>(x), index, static_cast<W*>(out), n_valid, div, words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& row_source_in,
                        const at::Tensor& token_row_in) {
  const PermuteShape s = check_permute_args(x_in, row_source_in, token_row_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto out = at::empty({s.R, s.d}, x.options());
  gather_rows_cuda(x, row_source_in.contiguous(), s.k, out);
  return out;
}

// ---------------------------------------------------------------------------------- unpermute

template <typename scalar_t, int VEC>
__global__ void unpermute_kernel(const scalar_t* __restrict__ y,
                                 const int32_t* __restrict__ token_row,
                                 const acc_type_t<scalar_t>* __restrict__ w,
                                 scalar_t* __restrict__ out, int64_t R, int k, int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t nvec = d / VEC;
  const int32_t* rows = token_row + t * k;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int j = 0; j < k; ++j) {
      const int32_t r = rows[j];
      if (r < 0 || r >= R) continue;
      const acc_t wj = w ? w[t * k + j] : acc_t(1);
      const V in = *reinterpret_cast<const V*>(y + r * d + v * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += to_float(in.v[i]) * wj;
    }
    V o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<V*>(out + t * d + v * VEC) = o;
  }
}

at::Tensor unpermute_cuda(const at::Tensor& y_in, const at::Tensor& row_source_in,
                          const at::Tensor& token_row_in,
                          const std::optional<at::Tensor>& weights) {
  const PermuteShape s = check_unpermute_args(y_in, row_source_in, token_row_in, weights);
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  auto token_row = token_row_in.contiguous();
  auto out = at::empty({s.T, s.d}, y.options());
  if (s.T == 0 || s.d == 0) return out;
  const at::Tensor w = weights_as_acc(weights, y.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int32_t* tr = token_row.const_data_ptr<int32_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    const auto stream = at::cuda::getCurrentCUDAStream();
    const unsigned grid = static_cast<unsigned>(s.T);
    const int k = static_cast<int>(s.k);
    if (s.d % VEC == 0 && aligned(yp, 16) && aligned(op, 16)) {
      unpermute_kernel<scalar_t, VEC><<<grid, row_threads(s.d / VEC), 0, stream>>>(
          yp, tr, wp, op, s.R, k, s.d);
    } else {
      unpermute_kernel<scalar_t, 1><<<grid, row_threads(s.d), 0, stream>>>(yp, tr, wp, op, s.R, k,
                                                                           s.d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ------------------------------------------------------------------------- unpermute_backward

// grad_y[r] = w[src] * grad[src / k] for src = row_source[r]; zeros for unused rows.
template <typename scalar_t, int VEC>
__global__ void grad_rows_kernel(const scalar_t* __restrict__ grad,
                                 const int32_t* __restrict__ row_source,
                                 const acc_type_t<scalar_t>* __restrict__ w,
                                 scalar_t* __restrict__ grad_y, int64_t n_assign, int64_t k,
                                 int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t r = blockIdx.x;
  const int64_t nvec = d / VEC;
  const int32_t src = row_source[r];
  const bool used = src >= 0 && src < n_assign;
  const acc_t wj = !used ? acc_t(0) : (w ? w[src] : acc_t(1));  // w [T,k] contiguous
  const scalar_t* g = grad + (used ? src / k : 0) * d;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    V o;
    if (used) {
      const V in = *reinterpret_cast<const V*>(g + v * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(to_float(in.v[i]) * wj);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(acc_t(0));
    }
    *reinterpret_cast<V*>(grad_y + r * d + v * VEC) = o;
  }
}

// grad_w[t*k + j] = dot(grad[t], y[token_row[t,j]]), one warp per (t, j): lanes stride over the
// vectors in a fixed order, then a butterfly reduction.
template <typename scalar_t, int VEC>
__global__ void grad_weights_kernel(const scalar_t* __restrict__ grad,
                                    const scalar_t* __restrict__ y,
                                    const int32_t* __restrict__ token_row,
                                    acc_type_t<scalar_t>* __restrict__ grad_w, int64_t n_assign,
                                    int64_t R, int64_t k, int64_t d) {
  using acc_t = acc_type_t<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t tj = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (tj >= n_assign) return;  // whole warps leave together
  const int32_t r = token_row[tj];
  acc_t dot = 0;
  if (r >= 0 && r < R) {
    const scalar_t* g = grad + (tj / k) * d;
    const scalar_t* yr = y + static_cast<int64_t>(r) * d;
    const int64_t nvec = d / VEC;
    for (int64_t v = lane; v < nvec; v += 32) {
      const V a = *reinterpret_cast<const V*>(g + v * VEC);
      const V b = *reinterpret_cast<const V*>(yr + v * VEC);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += to_float(a.v[i]) * to_float(b.v[i]);
    }
  }
  dot = warp_sum(dot);
  if (lane == 0) grad_w[tj] = dot;
}

template <typename scalar_t, int VEC>
void launch_unpermute_backward(const PermuteShape& s, const scalar_t* grad, const scalar_t* y,
                               const int32_t* row_source, const int32_t* token_row,
                               const acc_type_t<scalar_t>* w, scalar_t* grad_y,
                               acc_type_t<scalar_t>* grad_w) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (s.R > 0 && s.d > 0) {
    grad_rows_kernel<scalar_t, VEC><<<static_cast<unsigned>(s.R), row_threads(s.d / VEC), 0,
                                      stream>>>(grad, row_source, w, grad_y, s.T * s.k, s.k, s.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (grad_w != nullptr && s.T * s.k > 0) {
    const unsigned grid = static_cast<unsigned>(ceil_div(s.T * s.k, kWarpsPerBlock));
    grad_weights_kernel<scalar_t, VEC><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        grad, y, token_row, grad_w, s.T * s.k, s.R, s.k, s.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& row_source_in,
    const at::Tensor& token_row_in, const std::optional<at::Tensor>& weights,
    bool compute_grad_weights) {
  const PermuteShape s =
      check_unpermute_backward_args(grad_in, y_in, row_source_in, token_row_in, weights);
  const c10::cuda::CUDAGuard guard(y_in.device());
  auto y = y_in.contiguous();
  auto grad = grad_in.to(y.scalar_type()).contiguous();  // autograd passes y's dtype already
  auto row_source = row_source_in.contiguous();
  auto token_row = token_row_in.contiguous();
  const auto acc = acc_dtype(y.scalar_type());
  auto grad_y = at::empty({s.R, s.d}, y.options());
  at::Tensor grad_w_acc = compute_grad_weights
                              ? at::empty({s.T, s.k}, y.options().dtype(acc))
                              : at::Tensor();
  const at::Tensor w = weights_as_acc(weights, y.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_backward_cuda", [&] {
        using acc_t = acc_type_t<scalar_t>;
        constexpr int VEC = 16 / sizeof(scalar_t);
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        scalar_t* gyp = grad_y.mutable_data_ptr<scalar_t>();
        const int32_t* rs = row_source.const_data_ptr<int32_t>();
        const int32_t* tr = token_row.const_data_ptr<int32_t>();
        const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
        acc_t* gwp = grad_w_acc.defined() ? grad_w_acc.mutable_data_ptr<acc_t>() : nullptr;
        if (s.d % VEC == 0 && aligned(gp, 16) && aligned(yp, 16) && aligned(gyp, 16))
          launch_unpermute_backward<scalar_t, VEC>(s, gp, yp, rs, tr, wp, gyp, gwp);
        else
          launch_unpermute_backward<scalar_t, 1>(s, gp, yp, rs, tr, wp, gyp, gwp);
      });
  return {grad_y, finish_grad_weights(grad_w_acc, compute_grad_weights, weights, y)};
}

}  // namespace

void gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, int64_t div,
                      const at::Tensor& out) {
  const int64_t R = out.size(0);
  if (R == 0 || out.size(1) == 0) return;
  TORCH_CHECK(R < (int64_t(1) << 31), "moeyard: at most 2^31 - 1 rows, got ", R);
  const int64_t row_bytes = out.size(1) * x.element_size();
  const void* xp = x.const_data_ptr();
  void* op = out.mutable_data_ptr();
  const int32_t* idx = index.const_data_ptr<int32_t>();
  const int64_t n = x.size(0) * div;
  auto fits = [&](int64_t b) { return row_bytes % b == 0 && aligned(xp, b) && aligned(op, b); };
  if (fits(16))
    launch_permute<uint4>(xp, idx, op, R, n, div, row_bytes);
  else if (fits(8))
    launch_permute<uint2>(xp, idx, op, R, n, div, row_bytes);
  else if (fits(4))
    launch_permute<uint32_t>(xp, idx, op, R, n, div, row_bytes);
  else
    launch_permute<uint16_t>(xp, idx, op, R, n, div, row_bytes);
}


TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moeyard
