// The per-element loops of the CPU sampler, written once against cpu::Simd (AVX-512 or
// AVX2 + FMA, simd.h) and once as plain loops the compiler vectorises elsewhere. Except
// for the loading passes (convert_*), each works on a run of floats whose length is a
// multiple of Simd::kWidth, padded with -inf by the caller, so there are no scalar tails.
//
// Why intrinsics: on 2 cores the sampler is compute-bound, not memory-bound. The
// auto-vectorised loops (a degree-7 e^x, a copy, a max pass and a sum pass per chunk)
// took 16 ms for greedy [256, 126464] float32 rows on Zen 3; the AVX2 loops take 8-9 ms.
// On a 2-core Sapphire Rapids the same loops at 16 lanes, with the single-pass chunks
// and the floor-based 2^z, took greedy rows from 0.30 to 0.14 ns per logit per core
// (L2-resident).
#pragma once

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "simd.h"
#include "unmask/types.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

// Largest of x[0, n) (n a multiple of Simd::kWidth; NaN never wins), and whether any is
// NaN or +inf.
inline float max_and_bad(const float* x, int64_t n, bool* bad) {
#if defined(UNMASK_SIMD)
  constexpr int kW = Simd::kWidth;
  const Simd::Reg inf = Simd::set1(std::numeric_limits<float>::infinity());
  Simd::Reg m0 = Simd::set1(-std::numeric_limits<float>::infinity()), m1 = m0;
  Simd::Mask flags = Simd::no_lanes();
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {  // two max chains: the loop is bound by max latency otherwise
    const Simd::Reg a = Simd::load(x + i), b = Simd::load(x + i + kW);
    m0 = Simd::max(a, m0);  // a NaN in `a` returns m0: NaN never becomes the max
    m1 = Simd::max(b, m1);
    // !(x < inf) is true for NaN and +inf: one compare catches both.
    flags = Simd::either(flags, Simd::either(Simd::nan_or_at_least(a, inf), Simd::nan_or_at_least(b, inf)));
  }
  for (; i < n; i += kW) {
    const Simd::Reg a = Simd::load(x + i);
    m0 = Simd::max(a, m0);
    flags = Simd::either(flags, Simd::nan_or_at_least(a, inf));
  }
  *bad = Simd::bits(flags) != 0;
  return Simd::reduce_max(Simd::max(m0, m1));
#else
  float max = -std::numeric_limits<float>::infinity();
  int flags = 0;
#pragma omp simd reduction(max : max) reduction(| : flags)
  for (int64_t i = 0; i < n; ++i) {
    flags |= !(x[i] < std::numeric_limits<float>::infinity());
    max = x[i] > max ? x[i] : max;
  }
  *bad = flags != 0;
  return max;
#endif
}

#if defined(UNMASK_SIMD)
template <ScalarType kType>
inline Simd::Reg load_as_float(const void* src, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) return Simd::load(static_cast<const float*>(src) + i);
  if constexpr (kType == ScalarType::kBFloat16) return Simd::load_bf16(static_cast<const uint16_t*>(src) + i);
  return Simd::load_fp16(static_cast<const uint16_t*>(src) + i);
}
#endif

template <ScalarType kType>
inline float element_as_float(const void* src, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) return static_cast<const float*>(src)[i];
  if constexpr (kType == ScalarType::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
  return fp16_to_float(static_cast<const uint16_t*>(src)[i]);
}

// How far (in base 2) a chunk's maximum may rise above the reference of its single-pass
// sums for them to be rescaled rather than redone (load_and_scan).
constexpr float kRescaleLimit = 8.0f;

// The first i with x[i] == value, x of kType; value must occur in x[0, n). A vector of
// compares at a time: a chunk raises the row maximum a few times per row, and a scalar
// search for where measured 5% of a greedy row.
template <ScalarType kType>
inline int64_t first_index_of(const void* src, [[maybe_unused]] int64_t n, float value) {
  int64_t i = 0;
#if defined(UNMASK_SIMD)
  const Simd::Reg target = Simd::set1(value);
  for (; i + Simd::kWidth <= n; i += Simd::kWidth) {
    const uint32_t hits = Simd::bits(Simd::equal(load_as_float<kType>(src, i), target));
    if (hits != 0) return i + lowest_set_bit(hits);
  }
#endif
  while (!(element_as_float<kType>(src, i) == value)) ++i;
  return i;
}

// out[0, n) = src[0, n) as float, and in the same pass (the one that reads the logits
// from memory) their maximum and whether any is NaN or +inf.
template <ScalarType kType>
inline float convert_max_and_bad(const void* src, int64_t n, float* out, bool* bad) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  bool any_bad = false;
#if defined(UNMASK_SIMD)
  constexpr int kW = Simd::kWidth;
  const Simd::Reg inf = Simd::set1(std::numeric_limits<float>::infinity());
  Simd::Reg m0 = Simd::set1(max), m1 = m0;
  Simd::Mask flags = Simd::no_lanes();
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const Simd::Reg a = load_as_float<kType>(src, i), b = load_as_float<kType>(src, i + kW);
    Simd::store(out + i, a);
    Simd::store(out + i + kW, b);
    m0 = Simd::max(a, m0);
    m1 = Simd::max(b, m1);
    flags = Simd::either(flags, Simd::either(Simd::nan_or_at_least(a, inf), Simd::nan_or_at_least(b, inf)));
  }
  max = Simd::reduce_max(Simd::max(m0, m1));
  any_bad = Simd::bits(flags) != 0;
#endif
  for (; i < n; ++i) {
    const float x = element_as_float<kType>(src, i);
    out[i] = x;
    any_bad = any_bad || !(x < std::numeric_limits<float>::infinity());
    max = x > max ? x : max;
  }
  *bad = any_bad;
  return max;
}

// Softmax sums of x[0, n) (n a multiple of Simd::kWidth) against `max`, with
// z = (x - max) * inv_t: sum of e^z, and with kWeighted also sum of e^z * z. -inf entries
// (banned ids, pads) add 2^-126 each to the sum and nothing that matters to the weighted
// sum: the row maximum contributes exactly 1 to the sum.
//
template <bool kWeighted>
inline void exp_sums(const float* x, int64_t n, float max, float inv_t, float* sum_out, float* weighted_out) {
  // In base 2: z2 = z * log2(e) = (x - max) * a, e^z = 2^z2, e^z * z = 2^z2 * z2 * ln 2.
  // (x - max) first: the maximum gets z2 = 0 exactly, and x * a - max * a would lose
  // |max * a| * 2^-24 to cancellation, 1e-5 relative in e^z for logits near 100.
  const float a = inv_t * kLog2e;
#if defined(UNMASK_SIMD)
  constexpr int kW = Simd::kWidth;
  const Simd::Reg va = Simd::set1(a), vmax = Simd::set1(max), lowest = Simd::set1(-126.0f);
  // z2 clamped at -126 once, for the exp and for the weighted sum (-inf * 2^-126 = -inf).
  auto z2 = [&](int64_t at) { return Simd::max(Simd::mul(Simd::sub(Simd::load(x + at), vmax), va), lowest); };
  constexpr int kN = 4;  // interleaved 2^z chains (exp2_interleaved)
  Simd::Reg sum[kN], wsum[kN];
  for (int g = 0; g < kN; ++g) sum[g] = wsum[g] = Simd::zero();
  int64_t i = 0;
  for (; i + kW * kN <= n; i += kW * kN) {
    Simd::Reg z[kN], e[kN];
    for (int g = 0; g < kN; ++g) e[g] = z[g] = z2(i + kW * g);
    exp2_interleaved(e);
    for (int g = 0; g < kN; ++g) sum[g] = Simd::add(sum[g], e[g]);
    if constexpr (kWeighted) {
      for (int g = 0; g < kN; ++g) wsum[g] = Simd::fmadd(e[g], z[g], wsum[g]);
    }
  }
  for (; i < n; i += kW) {
    Simd::Reg e[1] = {z2(i)};
    const Simd::Reg z = e[0];
    exp2_interleaved(e);
    sum[0] = Simd::add(sum[0], e[0]);
    if constexpr (kWeighted) wsum[0] = Simd::fmadd(e[0], z, wsum[0]);
  }
  *sum_out = Simd::reduce_add(Simd::add(Simd::add(sum[0], sum[1]), Simd::add(sum[2], sum[3])));
  *weighted_out = Simd::reduce_add(Simd::add(Simd::add(wsum[0], wsum[1]), Simd::add(wsum[2], wsum[3]))) * kLn2;
#else
  float sum = 0.0f, wsum = 0.0f;
#pragma omp simd reduction(+ : sum, wsum)
  for (int64_t i = 0; i < n; ++i) {
    const float z = std::max((x[i] - max) * a, -126.0f);
    const float e = exp2_poly(z);
    sum += e;
    if constexpr (kWeighted) wsum += e * z;
  }
  *sum_out = sum;
  *weighted_out = wsum * kLn2;
#endif
}

// The single pass of a chunk whose softmax reference is already known: src[0, n) to
// float (also stored to out, unless out is null), its maximum, and the softmax sums
// against `ref`, the row maximum of the earlier chunks: sum of e^z and of e^z * z with
// z = (x - ref) * inv_t, as in exp_sums. The sums are right when the returned maximum
// is at most kRescaleLimit (in base 2) above ref; otherwise the caller redoes the chunk. Nothing
// is stored and read back, and the loads form one steady stream (the two-pass chunks
// ran ~40% slower from DRAM than from L2 on a 2-core Sapphire Rapids).
//
// NaN and +inf are not tested per element: NaN reaches the sums (the clamp keeps it:
// max returns its second operand when either is NaN) and +inf becomes the maximum.
// Entries above ref could make 2^z overflow; the caller discards those sums anyway.
template <ScalarType kType, bool kWeighted>
inline float convert_max_and_sums(const void* src, int64_t n, float ref, float inv_t, float* out, float* sum_out,
                                  float* weighted_out) {
  const float a = inv_t * kLog2e;  // base 2, as in exp_sums
  // Without the entropy's e * z, z = x * a - hi in one FMA (rounded once, from the exact
  // product), where hi + lo = ref * a exactly: every term is then 2^lo too large, a
  // constant the sum is divided by at the end. The caller keeps ref * a finite.
  const float hi = ref * a, lo = std::fma(ref, a, -hi);
  float max = -std::numeric_limits<float>::infinity(), sum = 0.0f, wsum = 0.0f;
  int64_t i = 0;
#if defined(UNMASK_SIMD)
  constexpr int kW = Simd::kWidth, kN = 4;
  const Simd::Reg va = Simd::set1(a), vref = Simd::set1(ref), lowest = Simd::set1(-126.0f);
  const Simd::Reg minus_hi = Simd::set1(-hi);
  Simd::Reg vmax[kN], vsum[kN], vwsum[kN];
  for (int g = 0; g < kN; ++g) {
    vmax[g] = Simd::set1(max);
    vsum[g] = vwsum[g] = Simd::zero();
  }
  // Software prefetch 4 KiB ahead into L2, the lines of one step per step: on its own the
  // hardware prefetcher left bfloat16 rows at ~30% of the read bandwidth (they are
  // consumed at half the bytes per operation of float32, and it ramps up too slowly);
  // 1-4 KiB measured alike, into L1 or L2.
  constexpr int64_t kStepBytes = kW * kN * (kType == ScalarType::kFloat32 ? 4 : 2);
  constexpr int64_t kPrefetchBytes = 4096;
  const char* ahead = static_cast<const char*>(src) + kPrefetchBytes;
  // One loop for rows kept in `out` and one for rows that are not, whose values' order is
  // then free: bfloat16 loads 64 bytes at a time, split into even and odd elements (a
  // shift and an and, where widening takes a shuffle and a shift per 32 bytes).
  auto scan = [&](auto keep) {
    constexpr bool kKeep = decltype(keep)::value;
    for (; i + kW * kN <= n; i += kW * kN, ahead += kStepBytes) {
      for (int64_t line = 0; line < kStepBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
      Simd::Reg x[kN], z[kN], e[kN];
      if constexpr (kType == ScalarType::kBFloat16 && !kKeep) {
        for (int g = 0; g < kN; g += 2) {
          Simd::load_bf16_even_odd(static_cast<const uint16_t*>(src) + i + kW * g, &x[g], &x[g + 1]);
        }
      } else {
        for (int g = 0; g < kN; ++g) x[g] = load_as_float<kType>(src, i + kW * g);
      }
      for (int g = 0; g < kN; ++g) {
        if constexpr (kKeep) Simd::store(out + i + kW * g, x[g]);
        vmax[g] = Simd::max(x[g], vmax[g]);
        z[g] = kWeighted ? Simd::mul(Simd::sub(x[g], vref), va) : Simd::fmadd(x[g], va, minus_hi);
        // The clamp keeps e * z finite at -inf logits and AVX2's 2^z in range, and keeps
        // 2^z out of the subnormals: vscalefps makes them (z in (-150, -126)) through
        // microcode assists, 13x slower at conf_temperature 0.05 without the clamp.
        e[g] = z[g] = Simd::max(lowest, z[g]);
      }
      exp2_interleaved(e);
      for (int g = 0; g < kN; ++g) vsum[g] = Simd::add(vsum[g], e[g]);
      if constexpr (kWeighted) {
        for (int g = 0; g < kN; ++g) vwsum[g] = Simd::fmadd(e[g], z[g], vwsum[g]);
      }
    }
  };
  if (out != nullptr) {
    scan(std::true_type{});
  } else {
    scan(std::false_type{});
  }
  max = Simd::reduce_max(Simd::max(Simd::max(vmax[0], vmax[1]), Simd::max(vmax[2], vmax[3])));
  sum = Simd::reduce_add(Simd::add(Simd::add(vsum[0], vsum[1]), Simd::add(vsum[2], vsum[3])));
  wsum = Simd::reduce_add(Simd::add(Simd::add(vwsum[0], vwsum[1]), Simd::add(vwsum[2], vwsum[3])));
#endif
  for (; i < n; ++i) {
    const float x = element_as_float<kType>(src, i);
    if (out != nullptr) out[i] = x;
    max = x > max ? x : max;
    // Capped (sums with entries further above ref are discarded anyway), so the float to
    // int of 2^z stays defined for +inf.
    const float z = std::min(std::max(kWeighted ? (x - ref) * a : std::fma(x, a, -hi), -126.0f), kRescaleLimit);
    const float e = x == x ? exp2_poly(z) : x;  // NaN: into the sum, as in the vector loop
    sum += e;
    if constexpr (kWeighted) wsum += e * z;
  }
  *sum_out = kWeighted ? sum : static_cast<float>(sum * std::exp2(-static_cast<double>(lo)));
  *weighted_out = wsum * kLn2;
  return max;
}

// Gumbel candidates: bit i of the result is set when id i might beat `best_low` with
// its noise, that is when x_i * inv_t + bound(word_i) >= best_low, for 32 ids.
//
// The bound needs no logarithm. u = (a + 0.5) / 2^24 with a = w >> 8, so
// 1 - u = (2m + 1) / 2^25 with m = 2^24 - 1 - a = (~w) >> 8. Since -log u >= 1 - u,
//   g = -log(-log u) <= -log(1 - u) = 25 ln2 - ln(2m + 1) <= ln2 * (24 - floor(log2 m))
// for m >= 1, and floor(log2 m) is the exponent of float(m) (exact: m < 2^24). For
// m = 0 the exponent reads -127 (or -inf with AVX-512's getexp), still an upper bound.
// The bound is at most ln 2 above -log(1 - u), which is itself within a hair of g where
// g is large, so about twice as many ids pass as could really win: a few per row.
inline uint32_t gumbel_candidates32(const float* x, const uint32_t* words, float inv_t, float best_low) {
#if defined(UNMASK_SIMD)
  const Simd::Reg vinv = Simd::set1(inv_t), vbest = Simd::set1(best_low);
  const Simd::Reg ln2 = Simd::set1(kLn2), top = Simd::set1(24.0f * kLn2);
  uint32_t mask = 0;
  for (int j = 0; j < 32; j += Simd::kWidth) {
    const Simd::Reg bound = Simd::fnmadd(Simd::exponent(Simd::complement_high24(words + j)), ln2, top);
    const Simd::Reg score = Simd::fmadd(Simd::load(x + j), vinv, bound);
    mask |= Simd::bits(Simd::at_least(score, vbest)) << j;
  }
  return mask;
#else
  uint32_t mask = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t m = (~words[i]) >> 8;
    const float exponent = static_cast<float>(float_to_bits(static_cast<float>(m)) >> 23);
    const float score = x[i] * inv_t + (151.0f - exponent) * kLn2;
    mask |= static_cast<uint32_t>(score >= best_low) << i;
  }
  return mask;
#endif
}

// The filters' candidate passes (sample_filter.h). Both read a row that sits in L2 at
// vector speed, where the radix selection they usually replace took three scalar
// histogram passes of ~1.5 ns per id.

// Maxima of a partition of x[0, n) (n a multiple of 16) into groups of at most `group`
// ids: block b spans ids [16 * group * b, 16 * group * (b + 1)), and its lane l (written
// to out[16 * b + l]) is the maximum of the ids of the block equal to l modulo 16. Lanes
// rather than runs of ids: vertical maxima need no horizontal reduction, and any
// partition bounds the k-th largest id from below by the k-th largest group maximum.
// Returns the number of maxima written: 16 per block.
inline int64_t strided_group_maxima(const float* x, int64_t n, int64_t group, float* out) {
  constexpr int64_t kLanes = 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t written = 0;
  for (int64_t begin = 0; begin < n; begin += kLanes * group, written += kLanes) {
    const int64_t end = std::min(n, begin + kLanes * group);
#if defined(UNMASK_SIMD)
    constexpr int kRegs = kLanes / Simd::kWidth;
    constexpr int kChains = 4;  // independent max chains: one would be bound by max's latency
    Simd::Reg m[kChains][kRegs];
    for (auto& chain : m) {
      for (auto& reg : chain) reg = Simd::set1(kNegInf);
    }
    int64_t i = begin;
    for (; i + kChains * kLanes <= end; i += kChains * kLanes) {
      for (int c = 0; c < kChains; ++c) {
        for (int r = 0; r < kRegs; ++r) m[c][r] = Simd::max(Simd::load(x + i + c * kLanes + r * Simd::kWidth), m[c][r]);
      }
    }
    for (; i < end; i += kLanes) {
      for (int r = 0; r < kRegs; ++r) m[0][r] = Simd::max(Simd::load(x + i + r * Simd::kWidth), m[0][r]);
    }
    for (int r = 0; r < kRegs; ++r) {
      Simd::store(out + written + r * Simd::kWidth,
                  Simd::max(Simd::max(m[0][r], m[1][r]), Simd::max(m[2][r], m[3][r])));
    }
#else
    float m[kLanes];
    for (float& lane : m) lane = kNegInf;
    for (int64_t i = begin; i < end; i += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
    }
    for (int64_t l = 0; l < kLanes; ++l) out[written + l] = m[l];
#endif
  }
  return written;
}

// Bit j of the result: lo <= x[j] < hi, for 32 floats.
inline uint32_t in_range32(const float* x, float lo, float hi) {
  uint32_t hits = 0;
#if defined(UNMASK_SIMD)
  const Simd::Reg low = Simd::set1(lo), high = Simd::set1(hi);
  for (int j = 0; j < 32; j += Simd::kWidth) {
    const Simd::Reg v = Simd::load(x + j);
    hits |= (Simd::bits(Simd::at_least(v, low)) & ~Simd::bits(Simd::at_least(v, high))) << j;
  }
#else
  for (int j = 0; j < 32; ++j) hits |= static_cast<uint32_t>(x[j] >= lo && x[j] < hi) << j;
#endif
  return hits;
}

// x[0, n) (n a multiple of 32): the count of ids with lo <= x[i] < hi. The vector test and a popcount per 32
// ids, where collecting them (below) costs a few cycles per id found.
inline int64_t count_in_range(const float* x, int64_t n, float lo, float hi) {
  int64_t count = 0;
  for (int64_t block = 0; block < n; block += 32) count += set_bit_count(in_range32(x + block, lo, hi));
  return count;
}

// Ids i < n_valid with lo <= x[i] < hi, in increasing order, into out[0, count). Stops
// at the (cap + 1)-th and returns cap + 1: the caller then selects another way. x is
// padded to a multiple of 32 floats.
inline int64_t ids_in_range(const float* x, int64_t n_valid, float lo, float hi, int64_t cap, int64_t* out) {
  int64_t count = 0;
  for (int64_t block = 0; block < n_valid; block += 32) {
    uint32_t hits = in_range32(x + block, lo, hi);
    if (n_valid - block < 32) hits &= (1u << (n_valid - block)) - 1u;
    for (; hits != 0; hits &= hits - 1) {
      if (count == cap) return cap + 1;
      out[count++] = block + lowest_set_bit(hits);
    }
  }
  return count;
}

// The softmax mass at or above each of kMassPivots thresholds: mass[j] = sum over
// x[i] >= pivots[j] of 2^z, z = (x[i] - max) * a clamped at -126 as in exp_sums, for
// x[0, n) (n a multiple of Simd::kWidth; the caller keeps n to a chunk, so each float
// sum adds a few thousand terms). One exponential per id for all the thresholds: top_p
// narrows where its nucleus ends eight ways per pass.
constexpr int kMassPivots = 8;
inline void mass_at_least(const float* x, int64_t n, float max, float a, const float* pivots, float* mass) {
#if defined(UNMASK_SIMD)
  const Simd::Reg va = Simd::set1(a), vmax = Simd::set1(max), lowest = Simd::set1(-126.0f);
  Simd::Reg threshold[kMassPivots], sum[kMassPivots];
  for (int j = 0; j < kMassPivots; ++j) {
    threshold[j] = Simd::set1(pivots[j]);
    sum[j] = Simd::zero();
  }
  for (int64_t i = 0; i < n; i += Simd::kWidth) {
    const Simd::Reg v = Simd::load(x + i);
    Simd::Reg e[1] = {Simd::max(Simd::mul(Simd::sub(v, vmax), va), lowest)};
    exp2_interleaved(e);
    for (int j = 0; j < kMassPivots; ++j) sum[j] = Simd::add_where(Simd::at_least(v, threshold[j]), sum[j], e[0]);
  }
  for (int j = 0; j < kMassPivots; ++j) mass[j] = Simd::reduce_add(sum[j]);
#else
  for (int j = 0; j < kMassPivots; ++j) {
    const float pivot = pivots[j];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += x[i] >= pivot ? exp2_poly(std::max((x[i] - max) * a, -126.0f)) : 0.0f;
    mass[j] = sum;
  }
#endif
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
