// merged_linear: SMEAR's merged expert (ALGORITHMS.md 3.3), one linear layer whose weight is the
// routing-weighted average of E experts' weights, per example:
//   y[b] = x[b] @ Wbar_b^T + bbar_b,   Wbar_b = sum_e probs[b,e] W_e,   bbar_b = sum_e probs[b,e] bias_e
// x [B,S,K], probs [B,E] (fp32; fp64 with fp64 x), weight logical [E,N,K] (nn.Linear order), bias
// [E,N] -> y [B,S,N]. And its backward (G_b = grad[b]^T x[b], [N,K]):
//   grad_x[b]        = grad[b] @ Wbar_b
//   grad_probs[b,e]  = <W_e, G_b> + <bias_e, sum_s grad[b,s]>
//   grad_weight[e]   = sum_b probs[b,e] G_b
//   grad_bias        = probs^T (sum_s grad)
//
// Written once as a composition of ATen products (at::mm, at::bmm, at::baddbmm) and registered for
// the CPU and the CUDA keys: every heavy step is a dense (batched) GEMM that MKL / cuBLAS run near
// peak, so CPU and CUDA compute the same thing by construction. No host sync; every shape follows
// from the argument shapes.
//
// Layout. weight is logical [E, N, K] in either memory order, never copied: row-major (each
// expert an N x K block, as nn.Linear and Hugging Face v5 store it) or a transpose(1, 2) view of an
// [E, K, N]-contiguous tensor. Either way the experts are the rows of one [E, N*K] matrix, so the
// merge of a chunk of examples is one GEMM probs[chunk, E] @ W[E, N*K]; the merged chunk is used
// through a view in the same order. Other strides cost a copy of the weight (forward and backward).
// grad_weight gets weight's memory order, grad_bias bias's.
//
// Memory. The merged weights of all B examples (B*N*K elements) are never materialized at once:
// examples go in chunks of max(1, floor(budget / (N*K*itemsize))) (a function of the shapes only),
// budget = 256 MiB by default (moeyard.ops._set_merge_budget changes it, process-wide). Per chunk
// the forward holds one [chunk, N, K] merged weight; the backward recomputes it (nothing but the
// inputs is saved) for grad_x, frees it, then holds G [chunk, N, K] for grad_probs and grad_weight.
//
// Precision. Products run in the input dtype with fp32 accumulation inside the GEMMs (cuBLAS and
// MKL/oneDNN accumulate fp16/bf16 products in fp32) and round their output once. The merge is such
// a GEMM, so Wbar is summed in fp32 and rounded once to the input dtype before the product; its
// probs operand is rounded to the input dtype (ATen has no fp32 x bf16 GEMM on CPU, and an fp32 copy
// of the weights would cost E*N*K*4 bytes per call): a relative 2^-9 (bf16) error on each p_e, the
// size of the rounding of Wbar itself; one-hot probs stay exact. The bias terms (bbar, the bias
// part of grad_probs, grad_bias) are fp32 products. grad_probs' <W_e, G_b> is an fp32-accumulated
// GEMM rounded once to the input dtype. grad_weight accumulates over chunks in the weight's dtype
// (one rounding per chunk; with one chunk, a single rounding). With a bias, the product's output
// stays fp32 until bbar is added, and the sum is rounded once (see add_product; this costs an fp32
// [chunk, S, N] temporary, and on the CPU fp32 copies of the chunk's x and merged weights).
//
// Cost per example, P = N*K, s = bytes per element, c = examples per chunk:
//   merging (this op)  2*E*P (merge) + 2*S*P (product) flops; reads the E experts once per chunk:
//                      E*P*s/c bytes, plus 2*P*s for writing and reading Wbar.
//   not merging        y = sum_e probs[b,e] (x[b] W_e^T + bias_e), the same function (it is linear
//                      in W): 2*E*S*P flops; the weights are read once per call (one GEMM per
//                      expert over all B*S rows), plus E*S*N partial outputs to combine.
//   By flops merging wins whenever (E - 1)(S - 1) > 1 (ratio E*S / (E + S)). When it is bound by
//   memory it can lose: at ~295 flop/byte (H100 bf16: ~990 TFLOP/s dense, 3.35 TB/s) not merging is
//   cheaper while S < (E/c + 2) * s * 295 / (2E): for bf16 and E = 8 about S < 370 when one
//   example fits a chunk (experts as large as a full FFN) and S < 74 when all do (small experts).
//   Short sequences (decoding, S = 1; short classification inputs) favor not merging. These are
//   roofline estimates, not measurements; no unmerged variant is built. (Not merging also needs
//   the E*B*S*N per-expert outputs again in the backward, for grad_probs.)
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "merge/merge.h"

namespace moeyard {

namespace {

constexpr int64_t kDefaultMergeBudget = int64_t(256) << 20;  // bytes of merged weights per chunk
std::atomic<int64_t> merge_budget{kDefaultMergeBudget};

struct MergeShape {
  int64_t B = 0, S = 0, K = 0, E = 0, N = 0;
};

MergeShape check_merged_linear_args(const at::Tensor& x, const at::Tensor& probs,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rank(x, 3, "x");
  check_rank(probs, 2, "probs");
  check_rank(weight, 3, "weight");
  check_float(x, "x");
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(probs.scalar_type() == acc, "moeyard: probs must be ", acc, " (routing math is ",
              acc, " for ", x.scalar_type(), " x), got ", probs.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "moeyard: weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  check_same_device(x, probs, "x", "probs");
  check_same_device(x, weight, "x", "weight");
  MergeShape s;
  s.B = x.size(0);
  s.S = x.size(1);
  s.K = x.size(2);
  s.E = weight.size(0);
  s.N = weight.size(1);
  TORCH_CHECK(s.E >= 1, "moeyard: there must be at least one expert, got weight ", weight.sizes());
  TORCH_CHECK(weight.size(2) == s.K, "moeyard: x [B, S, K] has K = ", s.K,
              " but weight [E, N, K] has K = ", weight.size(2), " (weight ", weight.sizes(), ")");
  TORCH_CHECK(probs.size(0) == s.B, "moeyard: probs must be [B, E] with B = ", s.B,
              " (x's examples), got ", probs.sizes());
  TORCH_CHECK(probs.size(1) == s.E, "moeyard: probs must be [B, E] with E = ", s.E,
              " (weight's experts), got ", probs.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == s.E && bias->size(1) == s.N,
                "moeyard: bias must be [E, N] = [", s.E, ", ", s.N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "moeyard: bias must have x's dtype ",
                x.scalar_type(), ", got ", bias->scalar_type());
    check_same_device(x, *bias, "x", "bias");
  }
  return s;
}

// The experts as the rows of one matrix [E, P], P = N*K: each row is expert e's N x K block
// (kn = false) or its K x N transpose (kn = true, for a transpose(1, 2) view of an
// [E, K, N]-contiguous weight). A view for those two memory orders, else a copy.
struct ExpertRows {
  at::Tensor flat;
  bool kn = false;
};

ExpertRows expert_rows(const at::Tensor& weight) {
  const bool kn = weight.stride(2) != 1 && weight.stride(1) == 1;
  const auto w = kn ? weight.transpose(1, 2) : weight;
  return {w.reshape({w.size(0), w.size(1) * w.size(2)}), kn};
}

// A [c, P] matrix in the rows' order as the logical [c, N, K] it holds.
at::Tensor as_nk(const at::Tensor& flat, const ExpertRows& rows, int64_t N, int64_t K) {
  const int64_t c = flat.size(0);
  return rows.kn ? flat.view({c, K, N}).transpose(1, 2) : flat.view({c, N, K});
}

// Merged weights of one chunk: probs_c [c, E] (input dtype) @ W [E, P], fp32 accumulation; the
// logical [c, N, K] view.
at::Tensor merge_chunk(const at::Tensor& probs_c, const ExpertRows& rows, int64_t N, int64_t K) {
  return as_nk(at::mm(probs_c, rows.flat), rows, N, K);
}

// y_c = x_c @ merged^T + bbar_c with the sum in the accumulation type (bbar_c [c, 1, N] in it) and
// one rounding to x's dtype, as reference.merged_linear: the merged bias is never rounded on its
// own. fp32/fp64 x: one baddbmm. fp16/bf16 x: the product's output must be fp32, which cuBLAS gives
// (baddbmm's out_dtype overload: fp16/bf16 operands, fp32 C and D) and ATen's CPU GEMMs do not, so
// the CPU widens the operands to fp32 (exactly) instead. Either way an fp32 [c, S, N] temporary.
void add_product(at::Tensor& y_c, const at::Tensor& bbar_c, const at::Tensor& x_c,
                 const at::Tensor& merged_t) {
  const auto acc = bbar_c.scalar_type();
  if (y_c.scalar_type() == acc) {
    at::baddbmm_out(y_c, bbar_c, x_c, merged_t);
    return;
  }
  auto sum = bbar_c.expand(y_c.sizes()).contiguous();
  if (sum.is_cuda())
    at::baddbmm_out(sum, sum, x_c, merged_t, acc);
  else
    sum.baddbmm_(x_c.to(acc), merged_t.to(acc));
  y_c.copy_(sum);
}

// Examples per chunk: the budget over the bytes of one example's merged weight (>= 1).
int64_t chunk_size(const MergeShape& s, int64_t itemsize) {
  const int64_t per_example = s.N * s.K * itemsize;
  const int64_t all = std::max<int64_t>(s.B, 1);
  if (per_example == 0) return all;
  return std::clamp<int64_t>(merge_budget.load() / per_example, 1, all);
}

at::Tensor merged_linear(const at::Tensor& x, const at::Tensor& probs, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  const MergeShape s = check_merged_linear_args(x, probs, weight, bias);
  const c10::OptionalDeviceGuard guard(x.device());
  auto y = at::empty({s.B, s.S, s.N}, x.options());
  if (y.numel() == 0) return y;
  const ExpertRows rows = expert_rows(weight);
  const auto p = probs.to(x.scalar_type());  // the merge GEMM's operand
  // bbar = probs @ bias in the accumulation type, added to the product before its one rounding.
  const auto bbar =
      bias ? at::mm(probs, bias->to(probs.scalar_type())).unsqueeze(1) : at::Tensor();
  const int64_t chunk = chunk_size(s, x.element_size());
  for (int64_t b0 = 0; b0 < s.B; b0 += chunk) {
    const int64_t c = std::min(chunk, s.B - b0);
    const auto merged = merge_chunk(p.narrow(0, b0, c), rows, s.N, s.K);  // [c, N, K]
    auto y_c = y.narrow(0, b0, c);
    const auto x_c = x.narrow(0, b0, c);
    if (bias)
      add_product(y_c, bbar.narrow(0, b0, c), x_c, merged.transpose(1, 2));
    else
      at::bmm_out(y_c, x_c, merged.transpose(1, 2));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merged_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& probs, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, std::array<bool, 4> mask) {
  const MergeShape s = check_merged_linear_args(x, probs, weight, bias);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == s.B && grad.size(1) == s.S &&
                  grad.size(2) == s.N && grad.scalar_type() == x.scalar_type(),
              "moeyard: grad must be [B, S, N] = [", s.B, ", ", s.S, ", ", s.N, "] in x's dtype ",
              x.scalar_type(), ", got ", grad.sizes(), " ", grad.scalar_type());
  check_same_device(x, grad, "x", "grad");
  const c10::OptionalDeviceGuard guard(x.device());
  const auto acc = probs.scalar_type();
  const auto none = [&] { return x.new_empty({0}); };
  at::Tensor grad_x = none(), grad_probs = none(), grad_weight = none(), grad_bias = none();
  const bool need_g = mask[1] || mask[2];  // G_b = grad[b]^T x[b]
  const bool bias_terms = bias && (mask[1] || mask[3]);
  // sum_s grad [B, N] in fp32, for the bias parts.
  const auto grad_sum = bias_terms ? at::sum(grad, {1}, false, acc) : at::Tensor();
  const ExpertRows rows = expert_rows(weight);
  const auto p = probs.to(x.scalar_type());

  if (mask[0]) grad_x = at::empty({s.B, s.S, s.K}, x.options());
  if (mask[1]) grad_probs = at::empty({s.B, s.E}, probs.options());
  // grad_weight in weight's memory order, accumulated through an [E, P] view of it in the rows'
  // order (or through a temporary when weight's strides allow no such view).
  at::Tensor grad_w_oriented, grad_w_flat;
  if (mask[2]) {
    grad_weight = at::empty_like(weight);
    grad_w_oriented = rows.kn ? grad_weight.transpose(1, 2) : grad_weight;
    grad_w_flat = grad_w_oriented.is_contiguous() ? grad_w_oriented.view({s.E, s.N * s.K})
                                                  : at::empty({s.E, s.N * s.K}, weight.options());
    if (s.B == 0) grad_w_flat.zero_();
  }

  const int64_t chunk = chunk_size(s, x.element_size());
  for (int64_t b0 = 0; b0 < s.B; b0 += chunk) {
    const int64_t c = std::min(chunk, s.B - b0);
    const auto p_c = p.narrow(0, b0, c);
    const auto x_c = x.narrow(0, b0, c), grad_c = grad.narrow(0, b0, c);
    if (mask[0]) {  // recompute the merge, use it, free it before G
      auto grad_x_c = grad_x.narrow(0, b0, c);
      at::bmm_out(grad_x_c, grad_c, merge_chunk(p_c, rows, s.N, s.K));
    }
    if (!need_g) continue;
    // G in the rows' order, [c, P]: grad^T x ([c, N, K]) or x^T grad ([c, K, N]).
    const auto g = (rows.kn ? at::bmm(x_c.transpose(1, 2), grad_c)
                            : at::bmm(grad_c.transpose(1, 2), x_c))
                       .view({c, s.N * s.K});
    if (mask[1]) grad_probs.narrow(0, b0, c).copy_(at::mm(g, rows.flat.t()));
    if (mask[2]) {
      if (b0 == 0)
        at::mm_out(grad_w_flat, p_c.t(), g);
      else
        grad_w_flat.addmm_(p_c.t(), g);
    }
  }
  if (mask[1] && bias) grad_probs.add_(at::mm(grad_sum, bias->to(acc).t()));
  if (mask[2] && !grad_w_oriented.is_contiguous())
    grad_w_oriented.copy_(grad_w_flat.view(grad_w_oriented.sizes()));
  if (mask[3] && bias) {
    grad_bias = at::empty_like(*bias);
    grad_bias.copy_(at::mm(probs.t(), grad_sum));
  }
  return {grad_x, grad_probs, grad_weight, grad_bias};
}

void register_kernels(torch::Library& m) {
  m.impl("merged_linear", &merged_linear);
  m.impl("_merged_linear_backward", &merged_linear_backward);
}

}  // namespace

int64_t set_merge_budget(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "moeyard: the merge budget must be >= 0 bytes, got ", bytes);
  return merge_budget.exchange(bytes);
}

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { register_kernels(m); }

#ifdef MOEYARD_WITH_CUDA
TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { register_kernels(m); }
#endif

}  // namespace moeyard
