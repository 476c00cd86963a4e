// Raw Philox draws as a kernel: used to test the header against rng.py bit for bit
// and to let Python code draw the same noise as the fused kernels.
#pragma once

#include <cstdint>

#include "unmask/philox.h"
#include "unmask/status.h"

namespace unmask {

// out[r * cols + c] = draw(seed, col = c, row = row_begin + r, offset, stream).
struct DrawParams {
  uint32_t* out;
  int64_t rows;
  int64_t cols;
  int64_t row_begin;
  uint64_t seed;
  uint32_t offset;
  RngStream stream;
};

// counters: n blocks of 4 words; out: n blocks of 4 words (the plain generator,
// for known-answer tests).
struct PhiloxBlockParams {
  const uint32_t* counters;
  uint32_t* out;
  int64_t n;
  uint32_t key0;
  uint32_t key1;
};

UNMASK_BUILD_NAMESPACE_BEGIN

inline Status check_draw_params(const DrawParams& p) {
  if (p.rows < 0) return invalid_argument("rows", static_cast<double>(p.rows), "must be >= 0");
  if (p.cols < 0) return invalid_argument("cols", static_cast<double>(p.cols), "must be >= 0");
  if (p.rows * p.cols > 0 && p.out == nullptr) return invalid_argument("out", 0, "must not be null");
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status fill_draws_cpu(const DrawParams& params);
Status philox_blocks_cpu(const PhiloxBlockParams& params);

UNMASK_BUILD_NAMESPACE_BEGIN
// stream is a cudaStream_t passed as void* so this header needs no CUDA include.
Status fill_draws_cuda(const DrawParams& params, void* stream);
UNMASK_BUILD_NAMESPACE_END

}  // namespace unmask
