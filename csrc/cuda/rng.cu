#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "unmask/rng.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh

namespace {
// One thread per quad of columns: one Philox call, up to four stores.
__global__ void fill_draws_kernel(DrawParams p) {
  const int64_t quads_per_row = (p.cols + 3) / 4;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= p.rows * quads_per_row) return;
  const int64_t r = index / quads_per_row;
  const int64_t quad = index % quads_per_row;
  const Philox4x32 block = unmask_draw_quad(p.seed, static_cast<uint32_t>(quad),
                                            static_cast<uint32_t>(p.row_begin + r), p.offset,
                                            p.stream);
  uint32_t* out_row = p.out + r * p.cols;
  for (int word = 0; word < 4 && quad * 4 + word < p.cols; ++word) {
    out_row[quad * 4 + word] = block.v[word];
  }
}
}  // namespace

Status fill_draws_cuda(const DrawParams& p, void* stream) {
  const Status status = check_draw_params(p);
  if (!status.ok()) return status;
  const int64_t work = p.rows * ((p.cols + 3) / 4);
  if (work == 0) return ok_status();
  constexpr int kThreads = 256;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  launch_kernel("fill_draws_kernel", fill_draws_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                static_cast<cudaStream_t>(stream), p);
  return check_launch();
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
