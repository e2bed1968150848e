// Expert compute, shared by the CPU and CUDA code: activation math (one definition, host and
// device), argument checks of grouped_mm and expert_ffn, and the four primitives every device
// implements (grouped_mm_cpu.cpp, grouped_mm_cuda.cu). The ops themselves (expert_ops.cpp) are
// compositions of these primitives and of unpermute, the same on both devices.
// Semantics: python/moeyard/reference.py (activation, expert_rows, grouped_mm, expert_ffn).
//
// Row segments. Expert e owns the rows of one segment: offsets[e]..offsets[e+1] (dropless) or,
// with a capacity C, e*C .. e*C + offsets[e+1] - offsets[e] (fixed stride, the plan's capacity
// layout). Rows owned by no expert (past an expert's count, or past offsets[E]) are "unused":
// their outputs are zero and they are never read as inputs of a reduction.
//
// Weights are logical [E, K, N] with either memory order (stride(2) == 1: row-major; stride(1) ==
// 1: a transpose(1, 2) view of an nn.Linear-style [E, N, K], how Hugging Face v5 stores experts).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/checks.h"
#include "experts/backend.h"

#ifdef __CUDACC__
#define MOEYARD_HD __host__ __device__ __forceinline__
#else
#define MOEYARD_HD inline
#endif

namespace moeyard {

// ------------------------------------------------------------------------------ activations
//
// An activation is an elementwise function (ActFn) and a gating (Glu): ungated, out = f(h) (one
// output column per column of the first product, N1 = I); gated on the halves h = [gate | up]
// (Hugging Face's gate_up_proj), out = f(gate) * up; or GPT-OSS's interleaved (gate, up) pairs,
// clamped, out = (up + 1) * f(gate) (see glu_value). Gated activations have N1 = 2I. The math runs
// in the accumulation type: fp32, fp64 for fp64. Runtime values: one kernel serves every row.

enum class ActFn : uint8_t { Identity, Silu, Gelu, GeluTanh, Relu, Relu2, QuickGelu };
enum class Glu : uint8_t { None, Halves, OssPairs };

struct Activation {
  ActFn fn = ActFn::Identity;
  Glu glu = Glu::None;
  constexpr bool operator==(const Activation&) const = default;
};

constexpr Activation kNoActivation{};  // identity, ungated: a plain product

// The activations by name, the one table: python/moeyard/reference.py's ACTIVATIONS holds the same
// rows in the same order, which the tests check through moeyard::_activations.
struct NamedActivation {
  const char* name;
  Activation act;
};

inline constexpr NamedActivation kActivations[] = {
    {"none", {ActFn::Identity, Glu::None}},
    {"silu", {ActFn::Silu, Glu::None}},
    {"gelu", {ActFn::Gelu, Glu::None}},
    {"gelu_tanh", {ActFn::GeluTanh, Glu::None}},
    {"relu", {ActFn::Relu, Glu::None}},
    {"relu2", {ActFn::Relu2, Glu::None}},
    {"quick_gelu", {ActFn::QuickGelu, Glu::None}},
    {"swiglu", {ActFn::Silu, Glu::Halves}},
    {"geglu", {ActFn::Gelu, Glu::Halves}},
    {"geglu_tanh", {ActFn::GeluTanh, Glu::Halves}},
    {"reglu", {ActFn::Relu, Glu::Halves}},
    {"relu2_glu", {ActFn::Relu2, Glu::Halves}},
    {"quick_geglu", {ActFn::QuickGelu, Glu::Halves}},
    {"swiglu_oss", {ActFn::QuickGelu, Glu::OssPairs}},  // GPT-OSS: gate * sigmoid(1.702 gate)
};

// The names of kActivations, in order (the op moeyard::_activations).
inline std::vector<std::string> activation_names() {
  std::vector<std::string> names;
  for (const auto& row : kActivations) names.emplace_back(row.name);
  return names;
}

inline Activation parse_activation(const std::string& s) {
  for (const auto& row : kActivations)
    if (s == row.name) return row.act;
  std::string known;
  for (const auto& row : kActivations)
    known += (known.empty() ? "'" : ", '") + std::string(row.name) + "'";
  TORCH_CHECK(false, "moeyard: activation must be one of ", known, ", got '", s, "'");
}

// Gated activations read two columns of the first product per output column (gate_col, up_col).
constexpr bool is_gated(Activation a) { return a.glu != Glu::None; }

constexpr double kOssAlpha = 1.702;  // GPT-OSS swiglu_alpha (and quick_gelu's 1.702)
constexpr double kOssLimit = 7.0;    // GPT-OSS swiglu_limit

MOEYARD_HD float m_exp(float v) { return expf(v); }
MOEYARD_HD double m_exp(double v) { return exp(v); }
MOEYARD_HD float m_erf(float v) { return erff(v); }
MOEYARD_HD double m_erf(double v) { return erf(v); }
MOEYARD_HD float m_tanh(float v) { return tanhf(v); }
MOEYARD_HD double m_tanh(double v) { return tanh(v); }

template <typename T>
MOEYARD_HD T sigmoid(T v) {
  return T(1) / (T(1) + m_exp(-v));
}

// The elementwise functions: silu x sigmoid(x); gelu (erf); gelu_tanh (tanh approximation:
// transformers' gelu_new / gelu_pytorch_tanh); relu; relu2 = relu(x)^2; quick_gelu
// x sigmoid(1.702 x); identity.
template <typename T>
MOEYARD_HD T act_value(ActFn f, T v) {
  switch (f) {
    case ActFn::Silu:
      return v * sigmoid(v);
    case ActFn::Gelu:
      return T(0.5) * v * (T(1) + m_erf(v * T(0.70710678118654752)));
    case ActFn::GeluTanh: {
      const T c = T(0.79788456080286536);  // sqrt(2 / pi)
      return T(0.5) * v * (T(1) + m_tanh(c * (v + T(0.044715) * v * v * v)));
    }
    case ActFn::Relu:
      return v > T(0) ? v : T(0);
    case ActFn::Relu2:
      return v > T(0) ? v * v : T(0);
    case ActFn::QuickGelu:
      return v * sigmoid(T(kOssAlpha) * v);
    default:
      return v;
  }
}

// d f / d v (0 at relu's and relu2's kink, as torch's autograd).
template <typename T>
MOEYARD_HD T act_grad(ActFn f, T v) {
  switch (f) {
    case ActFn::Silu: {
      const T s = sigmoid(v);
      return s * (T(1) + v * (T(1) - s));
    }
    case ActFn::Gelu:
      return T(0.5) * (T(1) + m_erf(v * T(0.70710678118654752))) +
             v * T(0.39894228040143268) * m_exp(T(-0.5) * v * v);  // 1 / sqrt(2 pi)
    case ActFn::GeluTanh: {
      const T c = T(0.79788456080286536);
      const T th = m_tanh(c * (v + T(0.044715) * v * v * v));
      return T(0.5) * (T(1) + th) +
             T(0.5) * v * (T(1) - th * th) * c * (T(1) + T(3 * 0.044715) * v * v);
    }
    case ActFn::Relu:
      return v > T(0) ? T(1) : T(0);
    case ActFn::Relu2:
      return v > T(0) ? T(2) * v : T(0);
    case ActFn::QuickGelu: {
      const T s = sigmoid(T(kOssAlpha) * v);
      return s + T(kOssAlpha) * v * s * (T(1) - s);
    }
    default:
      return T(1);
  }
}

// Gated: out = f(gate) * up (halves); GPT-OSS: (clamp(up, -7, 7) + 1) * f(min(gate, 7)).
template <typename T>
MOEYARD_HD T glu_value(Activation a, T gate, T up) {
  if (a.glu != Glu::OssPairs) return act_value(a.fn, gate) * up;
  const T g = gate < T(kOssLimit) ? gate : T(kOssLimit);
  const T u = up < T(-kOssLimit) ? T(-kOssLimit) : (up > T(kOssLimit) ? T(kOssLimit) : up);
  return (u + T(1)) * act_value(a.fn, g);
}

// d out / d gate and d out / d up (GPT-OSS's clamps pass gradient inside their closed interval,
// as torch.clamp does).
template <typename T>
MOEYARD_HD void glu_grad(Activation a, T gate, T up, T& d_gate, T& d_up) {
  if (a.glu != Glu::OssPairs) {
    d_up = act_value(a.fn, gate);
    d_gate = act_grad(a.fn, gate) * up;
    return;
  }
  const bool g_in = gate <= T(kOssLimit);
  const T g = g_in ? gate : T(kOssLimit);
  const bool u_in = up >= T(-kOssLimit) && up <= T(kOssLimit);
  const T u = u_in ? up : (up < T(0) ? T(-kOssLimit) : T(kOssLimit));
  d_up = u_in ? act_value(a.fn, g) : T(0);
  d_gate = g_in ? (u + T(1)) * act_grad(a.fn, g) : T(0);
}

// Column of the first product (width n1) that holds the gate (or up) input of output column j:
// halves j and n1 / 2 + j, GPT-OSS pairs 2j and 2j + 1 (ungated: gate_col is j itself).
MOEYARD_HD int64_t gate_col(Activation a, int64_t j, int64_t n1) {
  return a.glu == Glu::OssPairs ? 2 * j : j;
}
MOEYARD_HD int64_t up_col(Activation a, int64_t j, int64_t n1) {
  return a.glu == Glu::OssPairs ? 2 * j + 1 : n1 / 2 + j;
}

// out[j] = act(v)[j] for the out_width output columns of one row whose pre-activation is v (the
// CPU loops; the CUDA kernels work on vectors of columns instead).
template <typename acc_t, typename T>
inline void act_row(Activation act, const acc_t* v, int64_t width, T* out, int64_t out_width) {
  for (int64_t j = 0; j < out_width; ++j)
    out[j] = static_cast<T>(
        is_gated(act) ? glu_value<acc_t>(act, v[gate_col(act, j, width)], v[up_col(act, j, width)])
                      : act_value<acc_t>(act.fn, v[j]));
}

// Backward of the activation at output column j of one row, given wg = d loss / d act(pre)[j]:
// writes the gradient of the one (ungated) or two (gated) pre-activation columns feeding j and
// returns act(pre)[j]. Shared by the CPU loop and the CUDA kernel.
template <typename acc_t, typename T>
MOEYARD_HD acc_t act_backward_at(Activation act, const T* pre_row, T* grad_pre_row, int64_t width,
                                 int64_t j, acc_t wg) {
  if (is_gated(act)) {
    const int64_t cg = gate_col(act, j, width), cu = up_col(act, j, width);
    const acc_t gate = static_cast<acc_t>(pre_row[cg]), up = static_cast<acc_t>(pre_row[cu]);
    acc_t d_gate, d_up;
    glu_grad<acc_t>(act, gate, up, d_gate, d_up);
    grad_pre_row[cg] = static_cast<T>(d_gate * wg);
    grad_pre_row[cu] = static_cast<T>(d_up * wg);
    return glu_value<acc_t>(act, gate, up);
  }
  const acc_t v = static_cast<acc_t>(pre_row[j]);
  grad_pre_row[j] = static_cast<T>(act_grad<acc_t>(act.fn, v) * wg);
  return act_value<acc_t>(act.fn, v);
}

// ---------------------------------------------------------------------------------- shapes

// The rows of a grouped product and how they split among experts.
struct Segments {
  int64_t E = 0;                    // experts
  int64_t R = 0;                    // rows
  std::optional<int64_t> capacity;  // fixed stride C (R = E*C), or dropless
};

struct GroupedShape {
  Segments seg;
  int64_t A = 0;  // rows of a
  int64_t K = 0;
  int64_t N = 0;
};

void check_weight_layout(const at::Tensor& b, const char* name);

// grouped_mm(a [A,K], b [E,K,N], offsets [E+1], a_index [R]?, capacity?).
GroupedShape check_grouped_mm_args(const at::Tensor& a, const at::Tensor& b,
                                   const at::Tensor& offsets,
                                   const std::optional<at::Tensor>& a_index,
                                   std::optional<int64_t> capacity);

// CPU only (on a GPU the check would need a host sync): offsets start at 0, never decrease, end
// at most at R, and with a capacity no expert keeps more than C rows.
void check_offsets_values_cpu(const at::Tensor& offsets, const Segments& seg);

// CPU only: every a_index entry lies in [-1, A).
void check_index_values_cpu(const at::Tensor& index, int64_t A, const char* name);

struct FfnShape {
  GroupedShape up;  // the first product: x [T,H] gathered through the plan, w1 [E,H,N1]
  int64_t T = 0, k = 0, H = 0, N1 = 0, I = 0;
  Activation act;
};

FfnShape check_expert_ffn_args(const at::Tensor& x, const at::Tensor& row_source,
                               const at::Tensor& token_row, const at::Tensor& offsets,
                               std::optional<int64_t> capacity, const at::Tensor& weights,
                               const at::Tensor& w1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b1,
                               const std::optional<at::Tensor>& b2, const std::string& activation);

// ------------------------------------------------------------------------------ primitives
//
// Each primitive writes every element of its output (unused rows as zeros), reads offsets on
// the device (no host sync on CUDA) and accumulates in fp32 (fp64 for fp64 on the CPU).

// Row gather: src(r) = index[r] / div, or r without an index; index < 0 reads a zero row.
struct RowIndex {
  const at::Tensor* index = nullptr;  // [rows] int32, or none
  int64_t div = 1;
};

// out[r] = epilogue(a[src(r)] @ b[e(r)]) for the used rows r, 0 for unused ones. Epilogue:
// v = product + bias[e] (fp32); pre[r] = v if pre is defined; out[r] = act(v) (gated
// activations: out has N/2 columns, see gate_col/up_col).
struct RowsGemm {
  at::Tensor a;  // [A, K]
  RowIndex a_rows;
  at::Tensor b;        // [E, K, N], either memory order
  at::Tensor offsets;  // [E+1] int32
  Segments seg;
  std::optional<at::Tensor> bias;  // [E, N]
  Activation act;
  at::Tensor out;  // [R, N or N/2], written
  at::Tensor pre;  // [R, N] or undefined
};

// out[e] = sum over the used rows r of expert e of lhs[lsrc(r)]^T rhs[rsrc(r)]: [E, M, N] written
// through out's strides (so a weight gradient gets its weight's memory order).
struct WeightGrad {
  at::Tensor lhs;  // [*, M]
  RowIndex lhs_rows;
  at::Tensor rhs;  // [*, N]
  RowIndex rhs_rows;
  at::Tensor offsets;
  Segments seg;
  at::Tensor out;  // [E, M, N]
};

// out[s] = sum over positions p in [begin[s], end[s]) of scale[p] * src[src(p)] (fp32, in
// position order; src(p) through rows as RowIndex, or p), cast to out's dtype. [S, N].
struct SegmentSum {
  at::Tensor src;  // [*, N]
  RowIndex rows;
  std::optional<at::Tensor> scale;  // [positions] in the accumulation dtype
  at::Tensor begin, end;            // [S] int64
  at::Tensor out;                   // [S, N]
};

// Bias and activation of a product computed by torch's GEMMs (the grouped_mm backend), in one pass
// over its rows, in fp32: for the used rows r of expert e
//   v = pre[r] + bias[e];  pre[r] = v (rounded, only with a bias);  out[r] = act(v)
// (out defined: [R, I], gated activations read two columns of pre per output column, see
// gate_col / up_col), and for the unused rows pre[r] = 0 and out[r] = 0. Without a bias and an out
// it only zeroes the unused rows (a product whose unused rows are read later).
struct ActForward {
  at::Tensor pre;  // [R, N1] contiguous, updated in place
  std::optional<at::Tensor> bias;  // [E, N1]
  at::Tensor offsets;              // [E+1] int32
  Segments seg;
  Activation act;
  at::Tensor out;  // [R, I] contiguous, or undefined
};

// Expert that owns row r (offsets on the same side as the caller), or -1 for an unused row.
MOEYARD_HD int64_t row_expert(const int32_t* offsets, int64_t E, int64_t capacity, int64_t r) {
  if (capacity >= 0) {  // fixed stride: row r is slot r % C of expert r / C
    if (capacity == 0) return -1;
    const int64_t e = r / capacity;
    return r % capacity < offsets[e + 1] - offsets[e] ? e : -1;
  }
  if (r >= offsets[E]) return -1;
  int64_t lo = 0, hi = E - 1;  // the last e with offsets[e] <= r (offsets never decrease)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Backward of the activation for every row r (w = row_weight[r], fp32; 0 for unused rows):
//   grad_pre[r] = act'(pre[r]) * (w * grad_act[r]),  act_w[r] = w * act(pre[r]),
//   grad_w[r] = dot(grad_act[r], act(pre[r]))  (fp32).
struct ActBackward {
  at::Tensor grad_act;    // [R, I]
  at::Tensor pre;         // [R, N1]
  at::Tensor row_weight;  // [R] acc dtype
  Activation act;
  at::Tensor grad_pre;  // [R, N1], written
  at::Tensor act_w;     // [R, I], written
  at::Tensor grad_w;    // [R] acc dtype, written
};

void rows_gemm_cpu(const RowsGemm& p);
void weight_grad_cpu(const WeightGrad& p);
void segment_sum_cpu(const SegmentSum& p);
void act_backward_cpu(const ActBackward& p);
void act_forward_cpu(const ActForward& p);
// Device dispatch of the primitives both backends share.
void segment_sum(const SegmentSum& p);
void act_backward(const ActBackward& p);
#ifdef MOEYARD_WITH_CUDA
void rows_gemm_cuda(const RowsGemm& p);
void weight_grad_cuda(const WeightGrad& p);
void segment_sum_cuda(const SegmentSum& p);
void act_backward_cuda(const ActBackward& p);
void act_forward_cuda(const ActForward& p);
// out[e] = 0 for every expert that owns no row (offsets[e+1] == offsets[e]); out [E, ...].
void zero_empty_experts_cuda(const at::Tensor& out, const at::Tensor& offsets);
#endif

// ------------------------------------------------------------------------------- products
//
// The two products every expert op is made of, computed by one backend (products.cpp); the ops
// (expert_ops.cpp) are written once in terms of them.

// An operand of a product: row r is src[index[r] / div] (a zero row where index[r] < 0), or
// src[r] without an index. The moeyard backend reads through the index inside its GEMM; the
// grouped_mm backend gathers the rows once (Products::operand) and reuses the copy.
struct Operand {
  at::Tensor src;    // [*, width]
  at::Tensor index;  // [R] int32, or undefined
  int64_t div = 1;
  RowIndex rows() const { return RowIndex{index.defined() ? &index : nullptr, div}; }
};

struct Products {
  ExpertsBackend backend = ExpertsBackend::Moeyard;
  at::Tensor offsets;  // [E+1] int32, contiguous, on the data's device
  Segments seg;

  Operand operand(const at::Tensor& src, const at::Tensor& index = at::Tensor(),
                  int64_t div = 1) const;
  // (out, pre): out[r] = act(a(r) @ b[e] + bias[e]) [R, N or N/2] and, with keep_pre, the
  // pre-activation [R, N] (the same tensor as out when act is None); unused rows are zero.
  // b: logical [E, K, N], either memory order.
  std::pair<at::Tensor, at::Tensor> rows(const Operand& a, const at::Tensor& b,
                                         const std::optional<at::Tensor>& bias, Activation act,
                                         bool keep_pre) const;
  // out[e] = sum over the used rows r of expert e of lhs(r)^T rhs(r), [E, M, N] in the memory
  // order of `like` (a weight's gradient gets that weight's order). unused_rows_zero: the caller
  // knows the unused rows of lhs or rhs are zero (and the other's finite), so capacity plans need
  // no masking.
  at::Tensor weight_grad(const Operand& lhs, const Operand& rhs, const at::Tensor& like,
                         bool unused_rows_zero) const;
};

}  // namespace moeyard
