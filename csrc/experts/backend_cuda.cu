// The device facts the expert-compute backend choice needs (backend.cpp), from the CUDA runtime
// through ATen's cached device properties (no device work, no synchronization).
#include <ATen/cuda/CUDAContext.h>

namespace moeyard {

int cuda_capability(c10::DeviceIndex device) {
  const cudaDeviceProp* p =
      at::cuda::getDeviceProperties(device < 0 ? at::cuda::current_device() : device);
  return p->major * 10 + p->minor;
}

int cuda_device_count() { return at::cuda::device_count(); }

}  // namespace moeyard
