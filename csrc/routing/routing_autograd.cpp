// Autograd of the differentiable routing and balance ops (route, relu_route, top_p_route,
// sparsemixer, expert_choice, router_losses, sequence_balance_loss), registered under the Autograd
// key in C++ so an eager call costs no Python (a Python autograd kernel added ~13 us of host time
// per call, more than the GPU work of a route). Forward redispatches to the CPU/CUDA kernels;
// backward is composed of ATen ops (so torch.compile traces it), or for sparsemixer is its own op
// (with a fake kernel, so torch.compile traces it too), and matches python/moeyard/reference.py's
// formulas.
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "routing/route.h"

namespace moeyard {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// d(weights)/d(logits) of route, given the selection (experts) it made.
at::Tensor route_backward(const at::Tensor& grad_w, const at::Tensor& logits,
                          const at::Tensor& experts, Score score, bool topk_before_score,
                          bool renormalize, double scale) {
  const auto z = logits.to(acc_dtype(logits.scalar_type()));
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

// top_p_route: w = softmax(z)[experts] in the kept slots, 0 in the others (-1); the selection
// itself is piecewise constant, so the gradient is route's softmax one on the kept slots.
class TopPRouteFunction : public torch::autograd::Function<TopPRouteFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits, double p,
                             int64_t k_max) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("moeyard::top_p_route", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, e] = op.call(logits, p, k_max);
    ctx->save_for_backward({logits, e});
    ctx->mark_non_differentiable({e});
    return {w, e};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (grads[0].defined()) {
      const auto& e = saved[1];
      const auto kept = e.ge(0);
      grad = route_backward(grads[0] * kept, saved[0], e.clamp_min(0), Score::Softmax, false, false,
                            1.0);
    }
    return {grad, {}, {}};
  }
};

// GRIN's estimator (transformers' PhimoeMultiplier): d(weights[:, j])/d(logits) is taken as
// p_j[e_j] (onehot(e_j) - p_j), p_j the slot's window softmax, whatever the forward's midpoint
// factor; computed by the _sparsemixer_backward op from the logits and the chosen experts.
class SparsemixerFunction : public torch::autograd::Function<SparsemixerFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits, double jitter_eps,
                             const std::optional<at::Tensor>& noise) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, double, const std::optional<at::Tensor>&)>("moeyard::sparsemixer");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, e] = op.call(logits, jitter_eps, noise);
    ctx->save_for_backward({logits, e});
    ctx->saved_data["jitter_eps"] = jitter_eps;
    ctx->mark_non_differentiable({e});
    return {w, e};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
            "moeyard::_sparsemixer_backward");
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (grads[0].defined())
      grad = op.call(grads[0], saved[0], saved[1], ctx->saved_data["jitter_eps"].toDouble());
    return {grad, {}, {}};
  }
};

class ExpertChoiceFunction : public torch::autograd::Function<ExpertChoiceFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& scores, int64_t capacity) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::expert_choice", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                           at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, e, counts, offsets, row_source, token_row] = op.call(scores, capacity);
    ctx->save_for_backward({e});
    ctx->saved_data["dtype"] = scores.scalar_type();
    ctx->mark_non_differentiable({e, counts, offsets, row_source, token_row});
    return {w, e, counts, offsets, row_source, token_row};
  }

  // weights[t, j] = scores[t, experts[t, j]] where experts >= 0
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto e = ctx->get_saved_variables()[0];
    at::Tensor grad;
    if (grads[0].defined())
      grad = at::zeros_like(grads[0])
                 .scatter_add(1, e.to(at::kLong).clamp_min(0), grads[0] * e.ge(0))
                 .to(ctx->saved_data["dtype"].toScalarType());
    return {grad, {}};
  }
};

class RouterLossesFunction : public torch::autograd::Function<RouterLossesFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& logits,
                             const at::Tensor& counts, int64_t k, c10::string_view score) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::router_losses", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, int64_t, c10::string_view)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [balance, z] = op.call(logits, counts, k, score);
    ctx->save_for_backward({logits, counts});
    ctx->saved_data["k"] = k;
    ctx->saved_data["sigmoid"] = score == "sigmoid";
    return {balance, z};
  }

  // balance = sum_t sum_e c_e q[t,e] with c_e = E counts_e / (T^2 k) and q the softmax (dq/dz:
  // q (dc - <q, dc>)) or the normalized sigmoid q = s / Z, Z = sum_e s + eps (dq_e/dz_j =
  // s_j (1 - s_j) / Z (delta_ej - q_e)); z = mean_t lse_t^2
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& logits = saved[0];
    const auto z = logits.to(acc_dtype(logits.scalar_type()));
    const int64_t T = z.size(0), E = z.size(1), k = ctx->saved_data["k"].toInt();
    if (T == 0) return {at::zeros_like(logits), {}, {}, {}};
    const auto p = at::softmax(z, -1);
    auto grad = at::zeros_like(z);
    if (grads[0].defined()) {
      const auto dp = grads[0].to(z.scalar_type()) * (static_cast<double>(E) / T) *
                      saved[1].to(z.scalar_type()) / static_cast<double>(T * k);
      if (ctx->saved_data["sigmoid"].toBool()) {
        const auto s = at::sigmoid(z);
        const auto Z = s.sum(-1, true) + 1e-20;
        grad = grad + s * (1 - s) / Z * (dp - (s / Z * dp).sum(-1, true));
      } else {
        grad = grad + p * (dp - (p * dp).sum(-1, true));
      }
    }
    if (grads[1].defined())
      grad = grad + grads[1].to(z.scalar_type()) * (2.0 / T) * at::logsumexp(z, -1, true) * p;
    return {grad.to(logits.scalar_type()), {}, {}, {}};
  }
};

class SequenceBalanceLossFunction
    : public torch::autograd::Function<SequenceBalanceLossFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& scores,
                             const at::Tensor& experts, int64_t num_sequences) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::sequence_balance_loss", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto loss = op.call(scores, experts, num_sequences);
    ctx->save_for_backward({scores, experts});
    ctx->saved_data["B"] = num_sequences;
    return {loss};
  }

  // loss = 1/B sum_b sum_e f_be P_be,  P_be = 1/S sum_t s_te / Z_t,  Z_t = sum_e s_te + eps
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& scores = saved[0];
    const auto& experts = saved[1];
    const int64_t N = scores.size(0), E = scores.size(1);
    if (N == 0 || !grads[0].defined()) return {at::zeros_like(scores), {}, {}};
    const int64_t B = ctx->saved_data["B"].toInt(), k = experts.size(1), S = N / B;
    const auto s = scores.to(acc_dtype(scores.scalar_type()));
    const auto ex = experts.to(at::kLong).view({B, S * k});
    auto f = at::zeros({B, E}, s.options())
                 .scatter_add_(1, ex.clamp_min(0), ex.ge(0).to(s.scalar_type()));
    f = (f * (static_cast<double>(E) / (k * S))).repeat_interleave(S, 0);  // [N, E]
    const auto Z = s.sum(-1, true) + 1e-20;
    const auto g = (f / Z - (f * s).sum(-1, true) / Z.pow(2)) *
                   (grads[0].to(s.scalar_type()) / static_cast<double>(B * S));
    return {g.to(scores.scalar_type()), {}, {}};
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

std::tuple<at::Tensor, at::Tensor> top_p_route_autograd(const at::Tensor& logits, double p,
                                                        int64_t k_max) {
  auto out = TopPRouteFunction::apply(logits, p, k_max);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> sparsemixer_autograd(const at::Tensor& logits,
                                                        double jitter_eps,
                                                        const std::optional<at::Tensor>& noise) {
  auto out = SparsemixerFunction::apply(logits, jitter_eps, noise);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expert_choice_autograd(const at::Tensor& scores, int64_t capacity) {
  auto o = ExpertChoiceFunction::apply(scores, capacity);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

std::tuple<at::Tensor, at::Tensor> router_losses_autograd(const at::Tensor& logits,
                                                          const at::Tensor& counts, int64_t k,
                                                          c10::string_view score) {
  auto o = RouterLossesFunction::apply(logits, counts, k, score);
  return {o[0], o[1]};
}

at::Tensor sequence_balance_loss_autograd(const at::Tensor& scores, const at::Tensor& experts,
                                          int64_t num_sequences) {
  return SequenceBalanceLossFunction::apply(scores, experts, num_sequences)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) {
  m.impl("route", &route_autograd);
  m.impl("relu_route", &relu_route_autograd);
  m.impl("top_p_route", &top_p_route_autograd);
  m.impl("sparsemixer", &sparsemixer_autograd);
  m.impl("expert_choice", &expert_choice_autograd);
  m.impl("router_losses", &router_losses_autograd);
  m.impl("sequence_balance_loss", &sequence_balance_loss_autograd);
}

}  // namespace moeyard
