// The expert-compute primitives on the CPU (declared and specified in grouped_mm.h).
//
// Each expert's rows are gathered into a contiguous fp32 (fp64 for fp64) block and multiplied
// with one at::mm, which runs on all cores through the BLAS; bias, activation and their
// derivatives are applied row-parallel (at::parallel_for) with the scalar functions of
// grouped_mm.h, the same ones the CUDA epilogues use. Offsets are read on the host here.
#include <ATen/Parallel.h>

#include "experts/grouped_mm.h"

namespace moeyard {
namespace {

// First row and used-row count of expert e's segment.
inline std::pair<int64_t, int64_t> segment(const int32_t* off, const Segments& seg, int64_t e) {
  const int64_t n = off[e + 1] - off[e];
  return {seg.capacity ? e * *seg.capacity : off[e], n};
}

// Rows src(start..start+n) of src as a contiguous [n, cols] tensor of dtype acc (zero rows where
// the index is negative).
at::Tensor gather_rows(const at::Tensor& src, const RowIndex& rows, int64_t start, int64_t n,
                       at::ScalarType acc) {
  if (rows.index == nullptr) return src.narrow(0, start, n).to(acc).contiguous();
  if (src.size(0) == 0) return at::zeros({n, src.size(1)}, src.options().dtype(acc));  // all -1
  const auto idx = rows.index->narrow(0, start, n).to(at::kLong);
  const auto valid = idx.ge(0);
  const auto picked = src.index_select(0, at::where(valid, at::floor_divide(idx, rows.div), 0));
  return at::where(valid.unsqueeze(1), picked.to(acc), at::zeros({}, picked.options().dtype(acc)))
      .contiguous();
}

template <typename acc_t>
void apply_activation(const at::Tensor& v, Activation act, at::Tensor& out) {
  const int64_t n = v.size(0), width = v.size(1), out_width = out.size(1);
  const acc_t* pv = v.const_data_ptr<acc_t>();
  acc_t* po = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) act_row(act, pv + r * width, width, po + r * out_width, out_width);
  });
}

}  // namespace

void rows_gemm_cpu(const RowsGemm& p) {
  const auto acc = acc_dtype(p.a.scalar_type());
  const auto off_t = p.offsets.to(at::kInt).contiguous();
  const int32_t* off = off_t.const_data_ptr<int32_t>();
  p.out.zero_();  // unused rows
  if (p.pre.defined()) p.pre.zero_();
  for (int64_t e = 0; e < p.seg.E; ++e) {
    const auto [start, n] = segment(off, p.seg, e);
    if (n == 0) continue;
    auto v = at::mm(gather_rows(p.a, p.a_rows, start, n, acc), p.b[e].to(acc));
    if (p.bias) v.add_(p.bias->select(0, e).to(acc));
    if (p.pre.defined()) p.pre.narrow(0, start, n).copy_(v);
    if (p.act == kNoActivation) {
      p.out.narrow(0, start, n).copy_(v);
      continue;
    }
    auto a = at::empty({n, p.out.size(1)}, v.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "rows_gemm_cpu", [&] { apply_activation<scalar_t>(v, p.act, a); });
    p.out.narrow(0, start, n).copy_(a);
  }
}

void weight_grad_cpu(const WeightGrad& p) {
  const auto acc = acc_dtype(p.lhs.scalar_type());
  const auto off_t = p.offsets.to(at::kInt).contiguous();
  const int32_t* off = off_t.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < p.seg.E; ++e) {
    const auto [start, n] = segment(off, p.seg, e);
    if (n == 0) {
      p.out[e].zero_();
      continue;
    }
    const auto l = gather_rows(p.lhs, p.lhs_rows, start, n, acc);
    const auto r = gather_rows(p.rhs, p.rhs_rows, start, n, acc);
    p.out[e].copy_(at::mm(l.t(), r));
  }
}

void segment_sum_cpu(const SegmentSum& p) {
  const auto acc = acc_dtype(p.src.scalar_type());
  const auto begin_t = p.begin.to(at::kLong).contiguous(), end_t = p.end.to(at::kLong).contiguous();
  const int64_t* begin = begin_t.const_data_ptr<int64_t>();
  const int64_t* end = end_t.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < p.out.size(0); ++s) {
    const int64_t n = end[s] - begin[s];
    if (n <= 0) {
      p.out[s].zero_();
      continue;
    }
    auto rows = gather_rows(p.src, p.rows, begin[s], n, acc);
    if (p.scale) rows.mul_(p.scale->narrow(0, begin[s], n).to(acc).unsqueeze(1));
    p.out[s].copy_(rows.sum(0));
  }
}

}  // namespace moeyard
