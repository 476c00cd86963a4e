// The CUDA sample launcher: SampleParams plus what only the GPU path needs.
#pragma once

#include <cstdint>

#include "unmask/sample.h"

namespace unmask {

struct SampleCudaExtras {
  void* workspace = nullptr;  // sample_cuda_workspace_bytes(params) bytes of device memory
  int64_t workspace_bytes = 0;
  int64_t row_base = 0;  // set by the launcher when it splits a launch; callers leave 0
};

UNMASK_BUILD_NAMESPACE_BEGIN  // the interpreter's build of the launchers is unmask::simt::*

// Splits per row, so that rows * splits blocks fill the GPU.
int sample_cuda_splits(int64_t rows, int64_t vocab);
// Device bytes of workspace a launch with these params needs (the rows it samples, from
// select_rows and n_selected, times their splits); 0 when it samples none.
int64_t sample_cuda_workspace_bytes(const SampleParams& params);

// top_k / top_p are not implemented on CUDA yet: unsupported. The row ids live on the
// device, so the launcher cannot check them without a synchronisation: an id outside
// [0, n_rows) is skipped by the kernels (nothing read or written for it). unmask.ops
// checks them before the launch unless told not to.
Status sample_cuda(const SampleParams& params, const SampleCudaExtras& extras, void* stream);

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
