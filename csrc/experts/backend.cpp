// The expert-compute backend choice (backend.h): what torch's grouped GEMM serves, the "auto"
// table, and its JSON for `python -m moeyard info`.
#include "experts/backend.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <sstream>

namespace moeyard {

#ifdef MOEYARD_WITH_CUDA
int cuda_capability(c10::DeviceIndex device);  // backend_cuda.cu: major * 10 + minor
int cuda_device_count();
#endif

namespace {

// One row of the "auto" table: on `device` with a compute capability in [min_cc, max_cc]
// (major * 10 + minor; ignored on the CPU) and `dtype`, "auto" takes `backend`. The first row that
// matches decides; no row: moeyard. `evidence` names the run that decided the row.
struct AutoRule {
  c10::DeviceType device;
  int min_cc, max_cc;
  at::ScalarType dtype;
  ExpertsBackend backend;
  const char* evidence;
};

constexpr const char* kPredicted =
    "predicted, not yet measured side by side: torch._grouped_mm ran 601-657 TFLOP/s on an H100 "
    "(spec/ANCHORS-MEASURED.md, 2026-11-23), a static review puts moeyard's kernel at 30-45% of "
    "bf16 peak";
constexpr const char* kCpuRun =
    "measured on the CPU: benchmarks/bench_cpu.py, RESULTS.md 'CPU backends' (2026-12-01)";

constexpr AutoRule kAutoTable[] = {
    {c10::DeviceType::CUDA, 90, 109, at::kBFloat16, ExpertsBackend::GroupedMm, kPredicted},
    {c10::DeviceType::CPU, 0, 0, at::kFloat, ExpertsBackend::GroupedMm, kCpuRun},
    {c10::DeviceType::CPU, 0, 0, at::kHalf, ExpertsBackend::GroupedMm, kCpuRun},
    {c10::DeviceType::CPU, 0, 0, at::kBFloat16, ExpertsBackend::Moeyard, kCpuRun},
};

constexpr const char* kEnv = "MOEYARD_EXPERTS_BACKEND";

int capability_of(const at::Device& device) {
#ifdef MOEYARD_WITH_CUDA
  if (device.is_cuda()) return cuda_capability(device.index());
#endif
  return 0;
}

const AutoRule* rule_for(c10::DeviceType device, int cc, at::ScalarType dtype) {
  for (const AutoRule& r : kAutoTable)
    if (r.device == device && r.dtype == dtype &&
        (device != c10::DeviceType::CUDA || (cc >= r.min_cc && cc <= r.max_cc)))
      return &r;
  return nullptr;
}

// torch's name of the dtypes the table keys on.
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(t);
  }
}

ExpertsBackend parse_backend(const std::string& s, const char* where) {
  if (s == "grouped_mm") return ExpertsBackend::GroupedMm;
  if (s == "moeyard") return ExpertsBackend::Moeyard;
  TORCH_CHECK(false, "moeyard: ", where, " must be 'auto', 'grouped_mm' or 'moeyard', got '", s,
              "'");
}

// Row widths and strides that torch's grouped GEMM takes: every row 16-byte aligned.
std::optional<std::string> alignment_refusal(const ProductInputs& in, int64_t align) {
  std::ostringstream why;
  for (int64_t w : in.widths) {
    if (w % align != 0 || w == 0) {
      why << "a row width of " << w << " elements is not a positive multiple of " << align
          << " (torch's grouped GEMM needs 16-byte aligned rows)";
      return why.str();
    }
  }
  for (const at::Tensor* w : in.weights) {
    const int64_t lead = w->stride(2) == 1 ? w->stride(1) : w->stride(2);
    if ((w->stride(1) != 1 && w->stride(2) != 1) || lead % align != 0) {
      why << "an expert weight with strides " << w->strides()
          << " is not 16-byte aligned row by row (torch's grouped GEMM needs that)";
      return why.str();
    }
    if (w->is_cuda() && reinterpret_cast<uintptr_t>(w->const_data_ptr()) % 16 != 0) {
      why << "an expert weight does not start at a 16-byte aligned address (an offset view)";
      return why.str();
    }
  }
  return std::nullopt;
}

}  // namespace

const char* backend_name(ExpertsBackend b) {
  return b == ExpertsBackend::GroupedMm ? "grouped_mm" : "moeyard";
}

std::optional<std::string> grouped_mm_refusal(const ProductInputs& in) {
  const at::Tensor& x = *in.data;
  const auto dtype = x.scalar_type();
  std::ostringstream why;
  if (dtype == at::kDouble) return std::string("torch's grouped GEMM has no float64 kernel");
  if (x.is_cuda() && !in.capacity) {
    const int cc = capability_of(x.device());
    if (dtype != at::kBFloat16 || cc < 90 || cc >= 110) {
      why << "torch's grouped GEMM runs " << dtype_name(dtype) << " on compute capability "
          << cc / 10 << "." << cc % 10 << " as a loop over the experts that synchronizes with the "
          << "host (its sync-free CUTLASS kernel is bf16 on 9.x and 10.x only)";
      return why.str();
    }
    if (in.experts >= 1024) {
      why << "torch's grouped GEMM takes at most 1023 experts, got " << in.experts;
      return why.str();
    }
  }
  if (!x.is_cuda() && !x.is_cpu()) {
    why << "moeyard's grouped_mm backend runs on CPU and CUDA tensors, got " << x.device();
    return why.str();
  }
  return alignment_refusal(in, 16 / static_cast<int64_t>(c10::elementSize(dtype)));
}

ExpertsBackend resolve_backend(const std::string& requested, const ProductInputs& in) {
  std::string name = requested;
  const char* where = "backend";
  if (name == "auto") {
    if (const char* env = std::getenv(kEnv); env != nullptr && *env != '\0') {
      name = env;
      where = kEnv;
    }
  }
  if (name != "auto") {
    const ExpertsBackend b = parse_backend(name, where);
    if (b == ExpertsBackend::GroupedMm) {
      const auto why = grouped_mm_refusal(in);
      TORCH_CHECK(!why, "moeyard: backend 'grouped_mm'",
                  where == kEnv ? " (from MOEYARD_EXPERTS_BACKEND)" : "",
                  " cannot compute these expert products: ", *why,
                  ". Use backend='moeyard' or 'auto'.");
    }
    return b;
  }
  const at::Tensor& x = *in.data;
  const AutoRule* rule = rule_for(x.device().type(), capability_of(x.device()), x.scalar_type());
  if (rule == nullptr || rule->backend == ExpertsBackend::Moeyard) return ExpertsBackend::Moeyard;
  if (const auto why = grouped_mm_refusal(in)) {
    TORCH_WARN_ONCE("moeyard: expert compute runs on moeyard's own kernel instead of torch's "
                    "grouped GEMM (the faster choice for ", dtype_name(x.scalar_type()),
                    " on this device) because ", *why,
                    ". Pass backend='moeyard' to silence this.");
    return ExpertsBackend::Moeyard;
  }
  return rule->backend;
}

std::string experts_backend_table() {
  std::ostringstream js;
  js << "{\"env\": \"" << kEnv << "\", \"env_value\": ";
  if (const char* env = std::getenv(kEnv))
    js << "\"" << env << "\"";
  else
    js << "null";
  js << ", \"rules\": [";
  bool first = true;
  for (const AutoRule& r : kAutoTable) {
    js << (first ? "" : ", ") << "{\"device\": \""
       << (r.device == c10::DeviceType::CUDA ? "cuda" : "cpu") << "\", \"min_cc\": " << r.min_cc
       << ", \"max_cc\": " << r.max_cc << ", \"dtype\": \"" << dtype_name(r.dtype)
       << "\", \"backend\": \"" << backend_name(r.backend) << "\", \"evidence\": \"" << r.evidence
       << "\"}";
    first = false;
  }
  js << "], \"devices\": [";
  std::vector<std::pair<std::string, std::pair<c10::DeviceType, int>>> devices{
      {"cpu", {c10::DeviceType::CPU, 0}}};
#ifdef MOEYARD_WITH_CUDA
  for (int d = 0; d < cuda_device_count(); ++d)
    devices.push_back({"cuda:" + std::to_string(d), {c10::DeviceType::CUDA, cuda_capability(d)}});
#endif
  first = true;
  for (const auto& [name, dev] : devices) {
    js << (first ? "" : ", ") << "{\"device\": \"" << name << "\", \"cc\": " << dev.second
       << ", \"auto\": {";
    bool first_dtype = true;
    for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
      const AutoRule* r = rule_for(dev.first, dev.second, dtype);
      js << (first_dtype ? "" : ", ") << "\"" << dtype_name(dtype) << "\": \""
         << backend_name(r ? r->backend : ExpertsBackend::Moeyard) << "\"";
      first_dtype = false;
    }
    js << "}}";
    first = false;
  }
  js << "]}";
  return js.str();
}

}  // namespace moeyard
