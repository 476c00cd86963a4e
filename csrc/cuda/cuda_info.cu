#include <cuda_runtime.h>

#include <atomic>

#include "cuda_check.cuh"
#include "unmask/cuda_info.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh

namespace {
thread_local std::string last_error_message;
}

void record_cuda_error(cudaError_t error) { last_error_message = cudaGetErrorString(error); }

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

std::string last_cuda_error() { return last_error_message; }

int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // static storage: zero-initialised
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device >= 0 && device < kMaxDevices) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) return 1;
  if (device >= 0 && device < kMaxDevices) cached[device].store(count, std::memory_order_relaxed);
  return count;
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
