// plan on the CPU: the dispatch plan of a routing (counts, offsets, row_source, token_row).
//
// Assignments (t, j) are visited in priority order -- slot-major (every token's slot 0 before any
// slot 1), within a slot by token priority: token order for drop_policy 'position'; for 'score'
// the tokens sorted by confidence = max of their weights over slots with an expert (NaN if any of
// those is NaN, -inf with none), larger first, NaN last, ties to the lower token (common/order.h).
// Each visit takes the expert's next free position p: dropless row = seg_start[e] + p (seg_start =
// exclusive cumsum of counts); with capacity C row = e*C + p if p < C, else dropped.
// Every expert id must be in [-1, E); the first one that is not is reported with its position.
// Ids are int32 or int64, read as they are (an int64 id is never narrowed before its check).
// Work O(T*k + E), plus O(T log T) for the score sort; serial (memory-bound, one pass).
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/order.h"
#include "routing/plan.h"

namespace moeyard {
namespace {

// Token order for drop_policy 'score' (see the file comment).
template <typename scalar_t, typename index_t>
std::vector<int32_t> score_order(const PlanParams& p, const index_t* experts,
                                 const scalar_t* weights) {
  const int64_t T = p.T, k = p.k;
  std::vector<uint64_t> keys(T);
  for (int64_t t = 0; t < T; ++t) {
    float conf = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      if (experts[t * k + j] < 0) continue;
      const float w = static_cast<float>(weights[t * k + j]);
      conf = (w != w || w > conf) ? w : conf;  // NaN propagates, as torch's max does
    }
    keys[t] = pack_key(conf, static_cast<uint32_t>(t));  // unique: larger key = higher priority
  }
  std::sort(keys.begin(), keys.end(), std::greater<>());
  std::vector<int32_t> order(T);
  for (int64_t q = 0; q < T; ++q) order[q] = static_cast<int32_t>(key_index(keys[q]));
  return order;
}

// Fills the plan of experts [T,k] (int32 or int64 ids, read as they are).
template <typename index_t>
void fill_plan(const PlanParams& p, const index_t* ex, const std::optional<at::Tensor>& weights_in,
               int32_t* cnt, int32_t* off, int32_t* rs, int32_t* tr) {
  const int64_t T = p.T, k = p.k, E = p.E, n = T * k;
  for (int64_t i = 0; i < n; ++i) {
    const index_t e = ex[i];
    TORCH_CHECK(e >= -1 && e < E, "moeyard: experts[", i / k, ", ", i % k, "] = ", e,
                " is not an expert id: ids must be in [0, num_experts=", E,
                ") or -1 for an empty slot");
  }

  std::fill(cnt, cnt + E, 0);
  std::fill(rs, rs + p.R, -1);
  std::fill(tr, tr + n, -1);
  for (int64_t i = 0; i < n; ++i)
    if (ex[i] >= 0) ++cnt[ex[i]];

  // seg_start: first dropless row of each expert; offsets: exclusive cumsum of the kept rows.
  std::vector<int64_t> next(E);  // next row of each expert
  int64_t all = 0, kept = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = p.dropless() ? all : e * p.C;
    off[e] = static_cast<int32_t>(kept);
    all += cnt[e];
    kept += p.dropless() ? cnt[e] : std::min<int64_t>(cnt[e], p.C);
  }
  off[E] = static_cast<int32_t>(kept);
  if (n == 0) return;

  std::vector<int32_t> order;
  if (p.policy == DropPolicy::Score) {
    auto w = weights_in->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "plan_cpu", [&] {
      order = score_order<scalar_t>(p, ex, w.const_data_ptr<scalar_t>());
    });
  }

  for (int64_t j = 0; j < k; ++j) {
    for (int64_t q = 0; q < T; ++q) {
      const int64_t t = order.empty() ? q : order[q];
      const int64_t src = t * k + j;
      const int64_t e = ex[src];
      if (e < 0) continue;
      const int64_t row = next[e]++;
      if (!p.dropless() && row >= (e + 1) * p.C) continue;  // over capacity: dropped
      rs[row] = static_cast<int32_t>(src);
      tr[src] = static_cast<int32_t>(row);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_cpu(
    const at::Tensor& experts_in, int64_t num_experts, std::optional<int64_t> capacity,
    c10::string_view drop_policy, const std::optional<at::Tensor>& weights_in) {
  const PlanParams p =
      check_plan_args(experts_in, num_experts, capacity, std::string(drop_policy), weights_in);
  auto experts = experts_in.contiguous();
  auto [counts, offsets, row_source, token_row] = plan_outputs(experts, p);
  AT_DISPATCH_INDEX_TYPES(experts.scalar_type(), "plan_cpu", [&] {
    fill_plan<index_t>(p, experts.const_data_ptr<index_t>(), weights_in,
                       counts.mutable_data_ptr<int32_t>(), offsets.mutable_data_ptr<int32_t>(),
                       row_source.mutable_data_ptr<int32_t>(),
                       token_row.mutable_data_ptr<int32_t>());
  });
  return {counts, offsets, row_source, token_row};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) { m.impl("plan", &plan_cpu); }

}  // namespace moeyard
