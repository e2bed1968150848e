// Autograd of the differentiable routing ops, registered under the Autograd key in C++ so an eager
// call costs no Python (a Python autograd kernel added ~13 us of host time per call, more than the
// GPU work of a route). Forward redispatches to the CPU/CUDA kernels; backward is composed of ATen
// ops (so torch.compile traces it) and matches python/moeyard/reference.py's formulas.
#include <torch/autograd.h>
#include <torch/library.h>

#include "routing/route.h"

namespace moeyard {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// d(weights)/d(logits) of route, given the selection (experts) it made.
at::Tensor route_backward(const at::Tensor& grad_w, const at::Tensor& logits,
                          const at::Tensor& experts, Score score, bool topk_before_score,
                          bool renormalize, double scale) {
  const auto z = logits.to(acc_dtype(logits));
  const auto sel = experts.to(at::kLong);
  const auto g = grad_w.to(z.scalar_type());
  auto zeros = at::zeros_like(z);
  if (topk_before_score) {  // w = scale * softmax(z[sel])
    const auto v = at::softmax(z.gather(1, sel), -1);
    const auto gv = g * scale;
    return zeros.scatter_add(1, sel, v * (gv - (gv * v).sum(-1, true))).to(logits.scalar_type());
  }
  if (score == Score::Relu) {  // w = relu(z[sel]); inactive slots (-1) carry no gradient
    const auto active = experts.ge(0);
    return zeros.scatter_add(1, sel.clamp_min(0), g * active).to(logits.scalar_type());
  }
  at::Tensor s, v;
  if (score == Score::Softmax) {
    s = at::softmax(z, -1);
    v = s.gather(1, sel);
  } else if (score == Score::Sigmoid) {
    v = at::sigmoid(z.gather(1, sel));
  } else {
    v = z.gather(1, sel);
  }
  at::Tensor gv;
  if (renormalize) {  // w = scale * v / (sum v + eps)
    const auto S = v.sum(-1, true) + 1e-20;
    gv = scale * (g / S - (g * v).sum(-1, true) / S.pow(2));
  } else {
    gv = g * scale;
  }
  at::Tensor grad;
  if (score == Score::Softmax) {
    const auto gs = zeros.scatter_add(1, sel, gv);
    grad = s * (gs - (gs * s).sum(-1, true));
  } else if (score == Score::Sigmoid) {
    grad = zeros.scatter_add(1, sel, gv * v * (1 - v));
  } else {
    grad = zeros.scatter_add(1, sel, gv);
  }
  return grad.to(logits.scalar_type());
}

class RouteFunction : public torch::autograd::Function<RouteFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k,
                             c10::string_view score, bool topk_before_score,
                             const std::optional<at::Tensor>& bias, int64_t n_group,
                             int64_t topk_group, bool renormalize, double scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::route", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, int64_t, c10::string_view, bool,
                             const std::optional<at::Tensor>&, int64_t, int64_t, bool, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, e] = op.call(logits, k, score, topk_before_score, bias, n_group, topk_group,
                          renormalize, scale);
    ctx->save_for_backward({logits, e});
    ctx->saved_data["score"] = static_cast<int64_t>(parse_score(std::string(score)));
    ctx->saved_data["topk_before_score"] = topk_before_score;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({e});
    return {w, e};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (grads[0].defined())
      grad = route_backward(grads[0], saved[0], saved[1],
                            static_cast<Score>(ctx->saved_data["score"].toInt()),
                            ctx->saved_data["topk_before_score"].toBool(),
                            ctx->saved_data["renormalize"].toBool(),
                            ctx->saved_data["scale"].toDouble());
    return {grad, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

class ReluRouteFunction : public torch::autograd::Function<ReluRouteFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits, int64_t k_max) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::relu_route", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, e] = op.call(logits, k_max);
    ctx->save_for_backward({logits, e});
    ctx->mark_non_differentiable({e});
    return {w, e};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (grads[0].defined())
      grad = route_backward(grads[0], saved[0], saved[1], Score::Relu, false, false, 1.0);
    return {grad, {}};
  }
};

std::tuple<at::Tensor, at::Tensor> route_autograd(const at::Tensor& logits, int64_t k,
                                                  c10::string_view score, bool topk_before_score,
                                                  const std::optional<at::Tensor>& bias,
                                                  int64_t n_group, int64_t topk_group,
                                                  bool renormalize, double scale) {
  auto out = RouteFunction::apply(logits, k, score, topk_before_score, bias, n_group, topk_group,
                                  renormalize, scale);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> relu_route_autograd(const at::Tensor& logits, int64_t k_max) {
  auto out = ReluRouteFunction::apply(logits, k_max);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) {
  m.impl("route", &route_autograd);
  m.impl("relu_route", &relu_route_autograd);
}

}  // namespace moeyard
