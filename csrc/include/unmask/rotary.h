// rotary: rotary position embeddings in the rotate-half form (docs/design.md, the model's
// pointwise kernels): out[j] = x[j] cos[j] - x[j + D/2] sin[j] for j < D/2 and
// x[j] cos[j] + x[j - D/2] sin[j] above, in float32 with each product and the sum
// rounded as torch's separate operations round them (no fused multiply-add), so the
// result is the reference's to the bit.
#pragma once

#include <cstdint>

#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

struct RotaryParams {
  const void* x;            // [batch, length, heads, head_dim], head_dim contiguous
  void* out;                // like x
  ScalarType dtype;         // of x and out
  int64_t batch, length, heads, head_dim;
  int64_t x_stride[3], out_stride[3];  // elements per (batch, position, head) step
  const float* cos;         // [table_batch, length, head_dim], contiguous float32
  const float* sin;
  int64_t table_batch;      // 1 (shared by every row) or batch
};

UNMASK_BUILD_NAMESPACE_BEGIN

inline Status check_rotary_params(const RotaryParams& p) {
  const int dtype = static_cast<int>(p.dtype);
  if (dtype < 0 || dtype > 2) return invalid_argument("dtype", dtype, "must be a ScalarType");
  if (p.batch < 0) return invalid_argument("batch", static_cast<double>(p.batch), "must be >= 0");
  if (p.length < 0) return invalid_argument("length", static_cast<double>(p.length), "must be >= 0");
  if (p.heads < 0) return invalid_argument("heads", static_cast<double>(p.heads), "must be >= 0");
  if (p.head_dim < 2 || p.head_dim % 2 != 0) {
    return invalid_argument("head_dim", static_cast<double>(p.head_dim), "must be even and >= 2");
  }
  if (p.table_batch != 1 && p.table_batch != p.batch) {
    return invalid_argument("table_batch", static_cast<double>(p.table_batch), "must be 1 or batch");
  }
  if (p.batch * p.length * p.heads > 0) {
    if (p.x == nullptr) return invalid_argument("x", 0, "must not be null");
    if (p.out == nullptr) return invalid_argument("out", 0, "must not be null");
    if (p.cos == nullptr) return invalid_argument("cos", 0, "must not be null");
    if (p.sin == nullptr) return invalid_argument("sin", 0, "must not be null");
  }
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status rotary_cpu(const RotaryParams& params);

}  // namespace unmask
