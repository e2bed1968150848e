// Autograd of merged_linear, registered under the Autograd key in C++ (as the expert ops, see
// experts/expert_autograd.cpp). The backward is one op of its own (_merged_linear_backward) so
// torch.compile traces it through its fake kernel.
//
// Saved: the four inputs (references, no copies). Nothing computed in the forward is kept: the
// backward recomputes each chunk's merged weight (merge_ops.cpp). Without grad mode the plain op
// runs and nothing is saved.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>

#include "common/dispatch.h"

namespace moeyard {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

using MergedLinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&);

class MergedLinearFunction : public torch::autograd::Function<MergedLinearFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& probs,
                             const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    static auto op = typed_op<MergedLinearSig>("moeyard::merged_linear");
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = op.call(x, probs, weight, bias);
    }
    ctx->save_for_backward({x, probs, weight, bias.value_or(at::Tensor())});
    return {y};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, std::array<bool, 4>)>("moeyard::_merged_linear_backward");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = saved[3].defined();
    // needs_input_grad counts only the tensor inputs that were given: bias is edge 3 if present.
    std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                             ctx->needs_input_grad(2), has_bias && ctx->needs_input_grad(3)};
    tensor_list result(4);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    const auto bias = has_bias ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    auto [gx, gp, gw, gb] = op.call(grads[0], saved[0], saved[1], saved[2], bias, mask);
    const at::Tensor all[4] = {gx, gp, gw, gb};
    for (int i = 0; i < 4; ++i)
      if (mask[i]) result[i] = all[i];
    return result;
  }
};

at::Tensor merged_linear_autograd(const at::Tensor& x, const at::Tensor& probs,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || probs.requires_grad() || weight.requires_grad() ||
                           (bias && bias->requires_grad()));
  if (!needs_grad) {  // inference: the plain op, nothing saved
    static auto op = typed_op<MergedLinearSig>("moeyard::merged_linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, probs, weight, bias);
  }
  return MergedLinearFunction::apply(x, probs, weight, bias)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) { m.impl("merged_linear", &merged_linear_autograd); }

}  // namespace moeyard
