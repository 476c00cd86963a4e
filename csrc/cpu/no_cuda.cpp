// Compiled only when the build has no CUDA: the CUDA entry points report that.
#include "unmask/attention_cuda.h"
#include "unmask/commit.h"
#include "unmask/cuda_info.h"
#include "unmask/moe_cuda.h"
#include "unmask/rng.h"
#include "unmask/sample_cuda.h"

namespace unmask {

namespace {
Status not_built() { return unsupported("device", 0, "needs CUDA kernels: this build has none"); }
}  // namespace

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string last_cuda_error() { return "unmask was built without CUDA"; }

Status fill_draws_cuda(const DrawParams&, void*) { return not_built(); }
Status sample_cuda(const SampleParams&, const SampleCudaExtras&, void*) { return not_built(); }
Status commit_cuda(const CommitParams&, void*) { return not_built(); }
int sample_cuda_splits(int64_t, int64_t) { return 1; }
int64_t sample_cuda_workspace_bytes(const SampleParams&) { return 0; }
Status attention_cuda(const AttentionParams&, void*, int64_t, void*) { return not_built(); }
int64_t attention_cuda_workspace_bytes(const AttentionParams&) { return 0; }
Status moe_swiglu_cuda(const MoeParams&, void*, int64_t, void*) { return not_built(); }
int64_t moe_swiglu_cuda_workspace_bytes(const MoeParams&) { return 0; }

}  // namespace unmask
