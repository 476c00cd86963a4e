// The CUDA moe_swiglu launcher: MoeParams plus a workspace and a stream.
#pragma once

#include <cstdint>

#include "unmask/isa_namespace.h"
#include "unmask/moe.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // the interpreter's build of the launcher is unmask::simt::moe_swiglu_cuda

// Device bytes the launch for these params needs as workspace: the routing tables, each
// pair's float32 hidden activations and each pair's float32 expert output.
int64_t moe_swiglu_cuda_workspace_bytes(const MoeParams& params);

// bfloat16 x and weights (anything else is unsupported), at most 1024 experts. No host
// synchronisation and no host read of the expert ids, so a model calling it can be
// captured as a CUDA graph: a token with an id outside [0, n_experts) gets NaN outputs.
Status moe_swiglu_cuda(const MoeParams& params, void* workspace, int64_t workspace_bytes, void* stream);

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
