// The CUDA attention launcher: AttentionParams plus a workspace and a stream.
#pragma once

#include <cstdint>

#include "unmask/attention.h"
#include "unmask/isa_namespace.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // the interpreter's build of the launcher is unmask::simt::attention_cuda

// Device bytes the launch for these params needs as workspace: 0 unless the keys are
// split across thread blocks (short query blocks against long caches), then the
// partial outputs of every split. Depends on the current device's SM count.
int64_t attention_cuda_workspace_bytes(const AttentionParams& params);

// float16 and bfloat16 with head_dim 64 or 128; anything else is unsupported.
// Every pointer must be 16-byte aligned and every stride a multiple of 8 elements
// (an invalid argument otherwise). No host synchronisation.
Status attention_cuda(const AttentionParams& params, void* workspace, int64_t workspace_bytes, void* stream);

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
