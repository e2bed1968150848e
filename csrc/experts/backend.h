// Which implementation computes the expert products (grouped_mm, expert_ffn), decided in one place.
//
// Two backends compute the same thing (python/moeyard/reference.py) from the same plan:
//   moeyard     moeyard's own grouped GEMM (grouped_mm_cpu.cpp, grouped_mm_cuda.cu): any dtype,
//               any CUDA architecture, any row width; rows are read through the plan inside the
//               GEMM (no permuted copy) and the activation runs in its epilogue.
//   grouped_mm  torch's grouped GEMM (at::_grouped_mm: CUTLASS on sm90/sm100, a loop of at::mm on
//               the CPU) for dropless plans and at::bmm for capacity plans, composed with moeyard's
//               row gather, activation and combine kernels. It materializes the permuted rows.
//
// "auto" takes the backend that the table kAutoTable (backend.cpp) names for the device and dtype,
// unless the inputs are outside what that backend serves, then moeyard's with a one-time warning;
// MOEYARD_EXPERTS_BACKEND (auto | grouped_mm | moeyard) replaces "auto" process-wide. A backend
// asked for by name that cannot serve the inputs raises an error saying why. Nothing here ever
// picks a path that synchronizes with the host: on CUDA, torch's grouped GEMM for dropless plans
// is used only where it is sync-free (bf16 on compute capability 9.x and 10.x; elsewhere its
// fallback copies the offsets to the host and loops over groups).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace moeyard {

enum class ExpertsBackend { Moeyard, GroupedMm };

const char* backend_name(ExpertsBackend b);

// The inputs of one expert product, as the backend choice sees them.
struct ProductInputs {
  const at::Tensor* data = nullptr;  // the activations (x or a): device and dtype
  int64_t experts = 0;
  bool capacity = false;                   // fixed-stride capacity layout (at::bmm) or dropless
  std::vector<int64_t> widths;             // row widths of every operand and output (K, N, ...)
  std::vector<const at::Tensor*> weights;  // logical [E, K, N] weights, either memory order
};

// Why torch's grouped GEMM cannot compute these products without a host sync or a copy, or
// nothing if it can.
std::optional<std::string> grouped_mm_refusal(const ProductInputs& in);

// The backend that computes the products: `requested` is "auto", "grouped_mm" or "moeyard".
ExpertsBackend resolve_backend(const std::string& requested, const ProductInputs& in);

// The table and the choice for each dtype on the visible devices, as JSON (python -m moeyard info).
std::string experts_backend_table();

}  // namespace moeyard
