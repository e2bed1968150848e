// The activation passes around a product on the CPU (declared and specified in grouped_mm.h):
// act_forward (bias + activation of a product computed by torch's GEMMs) and act_backward (the
// activation's gradient, for both backends). Rows run in parallel (at::parallel_for); the math is
// the scalar functions of grouped_mm.h that the CUDA kernels use too, in fp32 (fp64 for fp64).
// Bytes: act_forward reads R*N1 and writes R*I (+ R*N1 with a bias); act_backward reads
// R*(I + N1) and writes R*(N1 + I).
#include <ATen/Parallel.h>

#include <vector>

#include "experts/grouped_mm.h"

namespace moeyard {

void act_forward_cpu(const ActForward& p) {
  TORCH_CHECK(p.pre.is_contiguous() && (!p.out.defined() || p.out.is_contiguous()),
              "moeyard: act_forward needs contiguous rows");
  const int64_t R = p.pre.size(0), width = p.pre.size(1);
  const int64_t out_width = p.out.defined() ? p.out.size(1) : 0;
  const auto off_t = p.offsets.to(at::kInt).contiguous();
  const int32_t* off = off_t.const_data_ptr<int32_t>();
  const int64_t capacity = p.seg.capacity ? *p.seg.capacity : -1;
  const auto bias_t = p.bias ? p.bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, p.pre.scalar_type(), "act_forward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        scalar_t* pre = p.pre.mutable_data_ptr<scalar_t>();
        scalar_t* out = p.out.defined() ? p.out.mutable_data_ptr<scalar_t>() : nullptr;
        const scalar_t* bias = bias_t.defined() ? bias_t.const_data_ptr<scalar_t>() : nullptr;
        const Activation act = p.act;
        at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> v(width);
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* row = pre + r * width;
            scalar_t* o = out ? out + r * out_width : nullptr;
            const int64_t e = row_expert(off, p.seg.E, capacity, r);
            if (e < 0) {
              std::fill(row, row + width, scalar_t(0));
              if (o) std::fill(o, o + out_width, scalar_t(0));
              continue;
            }
            if (!bias && !o) continue;
            for (int64_t c = 0; c < width; ++c) {
              v[c] =
                  static_cast<acc_t>(row[c]) + (bias ? static_cast<acc_t>(bias[e * width + c]) : 0);
              if (bias) row[c] = static_cast<scalar_t>(v[c]);
            }
            if (o) act_row(act, v.data(), width, o, out_width);
          }
        });
      });
}

void act_backward_cpu(const ActBackward& p) {
  const int64_t R = p.pre.size(0), width = p.pre.size(1), I = p.grad_act.size(1);
  const auto grad_act = p.grad_act.contiguous(), pre = p.pre.contiguous();
  const auto row_weight = p.row_weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, pre.scalar_type(), "act_backward_cpu", [&] {
        using acc_t = acc_type_t<scalar_t>;
        const scalar_t* g = grad_act.const_data_ptr<scalar_t>();
        const scalar_t* h = pre.const_data_ptr<scalar_t>();
        const acc_t* w = row_weight.const_data_ptr<acc_t>();
        scalar_t* gp = p.grad_pre.mutable_data_ptr<scalar_t>();
        scalar_t* aw = p.act_w.mutable_data_ptr<scalar_t>();
        acc_t* gw = p.grad_w.mutable_data_ptr<acc_t>();
        const Activation act = p.act;
        at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* gr = g + r * I;
            const scalar_t* hr = h + r * width;
            scalar_t* gpr = gp + r * width;
            acc_t dot = 0;
            for (int64_t j = 0; j < I; ++j) {
              const acc_t go = static_cast<acc_t>(gr[j]);
              const acc_t a = act_backward_at<acc_t>(act, hr, gpr, width, j, w[r] * go);
              aw[r * I + j] = static_cast<scalar_t>(w[r] * a);
              dot += go * a;
            }
            gw[r] = dot;
          }
        });
      });
}

}  // namespace moeyard
