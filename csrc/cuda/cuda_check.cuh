#pragma once

#include <cuda_runtime.h>

#include "unmask/status.h"

namespace unmask {

void record_cuda_error(cudaError_t error);

// The current device's multiprocessor count, read once per device and cached (1 if the
// runtime cannot say). Launchers size their grids and splits by it.
int sm_count();

// After a launch: a launch error becomes a CUDA-error status with its message kept
// for the binding. No synchronisation: asynchronous faults surface at the next
// synchronising call, as in PyTorch.
inline Status check_launch() {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return ok_status();
  record_cuda_error(error);
  return cuda_error();
}

}  // namespace unmask
