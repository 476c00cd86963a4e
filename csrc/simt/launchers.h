// The launchers of csrc/cuda as the SIMT interpreter builds them (launchers.cpp): the same
// params structs with host pointers, run inside a simt::Session. Without the interpreter
// (no_simt.cpp) they report that it is not built.
#pragma once

#include <cstdint>
#include <string>

#include "unmask/attention.h"
#include "unmask/commit.h"
#include "unmask/moe.h"
#include "unmask/rng.h"
#include "unmask/sample.h"
#include "unmask/sample_cuda.h"

namespace simt {

bool available();

unmask::Status sample_cuda(const unmask::SampleParams& params, const unmask::SampleCudaExtras& extras);
int64_t sample_cuda_workspace_bytes(const unmask::SampleParams& params);
unmask::Status commit_cuda(const unmask::CommitParams& params);
unmask::Status attention_cuda(const unmask::AttentionParams& params, void* workspace, int64_t workspace_bytes);
int64_t attention_cuda_workspace_bytes(const unmask::AttentionParams& params);
unmask::Status moe_swiglu_cuda(const unmask::MoeParams& params, void* workspace, int64_t workspace_bytes);
int64_t moe_swiglu_cuda_workspace_bytes(const unmask::MoeParams& params);
unmask::Status fill_draws_cuda(const unmask::DrawParams& params);

// The runtime's own test kernels (test_kernels.cpp): `name` picks one; `data` and `out` are
// its input and output buffers.
unmask::Status test_kernel(const std::string& name, void* data, int64_t data_bytes, void* out, int64_t out_bytes);

}  // namespace simt
