// Compiled only when the build has no CUDA: the CUDA entry points report that.
#include "unmask/cuda_info.h"
#include "unmask/rng.h"

namespace unmask {

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string last_cuda_error() { return "unmask was built without CUDA"; }

Status fill_draws_cuda(const DrawParams&, void*) { return Status::kUnsupported; }

}  // namespace unmask
