// moe_swiglu on the CPU (unmask/moe.h). The (token, choice) pairs are sorted by expert
// (a counting sort, which also checks the ids); each expert with pairs then runs its
// gate and up rows against all its tokens' rows at once, and its down rows against their
// hidden activations, so each weight row is read from memory once per call and used for
// every token that chose the expert. Activations stay float32 between the products (no
// rounding to x's dtype, which the torch backend's products do).
//
// Cost. A cached denoising step's 32 tokens at LLaDA2.0-mini's shape (d 2048, 256 experts
// of 512, 8 per token) make 256 pairs, ~1 per expert, and touch most experts: the call
// reads most of a layer's 1.6 GB of routed weights and does 2 FMAs per weight element
// per pair, so the read is the floor (bench/moe.py on a 2-core Zen 4: 91% of the
// measured read bandwidth, 2.5x torch's products one expert at a time). From ~32 pairs
// per expert the float32 FMAs are the floor (~90% of the cores' peak there) and torch's
// bf16 products (vdpbf16ps) are faster; README, Performance, has the rows. The AMX build
// runs bfloat16 calls on tiles instead (moe_amx.cpp), which lifts that floor.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "moe_parts.h"
#include "rows.h"
#include "simd.h"
#include "unmask/moe.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace moe_detail {
namespace {

// Token rows per pass over a weight row: each weight vector, loaded and converted once,
// feeds kRowTile x kRowMats FMAs (16 or 8 independent chains: enough to cover the FMA
// latency), and the rows' vectors come from L1.
#if defined(__AVX512F__)
constexpr int kRowTile = 8;  // 16 accumulators of the 32 registers
#else
constexpr int kRowTile = 4;  // 8 accumulators of AVX2's 16 registers
#endif
constexpr int kRowMats = 2;  // gate and up rows together; two down rows together
// Weight rows per work item: 16 gate and 16 up rows (64 KB at d 1024 in bfloat16) or 32
// down rows; small enough for two threads to share a layer's experts evenly, large
// enough that the dynamic schedule's bookkeeping is negligible.
constexpr int64_t kGateRowsPerItem = 16;
constexpr int64_t kDownRowsPerItem = 32;
// Weight bytes prefetched ahead of the loads: without it each thread waited on its rows
// (at d 1024, 128 experts of 256, 64 tokens in bfloat16 on the Zen 4 above: 20 GB/s with
// none, 26 at 1024 bytes ahead, 30 at 2048, 28 at 4096).
constexpr int kPrefetchBytes = 2048;

template <ScalarType kType>
using Element = std::conditional_t<kType == ScalarType::kFloat32, float, uint16_t>;

template <ScalarType kType>
inline float weight_at(const Element<kType>* w, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) return w[i];
  else if constexpr (kType == ScalarType::kBFloat16) return bf16_to_float(w[i]);
  else return fp16_to_float(w[i]);
}

#if defined(UNMASK_SIMD)
template <ScalarType kType>
inline Simd::Reg weight_vector(const Element<kType>* w, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) return Simd::load(w + i);
  else if constexpr (kType == ScalarType::kBFloat16) return Simd::load_bf16(w + i);
  else return Simd::load_fp16(w + i);
}
#endif

// sums[r][m] = x[r] . w[m] over n elements, for kRows float32 rows and kMats weight rows.
// Each sum is taken the same way whatever rows share the pass (lane-wise partial sums
// over whole vectors, then across the lanes, then the tail in order), so a token's
// result does not depend on which other tokens chose its expert.
template <ScalarType kType, int kRows, int kMats>
inline void dots(const float* const* x, const Element<kType>* const* w, int64_t n,
                 float (&sums)[kRowTile][kRowMats]) {
  int64_t i = 0;
#if defined(UNMASK_SIMD)
  Simd::Reg acc[kRows][kMats];
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < kMats; ++m) acc[r][m] = Simd::zero();
  for (; i + Simd::kWidth <= n; i += Simd::kWidth) {
    Simd::Reg wv[kMats];
    for (int m = 0; m < kMats; ++m) {
      // As an integer: past a stack's last row the address is outside the tensor (a prefetch
      // does not fault, but pointer arithmetic there would be undefined).
      const std::uintptr_t ahead = reinterpret_cast<std::uintptr_t>(w[m] + i) + kPrefetchBytes;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      wv[m] = weight_vector<kType>(w[m], i);
    }
    for (int r = 0; r < kRows; ++r) {
      const Simd::Reg xv = Simd::load(x[r] + i);
      for (int m = 0; m < kMats; ++m) acc[r][m] = Simd::fmadd(xv, wv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < kMats; ++m) sums[r][m] = Simd::reduce_add(acc[r][m]);
#else
  constexpr int kLanes = 8;  // partial sums the compiler keeps in vectors
  float acc[kRows][kMats][kLanes] = {};
  for (; i + kLanes <= n; i += kLanes) {
    for (int m = 0; m < kMats; ++m) {
      float wv[kLanes];
      for (int l = 0; l < kLanes; ++l) wv[l] = weight_at<kType>(w[m], i + l);
      for (int r = 0; r < kRows; ++r)
        for (int l = 0; l < kLanes; ++l) acc[r][m][l] += x[r][i + l] * wv[l];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int m = 0; m < kMats; ++m) {
      float s = 0.0f;
      for (int l = 0; l < kLanes; ++l) s += acc[r][m][l];
      sums[r][m] = s;
    }
#endif
  // An explicit fused multiply-add: left to the compiler, a * b + c was contracted in one
  // instantiation and vectorised across the rows unfused in another, so a token's sum
  // depended on how many rows shared its tile (seen in the companions test at d 100).
  for (; i < n; ++i)
    for (int r = 0; r < kRows; ++r)
      for (int m = 0; m < kMats; ++m) sums[r][m] = std::fma(x[r][i], weight_at<kType>(w[m], i), sums[r][m]);
}

// dots for rows (1 to kRowTile) and mats (1 or kRowMats) known only at run time.
template <ScalarType kType, int kMats>
inline void dots_n(int rows, const float* const* x, const Element<kType>* const* w, int64_t n,
                   float (&sums)[kRowTile][kRowMats]) {
  static_assert(kRowTile == 4 || kRowTile == 8, "one case per row count");
  switch (rows) {
#if defined(__AVX512F__)
    case 8: dots<kType, 8, kMats>(x, w, n, sums); return;
    case 7: dots<kType, 7, kMats>(x, w, n, sums); return;
    case 6: dots<kType, 6, kMats>(x, w, n, sums); return;
    case 5: dots<kType, 5, kMats>(x, w, n, sums); return;
#endif
    case 4: dots<kType, 4, kMats>(x, w, n, sums); return;
    case 3: dots<kType, 3, kMats>(x, w, n, sums); return;
    case 2: dots<kType, 2, kMats>(x, w, n, sums); return;
    case 1: dots<kType, 1, kMats>(x, w, n, sums); return;
  }  // rows is min(kRowTile, slots left) >= 1: no other case
}

Status sort_pairs(const MoeParams& p, Slots& slots) {
  const int64_t pairs = p.tokens * p.per_token;
  slots.first_slot.assign(p.n_experts + 1, 0);
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t e = p.experts[q];
    if (e < 0 || e >= p.n_experts) return invalid_argument("experts", static_cast<double>(e), "must hold ids in [0, n_experts)");
    ++slots.first_slot[e + 1];
  }
  for (int64_t e = 0; e < p.n_experts; ++e) slots.first_slot[e + 1] += slots.first_slot[e];
  std::vector<int64_t> next(slots.first_slot.begin(), slots.first_slot.end() - 1);
  slots.pair_of_slot.resize(pairs);
  slots.slot_of_pair.resize(pairs);
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t s = next[p.experts[q]]++;
    slots.pair_of_slot[s] = q;
    slots.slot_of_pair[q] = s;
  }
  return ok_status();
}

template <ScalarType kType>
void run(const MoeParams& p, const Slots& slots, float* x32, float* hidden, float* routed) {
  using E = Element<kType>;
  const E* gate = static_cast<const E*>(p.gate);
  const E* up = static_cast<const E*>(p.up);
  const E* down = static_cast<const E*>(p.down);
  const int64_t* first_slot = slots.first_slot.data();
  const int64_t* pair_of_slot = slots.pair_of_slot.data();
  const std::vector<Item> gate_items = items_of(slots, p.n_experts, p.hidden, kGateRowsPerItem);
  const std::vector<Item> down_items = items_of(slots, p.n_experts, p.dim, kDownRowsPerItem);
  const int64_t gate_count = static_cast<int64_t>(gate_items.size());
  const int64_t down_count = static_cast<int64_t>(down_items.size());
  const int64_t macs = p.tokens * p.per_token * p.hidden * p.dim * 3;
#pragma omp parallel if (macs >= kParallelMacs)
  {
    // x as float32 rows, once: every expert's pass reads its tokens' rows from here.
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) load_row(p.x, p.dtype, t * p.x_row_stride, p.dim, 1.0f, x32 + t * p.dim);

    // hidden[s] = silu(gate_e x) * up_e x for the token of slot s (float32 [slots, hidden]).
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < gate_count; ++item) {
      const Item it = gate_items[item];
      const int64_t begin = first_slot[it.expert], end = first_slot[it.expert + 1];
      for (int64_t j = it.row_begin; j < it.row_end; ++j) {
        const int64_t row = (it.expert * p.hidden + j) * p.dim;
        const E* w[kRowMats] = {gate + row, up + row};
        for (int64_t s = begin; s < end; s += kRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowTile, end - s));
          const float* x[kRowTile];
          for (int r = 0; r < rows; ++r) x[r] = x32 + (pair_of_slot[s + r] / p.per_token) * p.dim;
          float sums[kRowTile][kRowMats];
          dots_n<kType, 2>(rows, x, w, p.dim, sums);
          for (int r = 0; r < rows; ++r) {
            hidden[(s + r) * p.hidden + j] = swiglu(sums[r][0], sums[r][1]);
          }
        }
      }
    }

    // routed[s] = down_e hidden[s] (float32 [slots, dim]), two down rows per pass.
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < down_count; ++item) {
      const Item it = down_items[item];
      const int64_t begin = first_slot[it.expert], end = first_slot[it.expert + 1];
      for (int64_t i = it.row_begin; i < it.row_end; i += kRowMats) {
        const int mats = static_cast<int>(std::min<int64_t>(kRowMats, it.row_end - i));
        const E* w[kRowMats] = {down + (it.expert * p.dim + i) * p.hidden, nullptr};
        if (mats == 2) w[1] = w[0] + p.hidden;
        for (int64_t s = begin; s < end; s += kRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowTile, end - s));
          const float* x[kRowTile];
          for (int r = 0; r < rows; ++r) x[r] = hidden + (s + r) * p.hidden;
          float sums[kRowTile][kRowMats];
          if (mats == 2) dots_n<kType, 2>(rows, x, w, p.hidden, sums);
          else dots_n<kType, 1>(rows, x, w, p.hidden, sums);
          for (int r = 0; r < rows; ++r)
            for (int m = 0; m < mats; ++m) routed[(s + r) * p.dim + i + m] = sums[r][m];
        }
      }
    }

#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) weighted_sum(p, slots, routed, t);
  }
}

}  // namespace
}  // namespace moe_detail

Status moe_swiglu(const MoeParams& p) {
  const Status status = check_moe_params(p);
  if (!status.ok()) return status;
  if (p.tokens == 0) return ok_status();
  using namespace moe_detail;
  // The calling thread's buffers, kept from call to call up to kKeptBufferBytes.
  static thread_local Slots slots;
  static thread_local Scratch<float> x32, hidden, routed;
  const Status sorted = sort_pairs(p, slots);
  if (!sorted.ok()) return sorted;
  const int64_t pairs = p.tokens * p.per_token;
  float* const h = hidden.take(pairs * p.hidden);
  float* const y = routed.take(pairs * p.dim);
#if defined(UNMASK_AMX)
  if (p.dtype == ScalarType::kBFloat16) {  // bfloat16 products on tiles, whatever the call's size
    moe_swiglu_bf16_amx(p, slots, h, y);
  } else
#endif
  {
    float* const x = x32.take(p.tokens * p.dim);
    switch (p.dtype) {
      case ScalarType::kFloat32: run<ScalarType::kFloat32>(p, slots, x, h, y); break;
      case ScalarType::kBFloat16: run<ScalarType::kBFloat16>(p, slots, x, h, y); break;
      case ScalarType::kFloat16: run<ScalarType::kFloat16>(p, slots, x, h, y); break;
    }
    x32.release_if_large();
  }
  hidden.release_if_large();
  routed.release_if_large();
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
