#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "unmask/cuda_info.h"

namespace unmask {

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

}  // namespace unmask
