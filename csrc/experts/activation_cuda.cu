// The passes around a product computed by torch's GEMMs (the grouped_mm backend) on the GPU,
// declared and specified in grouped_mm.h:
//
// act_forward: one block per row r. Every thread finds r's expert itself (fixed stride: r / C;
//   dropless: a binary search of the E+1 offsets, cached in L1), then owns VEC output columns at a
//   time (VEC = 16 bytes of the dtype when every row and pointer allows, else 1): it loads the
//   pre-activation columns that feed them (gated on halves: VEC of the gate half and VEC of the
//   up half; GPT-OSS: 2*VEC interleaved; ungated: VEC), adds the bias in fp32, writes the biased
//   columns back, and writes act() of them. Each pre column is read and written by exactly one
//   thread, so the in-place update needs no barrier. Unused rows get zeros. Bytes: R*N1 read, R*I
//   written (+ R*N1 written with a bias): a bandwidth-bound pass, ~R*(N1+I)*2 bytes in bf16.
// zero_empty_experts: grid (chunks, E); the blocks of an expert that owns rows exit at once, the
//   others write zeros. Bytes: only the empty experts' gradients.
// No host synchronization; launches on the current stream.
#include "common/cuda_utils.cuh"
#include "experts/grouped_mm.h"

namespace moeyard {
namespace {

constexpr int kRowThreads = 128;

template <typename T, int VEC>
__device__ __forceinline__ void load_biased(const T* row, const T* bias, int64_t c, float* v) {
  const auto in = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = static_cast<float>(in.v[i]);
  if (bias) {
    const auto b = *reinterpret_cast<const Vec<T, VEC>*>(bias + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] += static_cast<float>(b.v[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* row, int64_t c, const float* v) {
  Vec<T, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<T>(v[i]);
  *reinterpret_cast<Vec<T, VEC>*>(row + c) = o;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    act_forward_kernel(T* __restrict__ pre, int64_t width, const T* __restrict__ bias,
                       const int32_t* __restrict__ offsets, int64_t E, int64_t capacity,
                       Activation act, T* __restrict__ out, int64_t out_width) {
  const int64_t r = blockIdx.x;
  const int64_t e = row_expert(offsets, E, capacity, r);
  T* row = pre + r * width;
  T* o = out ? out + r * out_width : nullptr;
  if (e < 0) {  // unused row: zeros
    const float zeros[VEC] = {};
    for (int64_t c = threadIdx.x * VEC; c < width; c += kRowThreads * VEC)
      store<T, VEC>(row, c, zeros);
    if (o)
      for (int64_t c = threadIdx.x * VEC; c < out_width; c += kRowThreads * VEC)
        store<T, VEC>(o, c, zeros);
    return;
  }
  const T* b = bias ? bias + e * width : nullptr;
  if (!o) {  // bias only
    if (!b) return;
    for (int64_t c = threadIdx.x * VEC; c < width; c += kRowThreads * VEC) {
      float v[VEC];
      load_biased<T, VEC>(row, b, c, v);
      store<T, VEC>(row, c, v);
    }
    return;
  }
  for (int64_t j = threadIdx.x * VEC; j < out_width; j += kRowThreads * VEC) {
    float res[VEC];
    if (act.glu == Glu::Halves) {  // gate columns j.., up columns I + j..
      float g[VEC], u[VEC];
      load_biased<T, VEC>(row, b, j, g);
      load_biased<T, VEC>(row, b, out_width + j, u);
      if (b) {
        store<T, VEC>(row, j, g);
        store<T, VEC>(row, out_width + j, u);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = glu_value<float>(act, g[i], u[i]);
    } else if (act.glu == Glu::OssPairs) {  // (gate, up) pairs at columns 2j, 2j+1
      float h[2 * VEC];
      load_biased<T, VEC>(row, b, 2 * j, h);
      load_biased<T, VEC>(row, b, 2 * j + VEC, h + VEC);
      if (b) {
        store<T, VEC>(row, 2 * j, h);
        store<T, VEC>(row, 2 * j + VEC, h + VEC);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = glu_value<float>(act, h[2 * i], h[2 * i + 1]);
    } else {
      float v[VEC];
      load_biased<T, VEC>(row, b, j, v);
      if (b) store<T, VEC>(row, j, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) res[i] = act_value<float>(act.fn, v[i]);
    }
    store<T, VEC>(o, j, res);
  }
}

template <typename T>
__global__ void zero_empty_experts_kernel(T* __restrict__ out, const int32_t* __restrict__ offsets,
                                          int64_t per_expert) {
  const int64_t e = blockIdx.y;
  if (offsets[e + 1] != offsets[e]) return;
  T* o = out + e * per_expert;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < per_expert;
       i += int64_t(gridDim.x) * blockDim.x)
    o[i] = T(0);
}

}  // namespace

void act_forward_cuda(const ActForward& p) {
  TORCH_CHECK(p.pre.is_contiguous() && (!p.out.defined() || p.out.is_contiguous()),
              "moeyard: act_forward needs contiguous rows");
  const int64_t R = p.pre.size(0), width = p.pre.size(1);
  if (R == 0) return;
  TORCH_CHECK(R < (int64_t(1) << 31), "moeyard: act_forward rows must be below 2^31");
  const int64_t out_width = p.out.defined() ? p.out.size(1) : 0;
  const auto offsets = p.offsets.contiguous();
  const auto bias = p.bias ? p.bias->contiguous() : at::Tensor();
  const int64_t capacity = p.seg.capacity ? *p.seg.capacity : -1;
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    T* pre = p.pre.mutable_data_ptr<T>();
    T* out = p.out.defined() ? p.out.mutable_data_ptr<T>() : nullptr;
    const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    constexpr int kVec = 16 / sizeof(T);
    // VEC columns per thread when every row start and every column group is 16-byte aligned.
    const bool vec = width % kVec == 0 && out_width % kVec == 0 && aligned(pre, 16) &&
                     aligned(out, 16) && aligned(b, 16);
    auto launch = [&](auto vec_const) {
      constexpr int VEC = decltype(vec_const)::value;
      act_forward_kernel<T, VEC>
          <<<static_cast<unsigned>(R), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              pre, width, b, offsets.const_data_ptr<int32_t>(), p.seg.E, capacity, p.act, out,
              out_width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec)
      launch(std::integral_constant<int, kVec>{});
    else
      launch(std::integral_constant<int, 1>{});
  };
  switch (p.pre.scalar_type()) {  // fp32 math: the 16- and 32-bit dtypes the GPU backends serve
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "moeyard: act_forward on CUDA takes float32, float16 or bfloat16, got ",
                  p.pre.scalar_type());
  }
}

void zero_empty_experts_cuda(const at::Tensor& out, const at::Tensor& offsets_in) {
  const int64_t E = out.size(0);
  if (E == 0 || out.numel() == 0) return;
  TORCH_CHECK(out.is_contiguous(), "moeyard: zero_empty_experts needs a contiguous gradient");
  TORCH_CHECK(E < 65536, "moeyard: zero_empty_experts takes fewer than 65536 experts");
  const auto offsets = offsets_in.contiguous();
  const int64_t per_expert = out.numel() / E;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(per_expert, 256), 1024)),
                  static_cast<unsigned>(E));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "zero_empty_experts", [&] {
        zero_empty_experts_kernel<scalar_t><<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
            out.mutable_data_ptr<scalar_t>(), offsets.const_data_ptr<int32_t>(), per_expert);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace moeyard
