// grouped_mm, expert_ffn and their backward ops: argument checks and the composition of the
// expert products (grouped_mm.h: Products), written once for both devices and both backends
// (backend.h: moeyard's grouped GEMM, or torch's). Registered under the CPU key and, when built
// with CUDA, the CUDA key; the products dispatch on the backend and the tensors' device.
//
// expert_ffn, with r a plan row of expert e, t its token, w its routing weight:
//   forward   pre = x[t] @ w1[e] + b1[e]  [R,N1]   (kept only for the backward)
//             act = act(pre)              [R,I]    (one product, activation in its epilogue)
//             y   = act @ w2[e] + b2[e]   [R,H]
//             out = unpermute(y, weights) [T,H]    (each token gathers its rows, fp32)
//   backward  g      = grad[t] @ w2[e]^T            [R,I]  (grad read through the plan)
//             grad_pre = act'(pre) * w g, act_w = w act(pre), grad_w[r] = g . act(pre)
//                                                   (+ grad[t] . b2[e] with a down bias)
//             grad_w2[e] = sum_r act_w[r]^T grad[t],  grad_b2[e] = sum_r w grad[t]
//             grad_w1[e] = sum_r x[t]^T grad_pre[r],  grad_b1[e] = sum_r grad_pre[r]
//             grad_x = unpermute(grad_pre @ w1[e]^T)  (each token sums its k rows, fp32)
// Saved for the backward (expert_autograd.cpp): the inputs (referenced, not copied) and pre.
// The product y is not saved: grad_w needs only g and act(pre). When pre is dead after the
// backward (consume_h), grad_pre is written over it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "experts/grouped_mm.h"

namespace moeyard {

// ------------------------------------------------------------------------------------ checks

void check_weight_layout(const at::Tensor& b, const char* name) {
  TORCH_CHECK(b.stride(2) == 1 || b.stride(1) == 1, "moeyard: ", name,
              " must be row-major [E,K,N] or a transpose(1, 2) view of a row-major [E,N,K] "
              "tensor, got strides ", b.strides(), "; call .contiguous() on it");
}

static Segments check_segments(const at::Tensor& offsets, int64_t E, int64_t R,
                               std::optional<int64_t> capacity) {
  check_rank(offsets, 1, "offsets");
  check_dtype(offsets, at::kInt, "offsets");
  TORCH_CHECK(E >= 1, "moeyard: there must be at least one expert, got E = ", E);
  TORCH_CHECK(offsets.size(0) == E + 1, "moeyard: offsets must have E+1 = ", E + 1,
              " entries (one more than the experts of the weights), got ", offsets.size(0));
  if (capacity) {
    TORCH_CHECK(*capacity >= 0, "moeyard: capacity must be >= 0, got ", *capacity);
    TORCH_CHECK(R == E * *capacity, "moeyard: with capacity C = ", *capacity, " there must be E*C = ",
                E * *capacity, " rows, got ", R);
  }
  check_int32_range(R, "rows");
  return Segments{E, R, capacity};
}

GroupedShape check_grouped_mm_args(const at::Tensor& a, const at::Tensor& b,
                                   const at::Tensor& offsets,
                                   const std::optional<at::Tensor>& a_index,
                                   std::optional<int64_t> capacity) {
  check_rank(a, 2, "a");
  check_rank(b, 3, "b");
  check_float(a, "a");
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "moeyard: b must have a's dtype ",
              a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "moeyard: a has K = ", a.size(1),
              " columns but b is [E, K, N] with K = ", b.size(1));
  check_same_device(a, b, "a", "b");
  check_same_device(a, offsets, "a", "offsets");
  check_weight_layout(b, "b");
  GroupedShape s;
  s.A = a.size(0);
  s.K = a.size(1);
  s.N = b.size(2);
  int64_t R = s.A;
  if (a_index) {
    check_rank(*a_index, 1, "a_index");
    check_dtype(*a_index, at::kInt, "a_index");
    check_same_device(a, *a_index, "a", "a_index");
    R = a_index->size(0);
  }
  s.seg = check_segments(offsets, b.size(0), R, capacity);
  check_int32_range(s.A, "rows of a");
  return s;
}

void check_offsets_values_cpu(const at::Tensor& offsets, const Segments& seg) {
  const auto off_t = offsets.contiguous();
  const int32_t* off = off_t.const_data_ptr<int32_t>();
  TORCH_CHECK(off[0] == 0, "moeyard: offsets must start at 0, got offsets[0] = ", off[0]);
  for (int64_t e = 0; e < seg.E; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], "moeyard: offsets must not decrease, got offsets[", e,
                "] = ", off[e], " > offsets[", e + 1, "] = ", off[e + 1]);
    if (seg.capacity)
      TORCH_CHECK(off[e + 1] - off[e] <= *seg.capacity, "moeyard: expert ", e, " keeps ",
                  off[e + 1] - off[e], " rows, more than the capacity ", *seg.capacity);
  }
  TORCH_CHECK(off[seg.E] <= seg.R, "moeyard: offsets must end at most at R = ", seg.R,
              " rows, got offsets[E] = ", off[seg.E]);
}

void check_index_values_cpu(const at::Tensor& index, int64_t A, const char* name) {
  const auto idx_t = index.contiguous();
  const int32_t* idx = idx_t.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < idx_t.numel(); ++r)
    TORCH_CHECK(idx[r] >= -1 && idx[r] < A, "moeyard: ", name, "[", r, "] = ", idx[r],
                " is out of range [-1, ", A, ")");
}

FfnShape check_expert_ffn_args(const at::Tensor& x, const at::Tensor& row_source,
                               const at::Tensor& token_row, const at::Tensor& offsets,
                               std::optional<int64_t> capacity, const at::Tensor& weights,
                               const at::Tensor& w1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b1,
                               const std::optional<at::Tensor>& b2,
                               const std::string& activation) {
  FfnShape s;
  s.act = parse_activation(activation);
  check_plan_maps(row_source, token_row);
  check_rank(x, 2, "x");
  check_rank(w1, 3, "w1 (gate_up)");
  check_rank(w2, 3, "w2 (down)");
  check_float(x, "x");
  check_rank(weights, 2, "weights");
  check_float(weights, "weights");
  TORCH_CHECK(weights.sizes() == token_row.sizes(), "moeyard: weights must have the shape of "
              "the plan's token_row ", token_row.sizes(), ", got ", weights.sizes());
  s.T = x.size(0);
  s.H = x.size(1);
  s.k = token_row.size(1);
  TORCH_CHECK(token_row.size(0) == s.T, "moeyard: x has ", s.T, " tokens but the plan has ",
              token_row.size(0));
  const int64_t E = w1.size(0);
  s.N1 = w1.size(2);
  TORCH_CHECK(w1.size(1) == s.H, "moeyard: gate_up must map H = ", s.H,
              " (the width of x) to N1, got logical [E, H, N1] = ", w1.sizes());
  if (is_gated(s.act))
    TORCH_CHECK(s.N1 % 2 == 0, "moeyard: activation '", activation,
                "' needs an even gate_up width (gate and up), got ", s.N1);
  s.I = is_gated(s.act) ? s.N1 / 2 : s.N1;
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == s.I && w2.size(2) == s.H,
              "moeyard: down must be logical [E, I, H] = [", E, ", ", s.I, ", ", s.H,
              "] for gate_up ", w1.sizes(), " and activation '", activation, "', got ", w2.sizes());
  for (const auto* t : {&w1, &w2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "moeyard: expert weights must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  check_weight_layout(w1, "gate_up");
  check_weight_layout(w2, "down");
  struct Bias {
    const std::optional<at::Tensor>* t;
    int64_t width;
    const char* name;
  };
  for (const Bias& b : {Bias{&b1, s.N1, "gate_up_bias"}, Bias{&b2, s.H, "down_bias"}}) {
    if (!*b.t) continue;
    const at::Tensor& bias = **b.t;
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == E && bias.size(1) == b.width, "moeyard: ",
                b.name, " must be [E, ", b.width, "] = [", E, ", ", b.width, "], got ",
                bias.sizes());
    TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "moeyard: ", b.name,
                " must have x's dtype ", x.scalar_type(), ", got ", bias.scalar_type());
    check_same_device(x, bias, "x", b.name);
  }
  for (const auto* t : {&row_source, &offsets, &weights, &w1, &w2})
    check_same_device(x, *t, "x", "the plan, weights and expert weights");
  check_dtype(offsets, at::kInt, "offsets");
  s.up.A = s.T;
  s.up.K = s.H;
  s.up.N = s.N1;
  s.up.seg = check_segments(offsets, E, row_source.size(0), capacity);
  check_int32_range(s.T * s.k, "T*k");
  if (x.is_cpu()) {
    check_offsets_values_cpu(offsets, s.up.seg);
    check_index_values_cpu(row_source, s.T * s.k, "row_source");
    check_index_values_cpu(token_row, s.up.seg.R, "token_row");
  }
  return s;
}

// ------------------------------------------------------------------------------ helpers

namespace {

// [begin, end) of each expert's used rows, int64 on offsets' device.
std::pair<at::Tensor, at::Tensor> expert_ranges(const at::Tensor& offsets, const Segments& seg) {
  const auto off = offsets.to(at::kLong);
  const auto counts = off.slice(0, 1) - off.slice(0, 0, seg.E);
  const auto begin = seg.capacity ? at::arange(seg.E, off.options()) * *seg.capacity
                                  : off.slice(0, 0, seg.E);
  return {begin, begin + counts};
}

at::Tensor unpermute(const at::Tensor& y, const at::Tensor& row_source,
                     const at::Tensor& token_row, const std::optional<at::Tensor>& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::unpermute", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;  // a kernel of a kernel: no autograd graph
  return op.call(y, row_source, token_row, weights);
}

// The products of grouped_mm (a [A,K] through a_index, b [E,K,N]) on the backend asked for.
Products grouped_products(const std::string& backend, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& offsets, const GroupedShape& s) {
  const ProductInputs in{&a, s.seg.E, s.seg.capacity.has_value(), {s.K, s.N}, {&b}};
  return Products{resolve_backend(backend, in), offsets.contiguous(), s.seg};
}

// The products of expert_ffn (x [T,H], w1 [E,H,N1], w2 [E,I,H]) on the backend asked for.
Products ffn_products(const std::string& backend, const at::Tensor& x, const at::Tensor& w1,
                      const at::Tensor& w2, const at::Tensor& offsets, const FfnShape& s) {
  const ProductInputs in{&x, s.up.seg.E, s.up.seg.capacity.has_value(), {s.H, s.N1, s.I},
                         {&w1, &w2}};
  return Products{resolve_backend(backend, in), offsets.contiguous(), s.up.seg};
}

// ------------------------------------------------------------------------------- grouped_mm

at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& a_index, std::optional<int64_t> capacity,
                      c10::string_view backend) {
  const GroupedShape s = check_grouped_mm_args(a, b, offsets, a_index, capacity);
  if (a.is_cpu()) {
    check_offsets_values_cpu(offsets, s.seg);
    if (a_index) check_index_values_cpu(*a_index, s.A, "a_index");
  }
  const c10::OptionalDeviceGuard guard(a.device());
  const Products pr = grouped_products(std::string(backend), a, b, offsets, s);
  const auto a_rows = pr.operand(a, a_index.value_or(at::Tensor()));
  return pr.rows(a_rows, b, std::nullopt, kNoActivation, false).first;
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(
    const at::Tensor& grad_in, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
    const std::optional<at::Tensor>& a_index, std::optional<int64_t> capacity, bool need_a,
    bool need_b, c10::string_view backend) {
  const GroupedShape s = check_grouped_mm_args(a, b, offsets, a_index, capacity);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == s.seg.R && grad_in.size(1) == s.N &&
                  grad_in.scalar_type() == a.scalar_type(),
              "moeyard: grad must be [R, N] = [", s.seg.R, ", ", s.N, "] in a's dtype, got ",
              grad_in.sizes(), " ", grad_in.scalar_type());
  check_same_device(a, grad_in, "a", "grad");
  const c10::OptionalDeviceGuard guard(a.device());
  const Products pr = grouped_products(std::string(backend), a, b, offsets, s);
  const auto grad = pr.operand(grad_in);
  at::Tensor grad_a = a.new_empty({0}), grad_b = b.new_empty({0});
  if (need_a) {
    auto grad_rows =
        pr.rows(grad, b.transpose(1, 2), std::nullopt, kNoActivation, false).first;
    if (!a_index) {
      grad_a = grad_rows;
    } else {
      // Each source row sums the rows that read it, in row order: a stable sort of a_index
      // lists them, a binary search finds each source's run (no host sync, no atomics).
      const auto [sorted, order] = at::sort(a_index->to(at::kLong), /*stable=*/true, 0, false);
      const auto sources = at::arange(s.A, sorted.options());
      const auto order32 = order.to(at::kInt);
      grad_a = at::empty({s.A, s.K}, a.options());
      if (s.A > 0 && s.K > 0)
        segment_sum(SegmentSum{grad_rows, {&order32, 1}, std::nullopt,
                               at::searchsorted(sorted, sources),
                               at::searchsorted(sorted, sources, /*out_int32=*/false,
                                                /*right=*/true),
                               grad_a});
    }
  }
  if (need_b)
    grad_b = pr.weight_grad(pr.operand(a, a_index.value_or(at::Tensor())), grad, b,
                            /*unused_rows_zero=*/false);
  return {grad_a, grad_b};
}

// ------------------------------------------------------------------------------- expert_ffn

std::tuple<at::Tensor, at::Tensor> ffn_forward(
    const at::Tensor& x_in, const at::Tensor& row_source_in, const at::Tensor& token_row,
    const at::Tensor& offsets, std::optional<int64_t> capacity, const at::Tensor& weights,
    const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, const std::string& activation, bool keep_pre,
    const std::string& backend) {
  const FfnShape s = check_expert_ffn_args(x_in, row_source_in, token_row, offsets, capacity,
                                           weights, w1, w2, b1, b2, activation);
  const c10::OptionalDeviceGuard guard(x_in.device());
  const Products pr = ffn_products(backend, x_in, w1, w2, offsets, s);
  const auto row_source = row_source_in.contiguous();
  auto [act, pre] = pr.rows(pr.operand(x_in, row_source, s.k), w1, b1, s.act, keep_pre);
  const auto y = pr.rows(pr.operand(act), w2, b2, kNoActivation, false).first;
  act.reset();
  auto out = unpermute(y, row_source, token_row, weights);
  return {out, keep_pre ? pre : x_in.new_empty({0})};
}

at::Tensor expert_ffn(const at::Tensor& x, const at::Tensor& row_source,
                      const at::Tensor& token_row, const at::Tensor& offsets,
                      std::optional<int64_t> capacity, const at::Tensor& weights,
                      const at::Tensor& w1, const at::Tensor& w2,
                      const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                      c10::string_view activation, c10::string_view backend) {
  return std::get<0>(ffn_forward(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1,
                                 b2, std::string(activation), false, std::string(backend)));
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_forward(
    const at::Tensor& x, const at::Tensor& row_source, const at::Tensor& token_row,
    const at::Tensor& offsets, std::optional<int64_t> capacity, const at::Tensor& weights,
    const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, c10::string_view activation, c10::string_view backend) {
  return ffn_forward(x, row_source, token_row, offsets, capacity, weights, w1, w2, b1, b2,
                     std::string(activation), true, std::string(backend));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
expert_ffn_backward(const at::Tensor& grad_in, const at::Tensor& x,
                    const at::Tensor& row_source_in, const at::Tensor& token_row,
                    const at::Tensor& offsets, std::optional<int64_t> capacity,
                    const at::Tensor& weights, const at::Tensor& w1, const at::Tensor& w2,
                    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                    c10::string_view activation, const at::Tensor& pre_in,
                    std::array<bool, 6> mask, c10::string_view backend, bool consume_h) {
  const FfnShape s = check_expert_ffn_args(x, row_source_in, token_row, offsets, capacity,
                                           weights, w1, w2, b1, b2, std::string(activation));
  const Segments& seg = s.up.seg;
  const int64_t R = seg.R;
  TORCH_CHECK(grad_in.sizes() == x.sizes() && grad_in.scalar_type() == x.scalar_type(),
              "moeyard: grad must have x's shape and dtype");
  TORCH_CHECK(pre_in.dim() == 2 && pre_in.size(0) == R && pre_in.size(1) == s.N1,
              "moeyard: the saved pre-activation must be [R, N1] = [", R, ", ", s.N1, "], got ",
              pre_in.sizes());
  check_same_device(x, grad_in, "x", "grad");
  check_same_device(x, pre_in, "x", "the saved pre-activation");
  const c10::OptionalDeviceGuard guard(x.device());
  const Products pr = ffn_products(std::string(backend), x, w1, w2, offsets, s);
  const auto pre = pre_in.contiguous(), row_source = row_source_in.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const auto none = [&] { return x.new_empty({0}); };
  const auto used = row_source.ge(0);
  // Routing weight of each row (0 for unused rows; every row is unused in an empty batch).
  const auto row_weight =
      s.T == 0 ? at::zeros({R}, x.options().dtype(acc))
               : at::where(used, weights.reshape(-1).to(acc).index_select(
                                     0, row_source.clamp_min(0).to(at::kLong)), 0);

  // grad's rows in plan order (the grouped_mm backend copies them once, for g, grad_w2, grad_b2).
  Operand grad_rows = pr.operand(grad_in, row_source, s.k);
  // g = grad[t] @ w2[e]^T, then the activation's backward.
  auto g = pr.rows(grad_rows, w2.transpose(1, 2), std::nullopt, kNoActivation, false).first;
  // The activation's backward reads each pre-activation element before it writes that element's
  // gradient, so with a consumable h it writes in place: [R, N1] less at the peak.
  auto grad_pre = consume_h ? pre : at::empty({R, s.N1}, x.options());
  auto act_w = at::empty({R, s.I}, x.options());
  auto grad_w_rows = at::empty({R}, x.options().dtype(acc));
  if (R > 0) act_backward(ActBackward{g, pre, row_weight, s.act, grad_pre, act_w, grad_w_rows});
  // Temporaries go as soon as they are consumed: the peak is pre + grad_pre + the weight
  // gradients + one [R, H] buffer.
  g.reset();

  at::Tensor grad_x = none(), grad_weights = none(), grad_w1 = none(), grad_w2 = none(),
             grad_b1 = none(), grad_b2 = none();
  if (mask[1]) {
    if (b2 && R > 0 && s.T > 0) {  // + grad[t] . b2[e]: a [T,E] product, then one per row
      const auto off = offsets.to(at::kLong);
      const auto rows = at::arange(R, off.options());
      const auto expert = seg.capacity ? at::floor_divide(rows, std::max<int64_t>(*seg.capacity, 1))
                                       : at::searchsorted(off.slice(0, 1), rows, false, true);
      const auto gb = at::mm(grad_in.to(acc), b2->to(acc).t());
      const auto token = at::floor_divide(row_source.clamp_min(0), s.k).to(at::kLong);
      grad_w_rows.add_(at::where(used, gb.index({token, expert.clamp_max(seg.E - 1)}), 0));
    }
    const auto padded = at::cat({grad_w_rows, at::zeros({1}, grad_w_rows.options())});
    const auto tr = token_row.to(at::kLong);
    grad_weights = padded.index_select(0, at::where(tr.ge(0), tr, R).reshape(-1))
                       .reshape(token_row.sizes())
                       .to(weights.scalar_type());
  }
  // Row ranges of the experts, for the bias gradients only.
  at::Tensor begin, end;
  if ((mask[4] && b1) || (mask[5] && b2)) std::tie(begin, end) = expert_ranges(offsets, seg);
  if (mask[3]) grad_w2 = pr.weight_grad(pr.operand(act_w), grad_rows, w2, /*unused_rows_zero=*/true);
  act_w.reset();
  if (mask[5] && b2) {
    grad_b2 = at::empty_like(*b2);
    if (grad_b2.numel() > 0)
      segment_sum(SegmentSum{grad_rows.src, grad_rows.rows(), row_weight, begin, end, grad_b2});
  }
  grad_rows = Operand{};
  if (mask[0]) {
    const auto rows_dx = pr.rows(pr.operand(grad_pre), w1.transpose(1, 2), std::nullopt,
                                 kNoActivation, false).first;
    grad_x = unpermute(rows_dx, row_source, token_row, std::nullopt);
  }
  if (mask[2])
    grad_w1 = pr.weight_grad(pr.operand(x, row_source, s.k), pr.operand(grad_pre), w1,
                             /*unused_rows_zero=*/true);
  if (mask[4] && b1) {
    grad_b1 = at::empty_like(*b1);
    if (grad_b1.numel() > 0) segment_sum(SegmentSum{grad_pre, {}, std::nullopt, begin, end, grad_b1});
  }
  return {grad_x, grad_weights, grad_w1, grad_w2, grad_b1, grad_b2};
}

// The same kernels serve both devices: the primitives dispatch on the tensors' device.
void register_kernels(torch::Library& m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_mm_backward", &grouped_mm_backward);
  m.impl("expert_ffn", &expert_ffn);
  m.impl("_expert_ffn_forward", &expert_ffn_forward);
  m.impl("_expert_ffn_backward", &expert_ffn_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { register_kernels(m); }

#ifdef MOEYARD_WITH_CUDA
TORCH_LIBRARY_IMPL(moeyard, CUDA, m) { register_kernels(m); }
#endif

}  // namespace moeyard
