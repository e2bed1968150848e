// Autograd of grouped_mm and expert_ffn, registered under the Autograd key in C++ (no Python on
// the eager path; see routing/routing_autograd.cpp). Each backward is one op of its own
// (grouped_mm_backward, _expert_ffn_backward) so torch.compile traces it through fake kernels.
//
// grouped_mm saves a, b, offsets and a_index (references, no copies).
// expert_ffn saves its inputs (references) and the first product's pre-activation [R, N1], the
// one intermediate it keeps: the backward recomputes the activation from it and never needs the
// second product (see expert_ops.cpp), and writes its gradient over it when nothing can read it
// afterwards (consumable). Without grad mode it runs the plain op and saves nothing.
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "common/dispatch.h"

namespace moeyard {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline at::Tensor grad_or_none(bool needed, const at::Tensor& g) {
  return needed ? g : at::Tensor();
}

// Whether expert_ffn's backward may write over its saved pre-activation h: nothing reads h after
// this backward (the graph is not kept: no retain_graph, no create_graph) and the call is eager (a
// tracer, torch.compile or make_fx, records ops as functions of their inputs: it gets the
// functional form). Saves an [R, N1] buffer at the backward's peak.
bool consumable(const at::Tensor& h) {
  const auto traced =
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return !torch::autograd::get_current_graph_task_keep_graph() &&
         !c10::impl::dispatch_mode_enabled() && !h.key_set().has_any(traced);
}

class GroupedMmFunction : public torch::autograd::Function<GroupedMmFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& offsets, const std::optional<at::Tensor>& a_index,
                             std::optional<int64_t> capacity, c10::string_view backend) {
    static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, std::optional<int64_t>,
                                         c10::string_view)>("moeyard::grouped_mm");
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(a, b, offsets, a_index, capacity, backend);
    }
    ctx->save_for_backward({a, b, offsets, a_index.value_or(at::Tensor())});
    ctx->saved_data["capacity"] = capacity ? c10::IValue(*capacity) : c10::IValue();
    ctx->saved_data["backend"] = std::string(backend);
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, std::optional<int64_t>, bool, bool, c10::string_view)>(
        "moeyard::grouped_mm_backward");
    const bool need_a = ctx->needs_input_grad(0), need_b = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_a || need_b)) return {{}, {}, {}, {}, {}, {}};
    const auto saved = ctx->get_saved_variables();
    const auto cap = ctx->saved_data["capacity"];
    auto [ga, gb] = op.call(grads[0], saved[0], saved[1], saved[2], opt(saved[3]),
                            cap.isNone() ? std::nullopt : std::optional<int64_t>(cap.toInt()),
                            need_a, need_b, ctx->saved_data["backend"].toStringRef());
    return {grad_or_none(need_a, ga), grad_or_none(need_b, gb), {}, {}, {}, {}};
  }
};

at::Tensor grouped_mm_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& a_index,
                               std::optional<int64_t> capacity, c10::string_view backend) {
  return GroupedMmFunction::apply(a, b, offsets, a_index, capacity, backend)[0];
}

class ExpertFfnFunction : public torch::autograd::Function<ExpertFfnFunction> {
 public:
  // Differentiable inputs, in the order of _expert_ffn_backward's outputs:
  // x, weights, w1, w2, b1, b2.
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weights,
                             const at::Tensor& w1, const at::Tensor& w2,
                             const std::optional<at::Tensor>& b1,
                             const std::optional<at::Tensor>& b2, const at::Tensor& row_source,
                             const at::Tensor& token_row, const at::Tensor& offsets,
                             std::optional<int64_t> capacity, c10::string_view activation,
                             c10::string_view backend) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        std::optional<int64_t>, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
        c10::string_view)>("moeyard::_expert_ffn_forward");
    at::Tensor out, pre;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, pre) = op.call(x, row_source, token_row, offsets, capacity, weights, w1, w2,
                                   b1, b2, activation, backend);
    }
    ctx->save_for_backward({x, weights, w1, w2, b1.value_or(at::Tensor()),
                            b2.value_or(at::Tensor()), row_source, token_row, offsets, pre});
    ctx->saved_data["capacity"] = capacity ? c10::IValue(*capacity) : c10::IValue();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["backend"] = std::string(backend);
    return {out};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, std::optional<int64_t>, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        c10::string_view, const at::Tensor&, std::array<bool, 6>, c10::string_view, bool)>(
        "moeyard::_expert_ffn_backward");
    constexpr int kInputs = 12;
    tensor_list result(kInputs);
    const auto s = ctx->get_saved_variables();
    // needs_input_grad counts the graph's edges, which exist only for the biases that were given:
    // b2 is edge 4 when b1 is absent.
    std::array<bool, 6> mask{};
    int edge = 0;
    for (int i = 0; i < 6; ++i) {
      const bool given = i < 4 || s[i].defined();
      mask[i] = given && ctx->needs_input_grad(edge);
      edge += given;
    }
    const bool any = std::any_of(mask.begin(), mask.end(), [](bool m) { return m; });
    if (!grads[0].defined() || !any) return result;
    const auto cap = ctx->saved_data["capacity"];
    const auto activation = ctx->saved_data["activation"].toStringRef();
    auto grads_out = op.call(grads[0], s[0], s[6], s[7], s[8],
                             cap.isNone() ? std::nullopt : std::optional<int64_t>(cap.toInt()),
                             s[1], s[2], s[3], opt(s[4]), opt(s[5]), activation, s[9], mask,
                             ctx->saved_data["backend"].toStringRef(), consumable(s[9]));
    const at::Tensor all[6] = {std::get<0>(grads_out), std::get<1>(grads_out),
                               std::get<2>(grads_out), std::get<3>(grads_out),
                               std::get<4>(grads_out), std::get<5>(grads_out)};
    for (int i = 0; i < 6; ++i) result[i] = grad_or_none(mask[i], all[i]);
    return result;
  }
};

at::Tensor expert_ffn_autograd(const at::Tensor& x, const at::Tensor& row_source,
                               const at::Tensor& token_row, const at::Tensor& offsets,
                               std::optional<int64_t> capacity, const at::Tensor& weights,
                               const at::Tensor& w1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b1,
                               const std::optional<at::Tensor>& b2, c10::string_view activation,
                               c10::string_view backend) {
  const bool needs_grad =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || weights.requires_grad() || w1.requires_grad() || w2.requires_grad() ||
       (b1 && b1->requires_grad()) || (b2 && b2->requires_grad()));
  if (!needs_grad) {  // inference: the plain op, nothing saved
    static auto op = typed_op<at::Tensor(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        std::optional<int64_t>, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
        c10::string_view)>("moeyard::expert_ffn");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1, b2,
                   activation, backend);
  }
  return ExpertFfnFunction::apply(x, weights, w1, w2, b1, b2, row_source, token_row, offsets,
                                  capacity, activation, backend)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) {
  m.impl("grouped_mm", &grouped_mm_autograd);
  m.impl("expert_ffn", &expert_ffn_autograd);
}

}  // namespace moeyard
