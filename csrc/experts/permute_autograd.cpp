// Autograd of permute and unpermute, registered under the Autograd key in C++ (no Python on the
// eager path; see routing/routing_autograd.cpp). Each backward is the other op's gather:
//   permute:   grad_x = unpermute(grad, plan)                   (each token sums its rows)
//   unpermute: grad_y, grad_weights = unpermute_backward(...)  (rows scaled by their weight;
//              per-slot dot products with the rows)
#include <torch/autograd.h>
#include <torch/library.h>

namespace moeyard {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

const auto& unpermute_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::unpermute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op;
}

class PermuteFunction : public torch::autograd::Function<PermuteFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x,
                             const at::Tensor& row_source, const at::Tensor& token_row) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::permute", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&)>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, row_source, token_row);
    }
    ctx->save_for_backward({row_source, token_row});
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (grads[0].defined()) grad = unpermute_op().call(grads[0], saved[0], saved[1], std::nullopt);
    return {grad, {}, {}};
  }
};

class UnpermuteFunction : public torch::autograd::Function<UnpermuteFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& y,
                             const at::Tensor& row_source, const at::Tensor& token_row,
                             const std::optional<at::Tensor>& weights) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = unpermute_op().call(y, row_source, token_row, weights);
    }
    ctx->save_for_backward({y, row_source, token_row, weights.value_or(at::Tensor())});
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("moeyard::unpermute_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
    if (!grads[0].defined()) return {{}, {}, {}, {}};
    const auto saved = ctx->get_saved_variables();
    const auto& weights = saved[3];
    const bool need_w = weights.defined() && ctx->needs_input_grad(3);
    auto [grad_y, grad_w] =
        op.call(grads[0], saved[0], saved[1], saved[2],
                weights.defined() ? std::optional<at::Tensor>(weights) : std::nullopt, need_w);
    return {grad_y, {}, {}, need_w ? grad_w : at::Tensor()};
  }
};

at::Tensor permute_autograd(const at::Tensor& x, const at::Tensor& row_source,
                            const at::Tensor& token_row) {
  return PermuteFunction::apply(x, row_source, token_row)[0];
}

at::Tensor unpermute_autograd(const at::Tensor& y, const at::Tensor& row_source,
                              const at::Tensor& token_row,
                              const std::optional<at::Tensor>& weights) {
  return UnpermuteFunction::apply(y, row_source, token_row, weights)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) {
  m.impl("permute", &permute_autograd);
  m.impl("unpermute", &unpermute_autograd);
}

}  // namespace moeyard
