#pragma once

#include <cuda_runtime.h>

#include "unmask/status.h"

namespace unmask {

void record_cuda_error(cudaError_t error);

// After a launch: a launch error becomes Status::kCudaError with its message kept
// for the binding. No synchronisation: asynchronous faults surface at the next
// synchronising call, as in PyTorch.
inline Status check_launch() {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return Status::kOk;
  record_cuda_error(error);
  return Status::kCudaError;
}

}  // namespace unmask
