// What the CUDA part of the build can see. Defined in csrc/cuda/ when nvcc built it,
// and in csrc/cpu/no_cuda.cpp otherwise, so the binding never needs #ifdefs.
#pragma once

#include <string>

#include "unmask/isa_namespace.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // unmask::simt:: in the interpreter's build

bool cuda_compiled();
// Devices visible to the CUDA runtime; any runtime error (no driver, error 35 on a
// machine without a GPU) counts as zero devices.
int cuda_device_count();
// The message of the last CUDA error a launcher saw on this thread ("" if none).
std::string last_cuda_error();

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
