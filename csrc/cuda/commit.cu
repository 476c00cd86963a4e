// commit on CUDA: one block per canvas row, one launch for the batch, in place.
// Each position's rank among the eligible ones (higher confidence first, ties to the
// lower position) is counted in shared memory, O(L^2 / threads) per row: for the
// blocks a sampler commits in (32-256 positions) a few microseconds, less than a sort's
// launches; an infill row of 4096 positions is ~65k comparisons a thread (estimated
// 0.3-1 ms, not yet timed on a GPU), where a sort would win.
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_check.cuh"
#include "unmask/commit.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxLength = 4096;  // conf, eligible and rank of a row: 36 KiB of shared memory

__global__ void __launch_bounds__(kThreads) commit_kernel(CommitParams p) {
  UNMASK_DYNAMIC_SHARED(unsigned char, shared);
  float* conf = reinterpret_cast<float*>(shared);
  int* rank = reinterpret_cast<int*>(conf + p.length);
  bool* eligible = reinterpret_cast<bool*>(rank + p.length);
  UNMASK_SHARED(int, eligible_count);
  UNMASK_SHARED(int, passing_count);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.length;
  if (threadIdx.x == 0) eligible_count = passing_count = 0;
  for (int64_t j = threadIdx.x; j < p.length; j += kThreads) {
    const float c = p.conf[base + j];
    conf[j] = isnan(c) ? -INFINITY : c;  // a NaN confidence ranks as -inf
    eligible[j] = p.eligible[base + j];
  }
  __syncthreads();

  int my_eligible = 0, my_passing = 0;
  for (int64_t j = threadIdx.x; j < p.length; j += kThreads) {
    int r = 0;
    if (eligible[j]) {
      for (int64_t i = 0; i < p.length; ++i) r += eligible[i] && (conf[i] > conf[j] || (conf[i] == conf[j] && i < j));
      ++my_eligible;
      if (p.mode == CommitMode::kThreshold) my_passing += static_cast<double>(conf[j]) > p.threshold;
      // Factor: the eligible position of rank r holds c_{r+1}; the passing ranks form a prefix.
      if (p.mode == CommitMode::kFactor) my_passing += (r + 2) * (1.0 - static_cast<double>(conf[j])) < p.factor;
    }
    rank[j] = r;
  }
  atomicAdd(&eligible_count, my_eligible);
  atomicAdd(&passing_count, my_passing);
  __syncthreads();

  // At least min(floor, eligible): count mode commits exactly that; the others at least
  // one, or threshold mode's given floor (commit.h).
  const bool has_floor = p.mode == CommitMode::kCount || (p.mode == CommitMode::kThreshold && p.k != nullptr);
  const int64_t floor = has_floor ? (p.k[blockIdx.x] > 0 ? p.k[blockIdx.x] : 0) : 1;
  int64_t n = floor < eligible_count ? floor : eligible_count;
  if (p.mode != CommitMode::kCount && passing_count > n) n = passing_count;
  for (int64_t j = threadIdx.x; j < p.length; j += kThreads) {
    const bool commit = eligible[j] && rank[j] < n;
    p.committed[base + j] = commit;
    if (commit) p.canvas[base + j] = p.tokens[base + j];
  }
}

}  // namespace

Status commit_cuda(const CommitParams& p, void* stream) {
  const Status status = check_commit_params(p);
  if (!status.ok()) return status;
  if (p.conf_f64 != nullptr) return unsupported("conf_f64", 0, "float64 confidences: the CUDA kernel ranks float32");
  if (p.length > kMaxLength) return unsupported("length", static_cast<double>(p.length), "must be <= 4096 on CUDA");
  if (p.batch > INT32_MAX) return unsupported("batch", static_cast<double>(p.batch), "must be < 2^31 on CUDA");
  if (p.batch == 0 || p.length == 0) return ok_status();
  const size_t shared = static_cast<size_t>(p.length) * (sizeof(float) + sizeof(int) + sizeof(bool));
  launch_kernel("commit_kernel", commit_kernel, dim3(static_cast<unsigned>(p.batch)), dim3(kThreads), shared,
                static_cast<cudaStream_t>(stream), p);
  return check_launch();
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
