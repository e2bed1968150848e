// update_expert_bias / router_losses / sequence_balance_loss on the CPU.
//
// update_expert_bias: mean(load) in fp64 (sequential sum), then bias[e] += float(rate * sign(mean -
//   load[e])) in place. O(E).
// router_losses: one pass over the logits [T,E]: per row the max, sum exp(z - max) (softmax and
//   logsumexp), the softmax added into per-chunk column sums (chunks of kBalanceChunkRows rows, run
//   in parallel) and logsumexp^2 into a per-chunk sum; the chunks are then reduced in chunk order,
//   so the result does not depend on the thread count. O(T*E).
// sequence_balance_loss: the same per-chunk scheme over scores [N,E], chunks never straddling a
//   sequence: column sums of s / (sum_e s + 1e-20) and integer counts of the chosen experts; then
//   per sequence sum_e f_e P_e, averaged over sequences in order. O(N*(E + k)).
// Accumulation in fp32 (fp64 for fp64 inputs). Expert ids (int32 or int64, read as they are)
// outside [-1, E) raise.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "routing/balance.h"

namespace moeyard {
namespace {

// ------------------------------------------------------------------------ update_expert_bias

void update_expert_bias_cpu(const at::Tensor& bias, const at::Tensor& load_in, double rate) {
  const int64_t E = check_update_expert_bias_args(bias, load_in, rate);
  if (E == 0) return;
  auto load = load_in.contiguous();
  double sum = 0;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, load.scalar_type(), "update_expert_bias_cpu",
                             [&] {
                               const scalar_t* l = load.const_data_ptr<scalar_t>();
                               for (int64_t e = 0; e < E; ++e) sum += static_cast<double>(l[e]);
                               const double mean = sum / static_cast<double>(E);
                               float* b = bias.mutable_data_ptr<float>();
                               const int64_t st = bias.stride(0);
                               for (int64_t e = 0; e < E; ++e)
                                 b[e * st] += static_cast<float>(
                                     sign_step(mean, static_cast<double>(l[e]), rate));
                             });
}

// ----------------------------------------------------------------------------- router_losses

template <typename scalar_t>
void router_losses_cpu_kernel(const RouterLossShape& s, const scalar_t* logits,
                              const acc_type_t<scalar_t>* counts, acc_type_t<scalar_t>* balance,
                              acc_type_t<scalar_t>* zloss) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t T = s.T, E = s.E;
  const int64_t nchunks = (T + kBalanceChunkRows - 1) / kBalanceChunkRows;
  std::vector<acc_t> part(nchunks * E, acc_t(0)), zpart(nchunks, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ex(E);
    for (int64_t c = begin; c < end; ++c) {
      acc_t* col = part.data() + c * E;
      acc_t zs = 0;
      const int64_t t_end = std::min(T, (c + 1) * kBalanceChunkRows);
      for (int64_t t = c * kBalanceChunkRows; t < t_end; ++t) {
        const scalar_t* row = logits + t * E;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        bool nan = false;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t z = static_cast<acc_t>(row[e]);
          nan |= z != z;
          m = std::max(m, z);
        }
        if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
        acc_t sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (ex[e] = std::exp(static_cast<acc_t>(row[e]) - m));
        const acc_t lse = row_logsumexp(m, sum);
        if (s.sigmoid) {  // P's summand: sigmoid(z) normalized over the row
          acc_t ssum = 0;
          for (int64_t e = 0; e < E; ++e)
            ssum += (ex[e] = acc_t(1) / (acc_t(1) + std::exp(-static_cast<acc_t>(row[e]))));
          sum = ssum + acc_t(1e-20);
        }
        for (int64_t e = 0; e < E; ++e) col[e] += ex[e] / sum;
        zs += lse * lse;
      }
      zpart[c] = zs;
    }
  });
  acc_t bal = 0, zsum = 0;
  const acc_t Tk = static_cast<acc_t>(T * s.k), Ta = static_cast<acc_t>(T);
  for (int64_t e = 0; e < E; ++e) {
    acc_t colsum = 0;
    for (int64_t c = 0; c < nchunks; ++c) colsum += part[c * E + e];
    bal += (counts[e] / Tk) * (colsum / Ta);
  }
  for (int64_t c = 0; c < nchunks; ++c) zsum += zpart[c];
  *balance = static_cast<acc_t>(E) * bal;
  *zloss = zsum / Ta;
}

std::tuple<at::Tensor, at::Tensor> router_losses_cpu(const at::Tensor& logits_in,
                                                     const at::Tensor& counts_in, int64_t k,
                                                     c10::string_view score) {
  const RouterLossShape s = check_router_losses_args(logits_in, counts_in, k, score);
  const auto acc = acc_dtype(logits_in.scalar_type());
  auto opts = logits_in.options().dtype(acc);
  if (s.T == 0) return {at::zeros({}, opts), at::zeros({}, opts)};
  auto logits = logits_in.contiguous();
  auto counts = counts_in.to(acc).contiguous();
  auto balance = at::empty({}, opts), zloss = at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "router_losses_cpu", [&] {
                                    using acc_t = acc_type_t<scalar_t>;
                                    router_losses_cpu_kernel<scalar_t>(
                                        s, logits.const_data_ptr<scalar_t>(),
                                        counts.const_data_ptr<acc_t>(),
                                        balance.mutable_data_ptr<acc_t>(),
                                        zloss.mutable_data_ptr<acc_t>());
                                  });
  return {balance, zloss};
}

// --------------------------------------------------------------------- sequence_balance_loss

template <typename scalar_t, typename index_t>
acc_type_t<scalar_t> sequence_balance_loss_cpu_kernel(const SeqLossShape& s,
                                                       const scalar_t* scores,
                                                       const index_t* experts) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t E = s.E, k = s.k, S = s.S, B = s.B;
  const int64_t C = (S + kBalanceChunkRows - 1) / kBalanceChunkRows;  // chunks per sequence
  std::vector<acc_t> part(B * C * E, acc_t(0));
  std::vector<int64_t> cnt(B * C * E, 0);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / C, c = idx % C;
      acc_t* col = part.data() + idx * E;
      int64_t* n = cnt.data() + idx * E;
      const int64_t t_begin = b * S + c * kBalanceChunkRows;
      const int64_t t_end = b * S + std::min(S, (c + 1) * kBalanceChunkRows);
      for (int64_t t = t_begin; t < t_end; ++t) {
        const scalar_t* row = scores + t * E;
        acc_t z = 0;
        for (int64_t e = 0; e < E; ++e) z += static_cast<acc_t>(row[e]);
        z += acc_t(1e-20);
        for (int64_t e = 0; e < E; ++e) col[e] += static_cast<acc_t>(row[e]) / z;
        for (int64_t j = 0; j < k; ++j) {
          const index_t ex = experts[t * k + j];
          if (ex >= 0) ++n[ex];
        }
      }
    }
  });
  const acc_t f_scale = static_cast<acc_t>(static_cast<double>(E) / static_cast<double>(k * S));
  const acc_t Sa = static_cast<acc_t>(S);
  acc_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    acc_t seq = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc_t colsum = 0;
      int64_t count = 0;
      for (int64_t c = 0; c < C; ++c) {
        colsum += part[(b * C + c) * E + e];
        count += cnt[(b * C + c) * E + e];
      }
      seq += (static_cast<acc_t>(count) * f_scale) * (colsum / Sa);
    }
    total += seq;
  }
  return total / static_cast<acc_t>(B);
}

at::Tensor sequence_balance_loss_cpu(const at::Tensor& scores_in, const at::Tensor& experts_in,
                                     int64_t num_sequences) {
  const SeqLossShape s = check_sequence_balance_loss_args(scores_in, experts_in, num_sequences);
  const auto acc = acc_dtype(scores_in.scalar_type());
  auto out = at::zeros({}, scores_in.options().dtype(acc));
  auto experts = experts_in.contiguous();
  auto scores = scores_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "sequence_balance_loss_cpu", [&] {
    const index_t* ex = experts.const_data_ptr<index_t>();
    for (int64_t i = 0; i < s.N * s.k; ++i)
      TORCH_CHECK(ex[i] >= -1 && ex[i] < s.E, "moeyard: experts[", i / s.k, ", ", i % s.k,
                  "] = ", ex[i], " is out of range [-1, E=", s.E, ")");
    if (s.N == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                    "sequence_balance_loss_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      *out.mutable_data_ptr<acc_t>() =
          sequence_balance_loss_cpu_kernel(s, scores.const_data_ptr<scalar_t>(), ex);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("update_expert_bias", &update_expert_bias_cpu);
  m.impl("router_losses", &router_losses_cpu);
  m.impl("sequence_balance_loss", &sequence_balance_loss_cpu);
}

}  // namespace moeyard
