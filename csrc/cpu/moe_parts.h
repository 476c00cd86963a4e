// What moe.cpp (the vector units' products) and moe_amx.cpp (the AMX build's bfloat16
// products on tiles) share: the pairs sorted by expert, the work items, the final
// weighted sum and the buffers' size rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "amx_tiles.h"
#include "isa.h"
#include "unmask/moe.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace moe_detail {

// A call of fewer multiply-adds runs on the calling thread (waking the team costs a few
// microseconds).
constexpr int64_t kParallelMacs = int64_t{1} << 20;
// A buffer kept from call to call (a decoding step's calls have one size) but not past
// this (a long prompt's first call would otherwise hold hundreds of MB for the rest of the
// process).
constexpr std::size_t kKeptBufferBytes = std::size_t{64} << 20;

// A buffer kept by the calling thread, without std::vector's zero fill: the kernels write
// every element they read (at a long prompt's call the fill was ~10% of the time).
template <typename T>
class Scratch {
 public:
  T* take(int64_t count) {
    const auto n = static_cast<std::size_t>(count);
    if (n > capacity_) {
      data_.reset();
      data_.reset(new T[n]);
      capacity_ = n;
    }
    return data_.get();
  }
  void release_if_large() {
    if (capacity_ * sizeof(T) > kKeptBufferBytes) {
      data_.reset();
      capacity_ = 0;
    }
  }

 private:
  std::unique_ptr<T[]> data_;
  std::size_t capacity_ = 0;
};

// The pairs sorted by expert: slot s holds pair pair_of_slot[s] (t * per_token + j),
// expert e's slots are [first_slot[e], first_slot[e + 1]), pairs in their order.
struct Slots {
  std::vector<int64_t> first_slot, pair_of_slot, slot_of_pair;
};

// One work item: rows [row_begin, row_end) of one expert's weight matrices.
struct Item {
  int64_t expert, row_begin, row_end;
};

inline std::vector<Item> items_of(const Slots& slots, int64_t n_experts, int64_t rows, int64_t rows_per_item) {
  std::vector<Item> items;
  for (int64_t e = 0; e < n_experts; ++e) {
    if (slots.first_slot[e] == slots.first_slot[e + 1]) continue;  // no token chose it: not read
    for (int64_t r = 0; r < rows; r += rows_per_item) items.push_back({e, r, std::min(rows, r + rows_per_item)});
  }
  return items;
}

// silu(g) * u, a hidden activation from its gate and up sums, with e^-g as vec_math.h's
// polynomial 2^z (1.8e-7 relative), which `omp simd` loops vectorise: std::exp, a call a
// value, was a quarter of the AMX kernel's time at a long prompt's call. Past z = 127
// (g below -88) e^-g is inf, so silu is -0, and a NaN stays NaN, as with std::exp.
inline float swiglu(float g, float u) {
  const float z = -g * kLog2e;
  const float e = z < 127.0f ? exp2_poly(z) : std::numeric_limits<float>::infinity();
  return g / (1.0f + e) * u;
}

// out[t] = sum over j of weights[t, j] * routed[slot of (t, j)], in j order.
inline void weighted_sum(const MoeParams& p, const Slots& slots, const float* routed, int64_t t) {
  float* o = p.out + t * p.dim;
  for (int64_t j = 0; j < p.per_token; ++j) {
    const int64_t q = t * p.per_token + j;
    const float weight = p.weights[q];
    const float* y = routed + slots.slot_of_pair[q] * p.dim;
    if (j == 0) {
#pragma omp simd
      for (int64_t i = 0; i < p.dim; ++i) o[i] = weight * y[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < p.dim; ++i) o[i] += weight * y[i];
    }
  }
}

#if defined(UNMASK_AMX)  // amx_tiles.h
// The whole call for bfloat16 x and weights on AMX tiles, into p.out (moe_amx.cpp);
// hidden and routed as moe.cpp's: float32 [slots, hidden] and [slots, dim].
void moe_swiglu_bf16_amx(const MoeParams& p, const Slots& slots, float* hidden, float* routed);
#endif

}  // namespace moe_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
