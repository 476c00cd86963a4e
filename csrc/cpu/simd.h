// The vector type of the CPU kernels' hand-written loops, one per build: AVX-512 where
// the compiler targets it (16 floats, 32 registers), else AVX2 + FMA + F16C (8 floats,
// 16 registers; every AVX2 core has FMA and F16C), else none: UNMASK_SIMD stays
// undefined and the kernels take plain loops that the compiler vectorises.
//
// The sampler and attention are written once against `Simd`. Lane masks are kept in
// the form each ISA compares into (mask registers on AVX-512, vectors on AVX2) and only
// turned into integer bits, one per lane, where a branch needs them.
#pragma once

#include "isa.h"

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#define UNMASK_SIMD 1
#endif

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

#if defined(__AVX512F__)
struct Simd {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16;

  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  // kWidth bfloat16 values: the 16 bits are the top half of the float.
  static Reg load_bf16(const uint16_t* p) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  static Reg load_fp16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 2 * kWidth bfloat16 values as floats: the even-indexed ones in *even, the odd in *odd.
  static void load_bf16_even_odd(const uint16_t* p, Reg* even, Reg* odd) {
    const __m512i pairs = _mm512_loadu_si512(p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  // float((~w) >> 8) for kWidth 32-bit words: exact, the value is below 2^24.
  static Reg complement_high24(const uint32_t* w) {
    const __m512i words = _mm512_loadu_si512(w);
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_xor_si512(words, _mm512_set1_epi32(-1)), 8));
  }

  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }  // b where a is NaN
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
  static Reg fnmadd(Reg a, Reg b, Reg c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  // z - floor(z), in [0, 1); *whole is a value whose floor is floor(z) (z itself: scalef
  // floors), for scale_pow2. One vreduceps instead of a vrndscaleps (2 uops) and a sub.
  static Reg split_floor(Reg z, Reg* whole) {
    *whole = z;
#if defined(__AVX512DQ__)
    return _mm512_reduce_ps(z, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
    return _mm512_sub_ps(z, _mm512_roundscale_ps(z, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#endif
  }
  // x * 2^floor(k) for floor(k) in [-126, 127] and x in [1, 2].
  static Reg scale_pow2(Reg x, Reg k) { return _mm512_scalef_ps(x, k); }
  // floor(log2 x) for x >= 1, as a float (-inf for 0).
  static Reg exponent(Reg x) { return _mm512_getexp_ps(x); }

  static Mask no_lanes() { return 0; }
  static Mask either(Mask a, Mask b) { return static_cast<Mask>(a | b); }
  static Mask equal(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static Mask at_least(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static Mask nan_or_at_least(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ); }
  static Reg keep_or_zero(Mask m, Reg a) { return _mm512_maskz_mov_ps(m, a); }  // a where m, else 0
  static Reg select(Mask m, Reg a, Reg b) { return _mm512_mask_blend_ps(m, b, a); }  // a where m, else b
  static Reg fmadd_where(Mask m, Reg a, Reg b, Reg c) { return _mm512_mask3_fmadd_ps(a, b, c, m); }  // a*b+c where m, else c
  static Reg add_where(Mask m, Reg a, Reg b) { return _mm512_mask_add_ps(a, m, a, b); }  // a+b where m, else a
  static uint32_t bits(Mask m) { return m; }

  static float reduce_max(Reg v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(Reg v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(UNMASK_SIMD)
struct Simd {
  using Reg = __m256;
  using Mask = __m256;  // all-ones lanes, as the compares leave them
  static constexpr int kWidth = 8;

  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg load_bf16(const uint16_t* p) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  }
  static Reg load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void load_bf16_even_odd(const uint16_t* p, Reg* even, Reg* odd) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static Reg complement_high24(const uint32_t* w) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_xor_si256(words, _mm256_set1_epi32(-1)), 8));
  }

  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg fnmadd(Reg a, Reg b, Reg c) { return _mm256_fnmadd_ps(a, b, c); }
  static Reg split_floor(Reg z, Reg* whole) {
    *whole = _mm256_floor_ps(z);
    return _mm256_sub_ps(z, *whole);
  }
  // k (integral, from split_floor) added into the exponent bits: no scalef before AVX-512.
  static Reg scale_pow2(Reg x, Reg k) {
    const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(k), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(x), scale));
  }
  // The exponent field less the bias (-127 for 0).
  static Reg exponent(Reg x) {
    const __m256i biased = _mm256_srli_epi32(_mm256_castps_si256(x), 23);
    return _mm256_sub_ps(_mm256_cvtepi32_ps(biased), _mm256_set1_ps(127.0f));
  }

  static Mask no_lanes() { return _mm256_setzero_ps(); }
  static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  static Mask equal(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static Mask at_least(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static Mask nan_or_at_least(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_NLT_UQ); }
  static Reg keep_or_zero(Mask m, Reg a) { return _mm256_and_ps(m, a); }
  static Reg select(Mask m, Reg a, Reg b) { return _mm256_blendv_ps(b, a, m); }  // a where m, else b
  static Reg fmadd_where(Mask m, Reg a, Reg b, Reg c) { return _mm256_blendv_ps(c, _mm256_fmadd_ps(a, b, c), m); }
  static Reg add_where(Mask m, Reg a, Reg b) { return _mm256_add_ps(a, _mm256_and_ps(m, b)); }
  static uint32_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }

  static float reduce_max(Reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float reduce_add(Reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

#if defined(UNMASK_SIMD)
// kN vectors of 2^z for z in [-126, 126] (callers clamp: -inf and very negative scores
// become 2^-126, negligible next to a row maximum's 1), written step by step across the
// vectors: one 2^z is a chain of ~10 dependent operations (~40 cycles), and interleaving
// independent chains in program order lets the out-of-order core keep both FMA pipes
// busy (one vector at a time: 0.36 ns per element on Zen 3 with AVX2; four: 0.25).
// Each: the polynomial in r = z - floor(z), times 2^floor(z).
template <int kN>
inline void exp2_interleaved(Simd::Reg (&z)[kN]) {
  Simd::Reg k[kN], r[kN];
  for (int g = 0; g < kN; ++g) {
    r[g] = Simd::split_floor(z[g], &k[g]);
    z[g] = Simd::set1(kExp2Poly[kExp2Degree]);
  }
  for (int i = kExp2Degree - 1; i >= 0; --i) {
    for (int g = 0; g < kN; ++g) z[g] = Simd::fmadd(z[g], r[g], Simd::set1(kExp2Poly[i]));
  }
  for (int g = 0; g < kN; ++g) z[g] = Simd::scale_pow2(z[g], k[g]);
}
#endif

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
