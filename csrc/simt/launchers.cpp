// The interpreter's build of the CUDA launchers, reachable from the binding (which sees
// only the real ones under their plain names): compiled with UNMASK_SIMT, where the
// headers put them in unmask::simt. Also the CUDA-info functions of that build.
#include "simt/launchers.h"

#include "cuda/cuda_check.cuh"
#include "unmask/attention_cuda.h"
#include "unmask/cuda_info.h"
#include "unmask/moe_cuda.h"

namespace unmask {
inline namespace simt {

void record_cuda_error(cudaError_t) {}  // the session keeps the message of a failed launch
int sm_count() { return ::simt::sm_count(); }
bool cuda_compiled() { return true; }
int cuda_device_count() { return 1; }
std::string last_cuda_error() { return ::simt::last_error(); }

}  // namespace simt
}  // namespace unmask

namespace simt {

bool available() { return true; }

unmask::Status sample_cuda(const unmask::SampleParams& params, const unmask::SampleCudaExtras& extras) {
  return ::unmask::simt::sample_cuda(params, extras, nullptr);
}

int64_t sample_cuda_workspace_bytes(const unmask::SampleParams& params) {
  return ::unmask::simt::sample_cuda_workspace_bytes(params);
}

unmask::Status commit_cuda(const unmask::CommitParams& params) { return ::unmask::simt::commit_cuda(params, nullptr); }

unmask::Status attention_cuda(const unmask::AttentionParams& params, void* workspace, int64_t workspace_bytes) {
  return ::unmask::simt::attention_cuda(params, workspace, workspace_bytes, nullptr);
}

int64_t attention_cuda_workspace_bytes(const unmask::AttentionParams& params) {
  return ::unmask::simt::attention_cuda_workspace_bytes(params);
}

unmask::Status moe_swiglu_cuda(const unmask::MoeParams& params, void* workspace, int64_t workspace_bytes) {
  return ::unmask::simt::moe_swiglu_cuda(params, workspace, workspace_bytes, nullptr);
}

int64_t moe_swiglu_cuda_workspace_bytes(const unmask::MoeParams& params) {
  return ::unmask::simt::moe_swiglu_cuda_workspace_bytes(params);
}

unmask::Status fill_draws_cuda(const unmask::DrawParams& params) { return ::unmask::simt::fill_draws_cuda(params, nullptr); }

}  // namespace simt
