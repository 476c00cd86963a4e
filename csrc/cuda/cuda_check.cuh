// What every .cu file shares: launch-error handling, the SM count, and the three places
// where the same kernel source compiles for a GPU (nvcc) and for the SIMT interpreter
// (g++ with UNMASK_SIMT, csrc/simt): kernel launches, dynamic shared memory, and the
// launchers' namespace (unmask::simt:: in the interpreter's build, isa_namespace.h).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "unmask/status.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN

void record_cuda_error(cudaError_t error);

// The current device's multiprocessor count, read once per device and cached (1 if the
// runtime cannot say). Launchers size their grids and splits by it. The interpreter's
// is settable (unmask._C.simt_set_sm_count), so a test can force the split paths.
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

// kernel<<<grid, block, shared_bytes, stream>>>(args...) as cudaLaunchKernelEx, the
// standard typed launch: nvcc runs it on the GPU, and the interpreter's cuda_runtime.h
// (csrc/simt) runs the same call on CPU fibers. `name` labels the interpreter's reports.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
#if defined(UNMASK_SIMT)
  ::simt::launch(name, config, kernel, std::forward<Args>(args)...);
#else
  (void)name;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // errors reach check_launch()
#endif
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask

// Shared memory through macros, so that the SIMT interpreter can place and check it:
//   UNMASK_DYNAMIC_SHARED(T, name)      `extern __shared__ T name[]`, the launch's dynamic
//                                       shared memory as an array of T;
//   UNMASK_SHARED(T, name)              `__shared__ T name`;
//   UNMASK_SHARED_ARRAY(T, name, count) `__shared__ T name[count]`.
#if defined(UNMASK_SIMT)
#define UNMASK_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::simt::dynamic_shared())
#define UNMASK_SHARED(type, name) \
  type& name = *static_cast<type*>(::simt::static_shared(__COUNTER__, sizeof(type), alignof(type)))
#define UNMASK_SHARED_ARRAY(type, name, count) \
  type(&name)[count] =                         \
      *static_cast<type(*)[count]>(::simt::static_shared(__COUNTER__, sizeof(type[count]), alignof(type)))
#else
#define UNMASK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define UNMASK_SHARED(type, name) __shared__ type name
#define UNMASK_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#endif
