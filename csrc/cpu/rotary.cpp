// rotary on the CPU (unmask/rotary.h): per (row, position, head), one head_dim vector read
// into float32, rotated against its position's cos and sin and written back in x's dtype.
// Compiled with -ffp-contract=off (CMakeLists.txt): x cos + r sin must round its two
// products and its sum separately, as torch's three operations do, for the bit-exact
// contract of the header.
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "rows.h"
#include "unmask/rotary.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace {

// As rms_norm.cpp: small calls stay on the calling thread.
constexpr int64_t kParallelElements = int64_t{1} << 16;

void rotate(const float* x, const float* cos, const float* sin, int64_t half, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) out[j] = x[j] * cos[j] + (-x[j + half]) * sin[j];
#pragma omp simd
  for (int64_t j = half; j < 2 * half; ++j) out[j] = x[j] * cos[j] + x[j - half] * sin[j];
}

}  // namespace

Status rotary(const RotaryParams& p) {
  const Status status = check_rotary_params(p);
  if (!status.ok()) return status;
  const int64_t positions = p.batch * p.length, dim = p.head_dim;
  if (positions * p.heads == 0) return ok_status();
  const bool direct = p.dtype == ScalarType::kFloat32 && p.x != p.out;
#pragma omp parallel if (positions * p.heads * dim >= kParallelElements && positions > 1)
  {
    static thread_local std::vector<float> buf;
    buf.resize(2 * dim);
    float* in = buf.data();
    float* rotated = buf.data() + dim;
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < positions; ++bi) {
      const int64_t b = bi / p.length, i = bi % p.length;
      const int64_t table = ((p.table_batch == 1 ? 0 : b) * p.length + i) * dim;
      for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t x_offset = row_offset(p.x_stride, b, i, h);
        const int64_t out_offset = row_offset(p.out_stride, b, i, h);
        // float32 rows rotate straight from x into out instead of through the row copies
        // (a call that writes over x keeps them: each row is read whole before it is written)
        if (direct) {
          rotate(static_cast<const float*>(p.x) + x_offset, p.cos + table, p.sin + table, dim / 2,
                 static_cast<float*>(p.out) + out_offset);
          continue;
        }
        load_row(p.x, p.dtype, x_offset, dim, 1.0f, in);
        rotate(in, p.cos + table, p.sin + table, dim / 2, rotated);
        store_row(p.out, p.dtype, out_offset, dim, rotated);
      }
    }
  }
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
