// Shared by sparsemixer_cpu.cpp and sparsemixer_cuda.cu: argument checks and the per-element
// formulas of GRIN's SparseMixer-v2 top-2 routing, so the two kernels compute the same function.
// Semantics (and where they differ from transformers' PhiMoE): python/moeyard/reference.py
// (sparsemixer).
#pragma once
#include <cmath>
#include <optional>

#include "common/checks.h"
#include "common/order.h"

namespace moeyard {

// Heun's third-order midpoint in training: a slot whose sampled expert is not the slot's argmax
// keeps its weight when its uniform draw exceeds kMidpointDraw (probability 1/4), else the weight
// is multiplied by kMidpointScale. 0.3333 (not 1/3) is the constant of transformers' PhiMoE and
// of GRIN's code, kept so that trained checkpoints see the same forward.
constexpr float kMidpointDraw = 0.75f;
constexpr float kMidpointScale = 0.3333f;

struct SparsemixerParams {
  int64_t T = 0, E = 0;
  bool training = false;  // noise given: sampled selection and the midpoint scaling
  double two_eps = 0.02;  // the sparsity window, 2 * jitter_eps
};

inline SparsemixerParams check_sparsemixer_args(const at::Tensor& logits, double jitter_eps,
                                                const std::optional<at::Tensor>& noise) {
  check_rank(logits, 2, "logits");
  check_float(logits, "logits");
  SparsemixerParams p;
  p.T = logits.size(0);
  p.E = logits.size(1);
  TORCH_CHECK(p.E >= 2,
              "moeyard: sparsemixer picks 2 experts per token, so logits need at least "
              "2 expert columns, got shape ",
              logits.sizes());
  TORCH_CHECK(std::isfinite(jitter_eps) && jitter_eps >= 0,
              "moeyard: jitter_eps must be finite and >= 0, got ", jitter_eps);
  check_int32_range(p.T * (p.E + 1) * 2, "T*2*(E+1)");
  p.two_eps = 2 * jitter_eps;
  if (noise.has_value()) {
    const auto& n = *noise;
    check_rank(n, 3, "noise");
    check_dtype(n, at::kFloat, "noise");
    check_same_device(logits, n, "logits", "noise");
    TORCH_CHECK(n.size(0) == p.T && n.size(1) == 2 && n.size(2) == p.E + 1,
                "moeyard: noise must have shape [T, 2, E + 1] = [", p.T, ", 2, ", p.E + 1,
                "] (per token and slot: E Gumbel perturbations, then a uniform draw), got ",
                n.sizes());
    p.training = true;
  }
  return p;
}

// The backward's arguments: grad [T, 2] and experts [T, 2] (int32) beside logits [T, E].
inline SparsemixerParams check_sparsemixer_backward_args(const at::Tensor& grad,
                                                         const at::Tensor& logits,
                                                         const at::Tensor& experts,
                                                         double jitter_eps) {
  auto p = check_sparsemixer_args(logits, jitter_eps, std::nullopt);
  check_rank(grad, 2, "grad");
  check_rank(experts, 2, "experts");
  check_dtype(grad, acc_dtype(logits.scalar_type()), "grad");
  check_dtype(experts, at::kInt, "experts");
  check_same_device(logits, grad, "logits", "grad");
  check_same_device(logits, experts, "logits", "experts");
  TORCH_CHECK(
      grad.size(0) == p.T && grad.size(1) == 2 && experts.size(0) == p.T && experts.size(1) == 2,
      "moeyard: grad and experts must have shape [T, 2] = [", p.T, ", 2], got ", grad.sizes(),
      " and ", experts.sizes());
  return p;
}

// Whether logit z falls outside the sparsity window of a slot whose maximum is m:
// (m - z) / max(|z|, m) > 2 eps. Every comparison with NaN is false, so nothing is masked in a
// row with a NaN (its weights are NaN) nor for 0/0 (all-zero logits) or inf/inf.
template <typename T>
MOEYARD_HD bool sparsemixer_masked(T z, T m, T two_eps) {
  const T az = z < T(0) ? -z : z;
  const T factor = az > m ? az : m;
  return (m - z) / factor > two_eps;
}

// The midpoint factor of a slot that picked `chosen` where the slot's argmax is `best`.
template <typename T>
MOEYARD_HD T midpoint_scale(int64_t chosen, int64_t best, float uniform) {
  return (chosen == best || uniform > kMidpointDraw) ? T(1) : static_cast<T>(kMidpointScale);
}

inline std::tuple<at::Tensor, at::Tensor> sparsemixer_outputs(const at::Tensor& logits) {
  return {at::empty({logits.size(0), 2}, logits.options().dtype(acc_dtype(logits.scalar_type()))),
          at::empty({logits.size(0), 2}, logits.options().dtype(at::kInt))};
}

}  // namespace moeyard
