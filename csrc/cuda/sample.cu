// sample on CUDA: logits read once from HBM with 16-byte loads, one fused pass.
//
// Phase 1 (sample_partial_kernel): grid (splits, rows). Each block streams one segment
// of one row; each thread keeps a running record (max and first argmax, online softmax
// sums under conf_temperature, runner-up, best Gumbel score, NaN/+inf flag) and the
// block merges them with warp shuffles into one record per (row, split). With few rows
// (32 rows of V = 126464: one block of one sequence) the row is split across enough
// blocks to fill every SM. Phase 2 (sample_finish_kernel): one thread per row merges
// its splits' records and writes token and confidence. No host synchronisation: the
// seed and offset may live in device memory, so a sampler step can be captured in a
// CUDA graph.
//
// The Gumbel noise is computed as the reference does, in float64 from the exact
// uniform, and only for ids that can still win: no draw exceeds kGumbelMax, so an id
// with x / T + kGumbelMax <= the thread's best score is skipped without a Philox call.
// top_k / top_p are not fused here (the op falls back to the reference for them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "cuda_check.cuh"
#include "unmask/philox.h"
#include "unmask/sample.h"
#include "unmask/sample_cuda.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh
namespace {

constexpr int kThreads = 256;
constexpr double kGumbelMax = 17.5;  // > -log(-log(1 - 2^-25)) = 17.33
constexpr int64_t kMinSegment = 4096;  // below this a split costs more in merging than it saves
// Exponents z = (x - max) / conf_temperature below this are clamped to it: e^-87 is still
// a normal float, so e * z stays finite (for a logit near -FLT_MAX, z was -inf, e = 0 and
// e * z NaN, which made entropy confidences NaN) and the term is below 2^-125 of the
// maximum's, as the CPU kernel's clamp at 2^-126 leaves it.
constexpr float kMinExponent = -87.0f;

struct Record {
  float max;        // running max of the logits (NaN excluded)
  int arg;          // first id holding it
  float sum;        // sum of exp((x - max) / conf_temperature)
  float weighted;   // sum of e * z (entropy)
  float runner;     // largest logit other than the first argmax
  double best;      // best Gumbel score x / T + g
  int best_id;
  float best_x;     // logit of best_id
  int bad;          // a NaN or +inf logit outside the banned ids
};

__device__ __forceinline__ Record empty_record() {
  return Record{-INFINITY, INT32_MAX, 0.0f, 0.0f, -INFINITY, -INFINITY, INT32_MAX, -INFINITY, 0};
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ double gumbel_of(uint64_t seed, uint32_t col, uint32_t row, uint32_t offset) {
  const double u = uniform_from_draw(unmask_draw(seed, col, row, offset, RngStream::kGumbel));
  return -log(-log(u));
}

// Merge b into a. a and b may cover interleaved ids, so ties on the max and on the
// best score go to the lower id explicitly.
__device__ __forceinline__ void merge(Record& a, const Record& b, float inv_t) {
  const bool b_first = b.max > a.max || (b.max == a.max && b.arg < a.arg);
  const float new_max = fmaxf(a.max, b.max);
  if (new_max > -INFINITY) {
    const float shift_a = a.max > -INFINITY ? fmaxf((a.max - new_max) * inv_t, kMinExponent) : 0.0f;
    const float shift_b = b.max > -INFINITY ? fmaxf((b.max - new_max) * inv_t, kMinExponent) : 0.0f;
    const float scale_a = a.max > -INFINITY ? __expf(shift_a) : 0.0f;
    const float scale_b = b.max > -INFINITY ? __expf(shift_b) : 0.0f;
    a.weighted = scale_a * (a.weighted + shift_a * a.sum) + scale_b * (b.weighted + shift_b * b.sum);
    a.sum = a.sum * scale_a + b.sum * scale_b;
  }
  a.runner = b_first ? fmaxf(b.runner, a.max) : fmaxf(a.runner, b.max);
  if (b_first) {
    a.max = b.max;
    a.arg = b.arg;
  }
  if (b.best > a.best || (b.best == a.best && b.best_id < a.best_id)) {
    a.best = b.best;
    a.best_id = b.best_id;
    a.best_x = b.best_x;
  }
  a.bad |= b.bad;
}

__device__ __forceinline__ Record shuffle_down(const Record& r, int delta) {
  Record o;
  o.max = __shfl_down_sync(0xFFFFFFFFu, r.max, delta);
  o.arg = __shfl_down_sync(0xFFFFFFFFu, r.arg, delta);
  o.sum = __shfl_down_sync(0xFFFFFFFFu, r.sum, delta);
  o.weighted = __shfl_down_sync(0xFFFFFFFFu, r.weighted, delta);
  o.runner = __shfl_down_sync(0xFFFFFFFFu, r.runner, delta);
  o.best = __shfl_down_sync(0xFFFFFFFFu, r.best, delta);
  o.best_id = __shfl_down_sync(0xFFFFFFFFu, r.best_id, delta);
  o.best_x = __shfl_down_sync(0xFFFFFFFFu, r.best_x, delta);
  o.bad = __shfl_down_sync(0xFFFFFFFFu, r.bad, delta);
  return o;
}

struct RowContext {
  uint64_t seed;
  uint32_t offset;
  uint32_t row;
  float inv_t;
  double temperature;
};

// Fold one logit into a thread's record. Ids arrive in increasing order per thread,
// so a strict comparison keeps the first maximum.
__device__ __forceinline__ void consume(Record& r, float x, int col, const RowContext& ctx, const int64_t* banned,
                                        int n_banned) {
  for (int i = 0; i < n_banned; ++i) {
    if (banned[i] == col) return;  // banned: -inf, contributes nothing
  }
  if (!(x < INFINITY)) {  // NaN or +inf
    r.bad = 1;
    return;
  }
  if (x == -INFINITY) return;
  if (x > r.max) {
    if (r.max > -INFINITY) {
      const float shift = fmaxf((r.max - x) * ctx.inv_t, kMinExponent);
      const float scale = __expf(shift);
      r.weighted = scale * (r.weighted + shift * r.sum);
      r.sum *= scale;
      r.runner = r.max;
    }
    r.max = x;
    r.arg = col;
    r.sum += 1.0f;
  } else {
    const float z = fmaxf((x - r.max) * ctx.inv_t, kMinExponent);
    const float e = __expf(z);
    r.sum += e;
    r.weighted += e * z;
    r.runner = fmaxf(r.runner, x);
  }
  if (ctx.temperature > 0.0) {
    const double scaled = static_cast<double>(x) / ctx.temperature;
    if (scaled + kGumbelMax > r.best) {
      const double score = scaled + gumbel_of(ctx.seed, static_cast<uint32_t>(col), ctx.row, ctx.offset);
      if (score > r.best) {
        r.best = score;
        r.best_id = col;
        r.best_x = x;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_partial_kernel(SampleParams p, SampleCudaExtras extras) {
  const int split = blockIdx.x;
  const int64_t index = extras.row_base + blockIdx.y;  // blockIdx.y counts rows within this launch
  const int64_t row = p.select_rows ? p.rows[index] : index;
  if (row < 0 || row >= p.n_rows) return;  // a bad row id (sample_cuda.h): the whole block skips it
  // Segments are whole 16-byte vectors (8 elements covers every dtype), so when a row
  // starts 16-byte aligned every block's segment does too.
  const int64_t segment = ((p.vocab + gridDim.x - 1) / gridDim.x + 7) / 8 * 8;
  const int64_t begin = split * segment < p.vocab ? split * segment : p.vocab;
  const int64_t end = begin + segment < p.vocab ? begin + segment : p.vocab;
  RowContext ctx;
  ctx.seed = p.seed;
  ctx.offset = row_offset(p, row);
  ctx.row = static_cast<uint32_t>(row);
  ctx.inv_t = static_cast<float>(1.0 / p.conf_temperature);
  ctx.temperature = p.temperature;
  const T* logits = static_cast<const T*>(p.logits) + row * p.vocab;
  const int n_banned = static_cast<int>(p.n_banned);

  Record r = empty_record();
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const bool aligned = (reinterpret_cast<uintptr_t>(logits + begin) % 16 == 0);
  int64_t i = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t v = begin + static_cast<int64_t>(threadIdx.x) * kVec; v < vec_end; v += kThreads * kVec) {
      const uint4 packed = *reinterpret_cast<const uint4*>(logits + v);
      const T* values = reinterpret_cast<const T*>(&packed);
#pragma unroll
      for (int e = 0; e < kVec; ++e) consume(r, to_float(values[e]), static_cast<int>(v + e), ctx, p.banned, n_banned);
    }
    i = vec_end;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += kThreads) {
    consume(r, to_float(logits[j]), static_cast<int>(j), ctx, p.banned, n_banned);
  }

  // Block reduction: warps by shuffles, then the warp leaders through shared memory.
  UNMASK_SHARED_ARRAY(Record, warp_records, kThreads / 32);
  for (int delta = 16; delta > 0; delta /= 2) {
    const Record other = shuffle_down(r, delta);
    merge(r, other, ctx.inv_t);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_records[warp] = r;
  __syncthreads();
  if (warp == 0) {
    r = lane < kThreads / 32 ? warp_records[lane] : empty_record();
    for (int delta = 16; delta > 0; delta /= 2) {
      const Record other = shuffle_down(r, delta);
      merge(r, other, ctx.inv_t);
    }
    if (lane == 0) static_cast<Record*>(extras.workspace)[blockIdx.y * gridDim.x + split] = r;
  }
}

__global__ void sample_finish_kernel(SampleParams p, SampleCudaExtras extras, int splits, int64_t count) {
  const int64_t local = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (local >= count) return;
  const int64_t index = extras.row_base + local;
  const int64_t row = p.select_rows ? p.rows[index] : index;
  if (row < 0 || row >= p.n_rows) return;
  const float inv_t = static_cast<float>(1.0 / p.conf_temperature);
  const Record* records = static_cast<const Record*>(extras.workspace) + local * splits;
  Record r = records[0];
  for (int s = 1; s < splits; ++s) merge(r, records[s], inv_t);
  if (r.bad || !(r.max > -INFINITY)) {
    p.tokens[row] = -1;
    p.conf[row] = -INFINITY;
    return;
  }
  const bool sampled = p.temperature > 0.0;
  const int token = sampled ? r.best_id : r.arg;
  const float token_x = sampled ? r.best_x : r.max;
  double conf;
  switch (p.confidence) {
    case ConfidenceKind::kProb: conf = exp((static_cast<double>(token_x) - r.max) * inv_t) / r.sum; break;
    case ConfidenceKind::kMargin:
      conf = (1.0 - (r.runner > -INFINITY ? exp((static_cast<double>(r.runner) - r.max) * inv_t) : 0.0)) / r.sum;
      break;
    case ConfidenceKind::kEntropy: conf = static_cast<double>(r.weighted) / r.sum - log(static_cast<double>(r.sum)); break;
    default: {
      conf = uniform_from_draw(unmask_draw(p.seed, 0, static_cast<uint32_t>(row), row_offset(p, row),
                                           RngStream::kRandomConfidence));
    }
  }
  p.tokens[row] = token;
  p.conf[row] = static_cast<float>(conf);
}

__global__ void fill_unsampled_kernel(int64_t* tokens, float* conf, int64_t n_rows) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < n_rows) {
    tokens[index] = -1;
    conf[index] = -INFINITY;
  }
}

}  // namespace

int sample_cuda_splits(int64_t rows, int64_t vocab) {
  if (rows <= 0) return 1;
  // Enough blocks for two waves over the SMs, but no segment shorter than kMinSegment.
  const int64_t wanted = (2 * static_cast<int64_t>(sm_count()) + rows - 1) / rows;
  const int64_t most = (vocab + kMinSegment - 1) / kMinSegment;
  const int64_t splits = wanted < most ? wanted : most;
  return static_cast<int>(splits < 1 ? 1 : (splits > 1024 ? 1024 : splits));
}

namespace {
int64_t sampled_rows(const SampleParams& p) { return p.select_rows ? p.n_selected : p.n_rows; }
}  // namespace

int64_t sample_cuda_workspace_bytes(const SampleParams& p) {
  const int64_t work = sampled_rows(p);
  if (work <= 0 || p.vocab < 1) return 0;
  return work * sample_cuda_splits(work, p.vocab) * static_cast<int64_t>(sizeof(Record));
}

Status sample_cuda(const SampleParams& p, const SampleCudaExtras& extras, void* stream_handle) {
  const Status status = check_sample_params(p);
  if (!status.ok()) return status;
  if (p.top_k != 0) return unsupported("top_k", static_cast<double>(p.top_k), "must be 0 on CUDA (not fused yet)");
  if (p.top_p < 1.0) return unsupported("top_p", p.top_p, "must be 1 on CUDA (not fused yet)");
  if (p.vocab > INT32_MAX) return unsupported("vocab", static_cast<double>(p.vocab), "must be < 2^31 on CUDA");
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t work = sampled_rows(p);
  if (p.select_rows && p.n_rows > 0) {
    launch_kernel("fill_unsampled_kernel", fill_unsampled_kernel, dim3(static_cast<unsigned>((p.n_rows + 255) / 256)),
                  dim3(256), 0, stream, p.tokens, p.conf, p.n_rows);
  }
  if (work == 0) return check_launch();
  const int splits = sample_cuda_splits(work, p.vocab);
  if (extras.workspace_bytes < work * splits * static_cast<int64_t>(sizeof(Record))) {
    return invalid_argument("workspace_bytes", static_cast<double>(extras.workspace_bytes),
                            "must be at least sample_cuda_workspace_bytes(params)");
  }
  if (extras.workspace == nullptr) return invalid_argument("workspace", 0, "must not be null");
  // grid.y is limited to 65535: launch in chunks of rows.
  for (int64_t first = 0; first < work; first += 65535) {
    const int64_t count = work - first < 65535 ? work - first : 65535;
    SampleCudaExtras chunk = extras;
    chunk.row_base = first;
    chunk.workspace = static_cast<Record*>(extras.workspace) + first * splits;
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(count));
    switch (p.dtype) {
      case ScalarType::kFloat32:
        launch_kernel("sample_partial_kernel<float>", sample_partial_kernel<float>, grid, dim3(kThreads), 0, stream, p,
                      chunk);
        break;
      case ScalarType::kFloat16:
        launch_kernel("sample_partial_kernel<half>", sample_partial_kernel<__half>, grid, dim3(kThreads), 0, stream, p,
                      chunk);
        break;
      case ScalarType::kBFloat16:
        launch_kernel("sample_partial_kernel<bfloat16>", sample_partial_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0,
                      stream, p, chunk);
        break;
    }
    const Status launched = check_launch();
    if (!launched.ok()) return launched;
    launch_kernel("sample_finish_kernel", sample_finish_kernel, dim3(static_cast<unsigned>((count + 127) / 128)),
                  dim3(128), 0, stream, p, chunk, splits, count);
  }
  return check_launch();
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
