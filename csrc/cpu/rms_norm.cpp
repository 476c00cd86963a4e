// rms_norm on the CPU (unmask/rms_norm.h): each row read once into a float32 buffer that
// stays in L1, its sum of squares, then scaled, weighted and written in x's dtype. Rows
// are independent and each is computed the same way whatever else is in the call, so a
// row's result does not depend on its batch companions.
#include <cmath>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "rows.h"
#include "unmask/rms_norm.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace {

// A call of fewer elements runs on the calling thread: waking the OpenMP team costs a few
// microseconds, more than a decoding step's [tokens, d_model] of a small model takes.
constexpr int64_t kParallelElements = int64_t{1} << 16;

void norm_row(const RmsNormParams& p, const float* weight, int64_t row, float* buf) {
  load_row(p.x, p.dtype, row * p.x_row_stride, p.dim, 1.0f, buf);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < p.dim; ++i) sum += buf[i] * buf[i];
  // The mean as torch takes it (the sum times 1 / dim), then 1 / sqrt, both correctly
  // rounded, as torch.rsqrt is.
  const float inv = 1.0f / std::sqrt(sum * (1.0f / static_cast<float>(p.dim)) + p.eps);
#pragma omp simd
  for (int64_t i = 0; i < p.dim; ++i) buf[i] = (buf[i] * inv) * weight[i];
  store_row(p.out, p.dtype, row * p.dim, p.dim, buf);
}

}  // namespace

Status rms_norm(const RmsNormParams& p) {
  const Status status = check_rms_norm_params(p);
  if (!status.ok()) return status;
  if (p.rows == 0) return ok_status();
  static thread_local std::vector<float> weight;  // the weight as float32, once per call
  weight.resize(p.dim);
  load_row(p.weight, p.weight_dtype, 0, p.dim, 1.0f, weight.data());
  const float* w = weight.data();
#pragma omp parallel if (p.rows * p.dim >= kParallelElements && p.rows > 1)
  {
    static thread_local std::vector<float> buf;
    buf.resize(p.dim);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < p.rows; ++row) norm_row(p, w, row, buf.data());
  }
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
