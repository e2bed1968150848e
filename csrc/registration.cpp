// Every moeyard op schema, defined once. Kernels register under the CPU and CUDA keys in their own
// files (csrc/<family>/*_cpu.cpp, *_cuda.cu); fake kernels and autograd live in python/moeyard/ops.py.
// Semantics of each op: python/moeyard/reference.py.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "experts/backend.h"
#include "experts/grouped_mm.h"
#include "merge/merge.h"

#ifndef MOEYARD_CUDA_ARCHS
#define MOEYARD_CUDA_ARCHS ""
#endif

namespace {
// How this library was compiled, as JSON (read by `python -m moeyard info`).
std::string build_info() {
#ifdef MOEYARD_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
  return std::string("{\"torch\": \"") + TORCH_VERSION + "\", \"cuda_compiled\": " +
         (cuda ? "true" : "false") + ", \"cuda_archs\": \"" + MOEYARD_CUDA_ARCHS + "\"}";
}
}  // namespace

TORCH_LIBRARY(moeyard, m) {
  // JSON: the torch this library was compiled against, whether CUDA kernels are in it, for which
  // architectures.
  m.def("_build_info() -> str", &build_info);

  // --- routing (csrc/routing) ---
  // logits [T,E] -> top-k weights [T,k] (fp32, fp64 for fp64 logits) and experts [T,k] int32;
  // score softmax|sigmoid|none, optional selection bias, group-limited selection, renorm, scale.
  m.def("route(Tensor logits, int k, str score=\"softmax\", bool topk_before_score=False, "
        "Tensor? bias=None, int n_group=1, int topk_group=1, bool renormalize=False, "
        "float scale=1.0) -> (Tensor weights, Tensor experts)");
  // ReMoE: ReLU gates; the up-to-k_max active experts per token, -1 in inactive slots.
  m.def("relu_route(Tensor logits, int k_max) -> (Tensor weights, Tensor experts)");
  // Dynamic top-p routing: per token the experts in descending probability until their softmax
  // probabilities sum past p (the crossing one kept), at most k_max; -1 in the unused slots.
  m.def("top_p_route(Tensor logits, float p, int k_max) -> (Tensor weights, Tensor experts)");
  // GRIN's SparseMixer-v2 (PhiMoE): top-2, each slot's expert within a sparsity window of the
  // slot's maximum; weights [T,2] = the window softmax's probability (fp32, fp64 for fp64), experts
  // [T,2] int32. noise [T,2,E+1] fp32 (per slot E Gumbel perturbations, then a uniform draw) means
  // training: sampled experts and Heun's midpoint scaling; None: eval (the top two).
  m.def("sparsemixer(Tensor logits, float jitter_eps=0.01, Tensor? noise=None) -> "
        "(Tensor weights, Tensor experts)");
  // GRIN's gradient estimate for sparsemixer: grad [T,2] of the weights -> grad of logits [T,E].
  m.def("_sparsemixer_backward(Tensor grad, Tensor logits, Tensor experts, float jitter_eps) -> "
        "Tensor");
  // experts [T,k] -> dispatch plan: counts [E] (before drops), offsets [E+1] (after drops),
  // row_source [R] (token*k+slot, -1 unused), token_row [T,k] (row, -1 dropped or no expert).
  // R = T*k without capacity (None = dropless), E*C with one (expert e's rows start at e*C).
  m.def("plan(Tensor experts, int num_experts, int? capacity=None, str drop_policy=\"position\", "
        "Tensor? weights=None) -> (Tensor counts, Tensor offsets, Tensor row_source, Tensor token_row)");
  // Expert choice: each expert takes its top-C tokens of scores [T,E]; returns router outputs
  // (weights [T,E], experts [T,E] with -1 padding) and the plan of those choices (R = E*C).
  m.def("expert_choice(Tensor scores, int capacity) -> (Tensor weights, Tensor experts, "
        "Tensor counts, Tensor offsets, Tensor row_source, Tensor token_row)");
  // BASE layers: scores [T,E] -> experts [T,1] int32 maximizing sum_t scores[t, experts[t]] with
  // experts 0..T%E-1 taking T/E+1 tokens and the others T/E (auction on a 2^24-step grid).
  m.def("balanced_assignment(Tensor scores, int max_rounds=65536) -> Tensor");
  // bias[e] += rate * sign(mean(load) - load[e]), in place (auxiliary-loss-free balancing).
  m.def("update_expert_bias(Tensor(a!) bias, Tensor load, float rate) -> ()");
  // Switch balance loss E * sum_e f_e P_e (f_e = counts_e / (T k), P = mean over tokens of the
  // softmax, or of the sigmoid normalized per token for score="sigmoid") and z-loss
  // mean_t logsumexp(logits_t)^2, in one pass over the logits.
  m.def("router_losses(Tensor logits, Tensor counts, int k, str score=\"softmax\") -> "
        "(Tensor balance_loss, Tensor z_loss)");
  // DeepSeek-V3 sequence-wise balance loss (without its alpha), averaged over sequences.
  m.def("sequence_balance_loss(Tensor scores, Tensor experts, int num_sequences) -> Tensor");

  // --- permutation (csrc/experts) ---
  // out[r] = x[row_source[r] / k] (zero for unused rows); [R, d].
  m.def("permute(Tensor x, Tensor row_source, Tensor token_row) -> Tensor");
  // out[t] = sum_j weights[t,j] * y[token_row[t,j]] with fp32 accumulation, in slot order; [T, d].
  m.def("unpermute(Tensor y, Tensor row_source, Tensor token_row, Tensor? weights=None) -> Tensor");
  // Backward of unpermute: grad_y [R,d] and, when asked, grad_weights [T,k] (else [0]).
  m.def("unpermute_backward(Tensor grad, Tensor y, Tensor row_source, Tensor token_row, "
        "Tensor? weights, bool compute_grad_weights) -> (Tensor grad_y, Tensor grad_weights)");

  // --- expert compute (csrc/experts) ---
  // out[r] = a[a_index ? a_index[r] : r] @ b[e] for the rows r of expert e (offsets [E+1] int32,
  // or with a capacity C rows e*C .. e*C + offsets[e+1]-offsets[e]; other rows zero); b [E,K,N]
  // in either memory order; fp32 accumulation.
  // backend: "auto" (the table in csrc/experts/backend.cpp), "grouped_mm" (torch's grouped GEMM /
  // bmm with moeyard's gather, activation and combine) or "moeyard" (moeyard's own grouped GEMM).
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets, Tensor? a_index=None, int? capacity=None, "
        "str backend=\"auto\") -> Tensor");
  // Gradients of grouped_mm; an output not asked for is an empty [0] tensor.
  m.def("grouped_mm_backward(Tensor grad, Tensor a, Tensor b, Tensor offsets, Tensor? a_index, "
        "int? capacity, bool need_a, bool need_b, str backend=\"auto\") -> (Tensor grad_a, "
        "Tensor grad_b)");
  // The routed experts' MLP and combine: y[t] = sum_j weights[t,j] * (act(x[t] @ w1[e] + b1[e]) @
  // w2[e] + b2[e]) over the slots with a row; w1 [E,H,N1], w2 [E,I,H] (logical, either order).
  m.def("expert_ffn(Tensor x, Tensor row_source, Tensor token_row, Tensor offsets, int? capacity, "
        "Tensor weights, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None, "
        "str activation=\"swiglu\", str backend=\"auto\") -> Tensor");
  // expert_ffn that also returns the first product's pre-activation h [R,N1] (for the backward).
  m.def("_expert_ffn_forward(Tensor x, Tensor row_source, Tensor token_row, Tensor offsets, "
        "int? capacity, Tensor weights, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
        "str activation, str backend=\"auto\") -> (Tensor out, Tensor h)");
  // Gradients of expert_ffn w.r.t. (x, weights, w1, w2, b1, b2) where output_mask says so (else
  // empty [0]); recomputes the activation from h. consume_h: h's buffer is dead after this call
  // (expert_ffn's eager autograd without retain_graph), so it is reused for h's gradient.
  m.def("_expert_ffn_backward(Tensor grad, Tensor x, Tensor row_source, Tensor token_row, "
        "Tensor offsets, int? capacity, Tensor weights, Tensor w1, Tensor w2, Tensor? b1, "
        "Tensor? b2, str activation, Tensor h, bool[6] output_mask, str backend=\"auto\", "
        "bool consume_h=False) -> "
        "(Tensor grad_x, Tensor grad_weights, Tensor grad_w1, Tensor grad_w2, Tensor grad_b1, "
        "Tensor grad_b2)");

  // --- SMEAR merged experts (csrc/merge) ---
  // y[b] = x[b] @ (sum_e probs[b,e] W_e)^T + sum_e probs[b,e] bias_e: x [B,S,K], probs [B,E] fp32,
  // weight [E,N,K] (logical, either memory order), bias [E,N] -> [B,S,N]; merged in chunks.
  m.def("merged_linear(Tensor x, Tensor probs, Tensor weight, Tensor? bias=None) -> Tensor");
  // Gradients of merged_linear w.r.t. (x, probs, weight, bias) where output_mask says so (else
  // empty [0]); recomputes the merged weights.
  m.def("_merged_linear_backward(Tensor grad, Tensor x, Tensor probs, Tensor weight, "
        "Tensor? bias, bool[4] output_mask) -> (Tensor grad_x, Tensor grad_probs, "
        "Tensor grad_weight, Tensor grad_bias)");
  // The names of the experts' activations (csrc/experts/grouped_mm.h's table), in order.
  m.def("_activations() -> str[]", &moeyard::activation_names);
  // JSON: the expert-compute backends' "auto" table and its choice per dtype on each device.
  m.def("_experts_backend_table() -> str", &moeyard::experts_backend_table);

  // Sets merged_linear's bytes of merged weights per chunk (process-wide); returns the previous.
  m.def("_set_merge_budget(int bytes) -> int", &moeyard::set_merge_budget);
}
