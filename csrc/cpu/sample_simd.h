// The per-element loops of the CPU sampler, written once with AVX2 + FMA intrinsics
// (every x86 machine the kernels target, AVX-512 ones included) and once as plain loops
// the compiler vectorises elsewhere. Except for the loading pass, each works on a run
// of floats whose length is a multiple of 8, padded with -inf by the caller, so there
// are no scalar tails.
//
// Why intrinsics: on a 2-core AVX2 machine the sampler is compute-bound, not memory-
// bound. The auto-vectorised loops (a degree-7 e^x, a copy, a max pass and a sum pass
// per chunk) took 16 ms for greedy [256, 126464] float32 rows; these take 8-9 ms.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// F16C (half to float) ships with every AVX2 core; a build that enables AVX2 without it
// takes the portable loops.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define UNMASK_SAMPLE_AVX2 1
#endif

#include "unmask/types.h"
#include "vec_math.h"

namespace unmask::cpu {

#if defined(UNMASK_SAMPLE_AVX2)
// kN groups of eight lanes of 2^z for z in [-126, 127] (callers clamp: -inf and very
// negative scores become 2^-126, negligible next to a row maximum's 1), written step by
// step across the groups: one 2^z is a chain of ~10 dependent operations (~40 cycles),
// and interleaving independent chains in program order lets the out-of-order core keep
// both FMA pipes busy (one group at a time: 0.36 ns per element on Zen 3; four: 0.25).
// Each: round to the nearest integer k, the polynomial in r = z - k, and k added into
// the exponent bits.
template <int kN>
inline void exp2_avx2(__m256 (&z)[kN]) {
  __m256 k[kN], r[kN];
  for (int g = 0; g < kN; ++g) {
    k[g] = _mm256_round_ps(z[g], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[g] = _mm256_sub_ps(z[g], k[g]);
    z[g] = _mm256_set1_ps(kExp2Poly[kExp2Degree]);
  }
  for (int i = kExp2Degree - 1; i >= 0; --i) {
    for (int g = 0; g < kN; ++g) z[g] = _mm256_fmadd_ps(z[g], r[g], _mm256_set1_ps(kExp2Poly[i]));
  }
  for (int g = 0; g < kN; ++g) {
    const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(k[g]), 23);
    z[g] = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(z[g]), scale));
  }
}

inline int64_t round_up_to_line(int64_t bytes) { return bytes / 64 * 64; }

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Largest of x[0, n) (n a multiple of 8; NaN never wins), and whether any is NaN or +inf.
inline float max_and_bad(const float* x, int64_t n, bool* bad) {
#if defined(UNMASK_SAMPLE_AVX2)
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  __m256 flags = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // two max chains: the loop is bound by max latency otherwise
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    m0 = _mm256_max_ps(a, m0);  // a NaN in `a` returns m0: NaN never becomes the max
    m1 = _mm256_max_ps(b, m1);
    // !(x < inf) is true for NaN and +inf: one compare catches both.
    flags = _mm256_or_ps(flags, _mm256_or_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ), _mm256_cmp_ps(b, inf, _CMP_NLT_UQ)));
  }
  for (; i < n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    m0 = _mm256_max_ps(a, m0);
    flags = _mm256_or_ps(flags, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
  }
  *bad = _mm256_movemask_ps(flags) != 0;
  return horizontal_max(_mm256_max_ps(m0, m1));
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

// The first i with x[i] == value; value must occur in x[0, n). Eight compares at a time:
// a chunk raises the row maximum a few times per row, and a scalar search for where
// measured 5% of a greedy row.
inline int64_t first_index_of(const float* x, [[maybe_unused]] int64_t n, float value) {
  int64_t i = 0;
#if defined(UNMASK_SAMPLE_AVX2)
  const __m256 target = _mm256_set1_ps(value);
  for (; i + 8 <= n; i += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hits != 0) return i + lowest_set_bit(static_cast<uint32_t>(hits));
  }
#endif
  while (!(x[i] == value)) ++i;
  return i;
}

#if defined(UNMASK_SAMPLE_AVX2)
template <ScalarType kType>
inline __m256 load8_as_float(const void* src, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  } else {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
    if constexpr (kType == ScalarType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    } else {
      return _mm256_cvtph_ps(half);
    }
  }
}
#endif

template <ScalarType kType>
inline float element_as_float(const void* src, int64_t i) {
  if constexpr (kType == ScalarType::kFloat32) return static_cast<const float*>(src)[i];
  if constexpr (kType == ScalarType::kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(src)[i]);
  return fp16_to_float(static_cast<const uint16_t*>(src)[i]);
}

// out[0, n) = src[0, n) as float, and in the same pass (the one that reads the logits
// from memory) their maximum and whether any is NaN or +inf.
template <ScalarType kType>
inline float convert_max_and_bad(const void* src, int64_t n, float* out, bool* bad) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  bool any_bad = false;
#if defined(UNMASK_SAMPLE_AVX2)
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m0 = _mm256_set1_ps(max), m1 = m0, flags = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m256 a = load8_as_float<kType>(src, i), b = load8_as_float<kType>(src, i + 8);
    _mm256_storeu_ps(out + i, a);
    _mm256_storeu_ps(out + i + 8, b);
    m0 = _mm256_max_ps(a, m0);
    m1 = _mm256_max_ps(b, m1);
    flags = _mm256_or_ps(flags, _mm256_or_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ), _mm256_cmp_ps(b, inf, _CMP_NLT_UQ)));
  }
  max = horizontal_max(_mm256_max_ps(m0, m1));
  any_bad = _mm256_movemask_ps(flags) != 0;
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

// Softmax sums of x[0, n) (n a multiple of 8) against `max`, with z = (x - max) * inv_t:
// sum of e^z, and with kWeighted also sum of e^z * z. -inf entries (banned ids, pads)
// add 2^-126 each to the sum and nothing that matters to the weighted sum: the row
// maximum contributes exactly 1 to the sum.
//
// `prefetch`, `prefetch_bytes`: memory the caller reads next (the next chunk of logits),
// requested a few lines per step so that DRAM streams it in while this loop computes:
// on 2 cores the loop is compute-bound and the hardware prefetcher alone left the
// load of the next chunk waiting on memory.
template <bool kWeighted>
inline void exp_sums(const float* x, int64_t n, float max, float inv_t, float* sum_out, float* weighted_out,
                     [[maybe_unused]] const void* prefetch = nullptr, [[maybe_unused]] int64_t prefetch_bytes = 0) {
  // In base 2: z2 = z * log2(e) = (x - max) * a, e^z = 2^z2, e^z * z = 2^z2 * z2 * ln 2.
  // (x - max) first: the maximum gets z2 = 0 exactly, and x * a - max * a would lose
  // |max * a| * 2^-24 to cancellation, 1e-5 relative in e^z for logits near 100.
  const float a = inv_t * kLog2e;
#if defined(UNMASK_SAMPLE_AVX2)
  const __m256 va = _mm256_set1_ps(a), vmax = _mm256_set1_ps(max), lowest = _mm256_set1_ps(-126.0f);
  // z2 clamped at -126 once, for the exp and for the weighted sum (-inf * 2^-126 = -inf).
  auto z2 = [&](int64_t at) {
    return _mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + at), vmax), va), lowest);
  };
  constexpr int kN = 4;  // interleaved 2^z chains (exp2_avx2)
  __m256 sum[kN], wsum[kN];
  for (int g = 0; g < kN; ++g) sum[g] = wsum[g] = _mm256_setzero_ps();
  int64_t i = 0;
  const char* ahead = static_cast<const char*>(prefetch);
  const int64_t ahead_step = prefetch_bytes > 0 ? round_up_to_line(prefetch_bytes * 8 * kN / n + 63) : 0;
  const char* ahead_end = ahead + prefetch_bytes;
  for (; i + 8 * kN <= n; i += 8 * kN) {
    for (int64_t line = 0; line < ahead_step && ahead < ahead_end; line += 64, ahead += 64) {
      _mm_prefetch(ahead, _MM_HINT_T0);
    }
    __m256 z[kN], e[kN];
    for (int g = 0; g < kN; ++g) e[g] = z[g] = z2(i + 8 * g);
    exp2_avx2(e);
    for (int g = 0; g < kN; ++g) sum[g] = _mm256_add_ps(sum[g], e[g]);
    if constexpr (kWeighted) {
      for (int g = 0; g < kN; ++g) wsum[g] = _mm256_fmadd_ps(e[g], z[g], wsum[g]);
    }
  }
  for (; i < n; i += 8) {
    const __m256 z = z2(i);
    __m256 e[1] = {z};
    exp2_avx2(e);
    sum[0] = _mm256_add_ps(sum[0], e[0]);
    if constexpr (kWeighted) wsum[0] = _mm256_fmadd_ps(e[0], z, wsum[0]);
  }
  *sum_out = horizontal_sum(_mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3])));
  const __m256 weighted = _mm256_add_ps(_mm256_add_ps(wsum[0], wsum[1]), _mm256_add_ps(wsum[2], wsum[3]));
  *weighted_out = horizontal_sum(weighted) * kLn2;
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

// Gumbel candidates: bit i of the result is set when id i might beat `best_low` with
// its noise, that is when x_i * inv_t + bound(word_i) >= best_low, for 32 ids.
//
// The bound needs no logarithm. u = (a + 0.5) / 2^24 with a = w >> 8, so
// 1 - u = (2m + 1) / 2^25 with m = 2^24 - 1 - a = (~w) >> 8. Since -log u >= 1 - u,
//   g = -log(-log u) <= -log(1 - u) = 25 ln2 - ln(2m + 1) <= ln2 * (24 - floor(log2 m))
// for m >= 1, and floor(log2 m) is the exponent field of float(m) (exact: m < 2^24)
// minus 127. For m = 0 the same formula gives 151 ln2, still an upper bound. The bound
// is at most ln 2 above -log(1 - u), which is itself within a hair of g where g is
// large, so about twice as many ids pass as could really win: a few per row.
inline uint32_t gumbel_candidates32(const float* x, const uint32_t* words, float inv_t, float best_low) {
#if defined(UNMASK_SAMPLE_AVX2)
  const __m256 vinv = _mm256_set1_ps(inv_t), vbest = _mm256_set1_ps(best_low);
  const __m256 ln2 = _mm256_set1_ps(kLn2), top = _mm256_set1_ps(151.0f * kLn2);
  uint32_t mask = 0;
  for (int j = 0; j < 4; ++j) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8 * j));
    const __m256i m = _mm256_srli_epi32(_mm256_xor_si256(w, _mm256_set1_epi32(-1)), 8);
    const __m256i exponent = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(m)), 23);
    const __m256 bound = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(exponent), ln2, top);
    const __m256 score = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * j), vinv, bound);
    mask |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(score, vbest, _CMP_GE_OQ))) << (8 * j);
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

}  // namespace unmask::cpu
