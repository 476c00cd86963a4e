// rms_norm: y = x / sqrt(mean(x^2) + eps) * weight over each row, in float32 arithmetic
// (docs/design.md, the model's pointwise kernels). One read of x, one write of y: the six
// torch operations it replaces each read and wrote the whole tensor.
#pragma once

#include <cmath>
#include <cstdint>

#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

struct RmsNormParams {
  const void* x;              // [rows, dim], rows x_row_stride elements apart, dim contiguous
  const void* weight;         // [dim], contiguous
  void* out;                  // [rows, dim], contiguous
  ScalarType dtype;           // of x and out
  ScalarType weight_dtype;    // float32 or dtype
  int64_t rows, dim, x_row_stride;
  float eps;
};

UNMASK_BUILD_NAMESPACE_BEGIN

inline Status check_rms_norm_params(const RmsNormParams& p) {
  const int dtype = static_cast<int>(p.dtype), weight_dtype = static_cast<int>(p.weight_dtype);
  if (dtype < 0 || dtype > 2) return invalid_argument("dtype", dtype, "must be a ScalarType");
  if (weight_dtype < 0 || weight_dtype > 2) return invalid_argument("weight_dtype", weight_dtype, "must be a ScalarType");
  if (p.rows < 0) return invalid_argument("rows", static_cast<double>(p.rows), "must be >= 0");
  if (p.dim < 1) return invalid_argument("dim", static_cast<double>(p.dim), "must be >= 1");
  if (p.x_row_stride < p.dim) return invalid_argument("x_row_stride", static_cast<double>(p.x_row_stride), "must be >= dim");
  if (!(p.eps >= 0.0f) || std::isinf(p.eps)) return invalid_argument("eps", p.eps, "must be finite and >= 0");
  if (p.rows > 0) {
    if (p.x == nullptr) return invalid_argument("x", 0, "must not be null");
    if (p.weight == nullptr) return invalid_argument("weight", 0, "must not be null");
    if (p.out == nullptr) return invalid_argument("out", 0, "must not be null");
  }
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status rms_norm_cpu(const RmsNormParams& params);

}  // namespace unmask
