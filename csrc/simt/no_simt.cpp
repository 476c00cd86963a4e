// Compiled where the SIMT interpreter is not (it needs GCC on x86-64 Linux): its entry
// points report that, so the binding needs no #ifdef.
#include "simt/launchers.h"
#include "simt/runtime.h"

namespace simt {
namespace {
unmask::Status not_built() {
  return unmask::unsupported("device", 0, "needs the SIMT interpreter, built only with GCC on x86-64 Linux");
}
}  // namespace

Session::Session(std::vector<Buffer>) {}
Session::~Session() = default;
bool Session::failed() const { return false; }
std::string Session::error() const { return ""; }
void set_sm_count(int) {}
int sm_count() { return 1; }
Stats stats() { return Stats{}; }
void reset_stats() {}
std::string last_error() { return ""; }

bool available() { return false; }
unmask::Status sample_cuda(const unmask::SampleParams&, const unmask::SampleCudaExtras&) { return not_built(); }
int64_t sample_cuda_workspace_bytes(const unmask::SampleParams&) { return 0; }
unmask::Status commit_cuda(const unmask::CommitParams&) { return not_built(); }
unmask::Status attention_cuda(const unmask::AttentionParams&, void*, int64_t) { return not_built(); }
int64_t attention_cuda_workspace_bytes(const unmask::AttentionParams&) { return 0; }
unmask::Status moe_swiglu_cuda(const unmask::MoeParams&, void*, int64_t) { return not_built(); }
int64_t moe_swiglu_cuda_workspace_bytes(const unmask::MoeParams&) { return 0; }
unmask::Status fill_draws_cuda(const unmask::DrawParams&) { return not_built(); }
unmask::Status test_kernel(const std::string&, void*, int64_t, void*, int64_t) { return not_built(); }

}  // namespace simt
