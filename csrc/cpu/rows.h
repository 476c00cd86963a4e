// Rows of float32, float16 or bfloat16 elements, read into and written from float32
// buffers: how every CPU kernel of one instruction-set build meets the dtypes torch hands
// it (the conversions round to nearest even, as torch's own casts do).
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"
#include "unmask/types.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

// The offset in elements of row (b, position, head) of a [B, L, H, D] tensor whose
// strides for its first three dimensions are `stride` (D contiguous).
inline int64_t row_offset(const int64_t (&stride)[3], int64_t b, int64_t position, int64_t head) {
  return b * stride[0] + position * stride[1] + head * stride[2];
}

// n elements from base + offset (in elements) of dtype, times scale, into out.
inline void load_row(const void* base, ScalarType dtype, int64_t offset, int64_t n, float scale, float* out) {
  if (dtype == ScalarType::kFloat32) {
    const float* src = static_cast<const float*>(base) + offset;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = src[i] * scale;
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  if (dtype == ScalarType::kBFloat16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = cpu::bf16_to_float(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = cpu::fp16_to_float(src[i]) * scale;
  }
}

inline void store_row(void* base, ScalarType dtype, int64_t offset, int64_t n, const float* values) {
  switch (dtype) {
    case ScalarType::kFloat32: std::memcpy(static_cast<float*>(base) + offset, values, n * sizeof(float)); return;
    case ScalarType::kFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(base)[offset + i] = cpu::float_to_fp16(values[i]);
      return;
    case ScalarType::kBFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(base)[offset + i] = cpu::float_to_bf16(values[i]);
      return;
  }
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
