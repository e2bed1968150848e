// The two products every expert op is made of (grouped_mm.h: Products), for either backend
// (backend.h) and either device. expert_ops.cpp writes each op once in terms of them.
//
// moeyard     the primitives rows_gemm / weight_grad of grouped_mm_cpu.cpp and
//             grouped_mm_cuda.cu: operands are read through their row index inside the GEMM, the
//             bias and activation run in its epilogue, unused rows are written as zeros.
// grouped_mm  torch's GEMMs. An indexed operand is gathered once into a contiguous copy
//             (gather_rows, the permute kernel). Dropless plans: at::_grouped_mm, 2D x 3D with the
//             group ends offsets[1..E] for row products (rows past offsets[E] are not written by
//             it), 2D x 2D with the same ends splitting the row (K) dimension for weight
//             gradients; capacity plans: at::bmm on the [E, C, *] views. Then act_forward adds
//             the bias, applies the activation and zeroes the unused rows in one pass.
//             Weight gradients come out of the GEMM in the memory order of their weight (the
//             product is oriented accordingly), so nothing is transposed or copied afterwards.
// Offsets never leave the device: no host synchronization on either backend.
#include "experts/grouped_mm.h"
#include "experts/permute.h"

namespace moeyard {

namespace {

#ifdef MOEYARD_WITH_CUDA
#define MOEYARD_DISPATCH(fn, p, device_tensor) \
  ((device_tensor).is_cuda() ? fn##_cuda(p) : fn##_cpu(p))
#else
#define MOEYARD_DISPATCH(fn, p, device_tensor) fn##_cpu(p)
#endif

void rows_gemm(const RowsGemm& p) { MOEYARD_DISPATCH(rows_gemm, p, p.a); }
void weight_grad_moeyard(const WeightGrad& p) { MOEYARD_DISPATCH(weight_grad, p, p.lhs); }
void act_forward(const ActForward& p) { MOEYARD_DISPATCH(act_forward, p, p.pre); }

void gather_rows(const at::Tensor& x, const at::Tensor& index, int64_t div, const at::Tensor& out) {
#ifdef MOEYARD_WITH_CUDA
  if (x.is_cuda()) return gather_rows_cuda(x, index, div, out);
#endif
  gather_rows_cpu(x, index, div, out);
}

// torch's GEMMs take a row-major operand whose first element is 16-byte aligned; a contiguous
// tensor viewed at an odd offset is copied (rare: inputs are fresh allocations or whole rows).
at::Tensor aligned_rows(const at::Tensor& t) {
  const auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

}  // namespace

void segment_sum(const SegmentSum& p) { MOEYARD_DISPATCH(segment_sum, p, p.src); }
void act_backward(const ActBackward& p) { MOEYARD_DISPATCH(act_backward, p, p.pre); }

Operand Products::operand(const at::Tensor& src, const at::Tensor& index, int64_t div) const {
  if (backend == ExpertsBackend::Moeyard || !index.defined())
    return Operand{src.contiguous(), index.defined() ? index.contiguous() : at::Tensor(), div};
  auto rows = at::empty({index.size(0), src.size(1)}, src.options());
  gather_rows(src.contiguous(), index.contiguous(), div, rows);
  return Operand{rows, at::Tensor(), 1};
}

std::pair<at::Tensor, at::Tensor> Products::rows(const Operand& a, const at::Tensor& b,
                                                 const std::optional<at::Tensor>& bias,
                                                 Activation act, bool keep_pre) const {
  const int64_t R = seg.R, K = b.size(1), N = b.size(2);
  const int64_t width = is_gated(act) ? N / 2 : N;
  if (backend == ExpertsBackend::Moeyard) {
    auto out = at::empty({R, width}, a.src.options());
    auto pre = keep_pre ? at::empty({R, N}, a.src.options()) : at::Tensor();
    if (R > 0 && N > 0)
      rows_gemm(RowsGemm{a.src, a.rows(), b, offsets, seg, bias, act, out, pre});
    else if (keep_pre)
      pre.zero_();
    return {out, pre};
  }
  at::Tensor prod;
  if (R == 0 || N == 0 || K == 0) {
    prod = at::zeros({R, N}, a.src.options());
  } else if (seg.capacity) {
    const int64_t C = *seg.capacity;
    prod = at::bmm(a.src.view({seg.E, C, K}), b).view({R, N});
  } else {
    prod = at::_grouped_mm(aligned_rows(a.src), b, offsets.slice(0, 1));
  }
  auto out = act == kNoActivation ? prod : at::empty({R, width}, prod.options());
  // One pass: bias, activation, zeros in the unused rows (rows past offsets[E] hold whatever
  // torch's grouped GEMM left there; capacity padding rows hold products of whatever a has there).
  if (R > 0)
    act_forward(
        ActForward{prod, bias, offsets, seg, act, act == kNoActivation ? at::Tensor() : out});
  return {out, keep_pre ? prod : at::Tensor()};
}

at::Tensor Products::weight_grad(const Operand& lhs, const Operand& rhs, const at::Tensor& like,
                                 bool unused_rows_zero) const {
  if (backend == ExpertsBackend::Moeyard) {
    auto out = at::empty_like(like);  // like's memory order (dense views keep their strides)
    if (out.numel() > 0)
      weight_grad_moeyard(WeightGrad{lhs.src, lhs.rows(), rhs.src, rhs.rows(), offsets, seg, out});
    return out;
  }
  if (like.numel() == 0 || seg.R == 0) return at::zeros_like(like);
  const int64_t E = like.size(0);
  at::Tensor l = lhs.src, r = rhs.src;
  if (seg.capacity && !unused_rows_zero) {
    // The batched product sums every row of a segment: zero the unused ones first (in copies).
    l = l.clone();
    r = r.clone();
    act_forward(ActForward{l, std::nullopt, offsets, seg, kNoActivation, at::Tensor()});
    act_forward(ActForward{r, std::nullopt, offsets, seg, kNoActivation, at::Tensor()});
  }
  // out[e] = l_e^T r_e as [E, M, N] when `like` is row-major, else as its transpose [E, N, M]
  // (r_e^T l_e), so the GEMM writes the gradient in the weight's own memory order.
  const bool row_major = like.stride(2) == 1;
  const at::Tensor& first = row_major ? l : r;
  const at::Tensor& second = row_major ? r : l;
  at::Tensor out;
  if (seg.capacity) {
    const int64_t C = *seg.capacity;
    out = at::bmm(first.view({E, C, first.size(1)}).transpose(1, 2),
                  second.view({E, C, second.size(1)}));
  } else {
    out = at::_grouped_mm(aligned_rows(first).t(), aligned_rows(second), offsets.slice(0, 1));
#ifdef MOEYARD_WITH_CUDA
    // An expert with no rows is a product with K = 0: make its zeros explicit rather than rely
    // on the GEMM's handling of an empty reduction.
    if (out.is_cuda()) zero_empty_experts_cuda(out, offsets);
#endif
  }
  return row_major ? out : out.transpose(1, 2);
}

}  // namespace moeyard
