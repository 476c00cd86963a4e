// Philox words for a run of columns of one row: sixteen generator calls per register
// with AVX-512, four with AVX2, a scalar loop elsewhere. Shared by the raw-draw kernel
// and the sampler, so the RNG tests that compare fill_draws_cpu with rng.py bit for bit
// cover this path.
#pragma once

#include "isa.h"

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "unmask/philox.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

#if defined(__AVX512F__)
namespace philox_avx512 {

// hi and lo 32-bit halves of a * b for sixteen 32-bit lanes: even and odd lanes through
// two 32x32->64 multiplies (vpmuludq), then blended back.
inline void mulhilo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// 16 * kGroups Philox blocks (quads quad_begin ...) written as 64 * kGroups consecutive
// words. The groups run in lockstep: each round is a chain of dependent multiplies, and
// independent chains keep both vector ports busy.
template <int kGroups>
inline void philox_blocks_x16(uint32_t quad_begin, uint32_t row, uint32_t offset, uint32_t stream, uint32_t key0,
                              uint32_t key1, uint32_t* out) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(philox_detail::kMul0));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(philox_detail::kMul1));
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    c0[g] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(quad_begin + 16 * g)), lane);
    c1[g] = _mm512_set1_epi32(static_cast<int>(row));
    c2[g] = _mm512_set1_epi32(static_cast<int>(offset));
    c3[g] = _mm512_set1_epi32(static_cast<int>(stream));
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(key0));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(key1));
    for (int g = 0; g < kGroups; ++g) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo(mul0, c0[g], hi0, lo0);
      mulhilo(mul1, c2[g], hi1, lo1);
      c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], k0, 0x96);  // three-way xor
      c1[g] = lo1;
      c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], k1, 0x96);
      c3[g] = lo0;
    }
    key0 += philox_detail::kWeyl0;
    key1 += philox_detail::kWeyl1;
  }
  // Interleave: word 4q + j is c_j[q]. A 4x4 transpose of 32-bit words inside each
  // 128-bit lane, then of the 128-bit lanes across the four vectors.
  for (int g = 0; g < kGroups; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(c0[g], c1[g]), t1 = _mm512_unpackhi_epi32(c0[g], c1[g]);
    const __m512i t2 = _mm512_unpacklo_epi32(c2[g], c3[g]), t3 = _mm512_unpackhi_epi32(c2[g], c3[g]);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44), b = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE), d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* group_out = out + 64 * g;
    _mm512_storeu_si512(group_out, _mm512_shuffle_i32x4(a, b, 0x88));
    _mm512_storeu_si512(group_out + 16, _mm512_shuffle_i32x4(a, b, 0xDD));
    _mm512_storeu_si512(group_out + 32, _mm512_shuffle_i32x4(c, d, 0x88));
    _mm512_storeu_si512(group_out + 48, _mm512_shuffle_i32x4(c, d, 0xDD));
  }
}

}  // namespace philox_avx512
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
namespace philox_avx2 {

// Each 32-bit state word lives in the low half of a 64-bit lane, four generators per
// register. vpmuludq reads only those low halves, so the full 64-bit product serves as
// both results: its low half is `lo` as it stands (the high half is junk that the next
// multiply ignores), and one shift gives `hi`. A round is then 2 multiplies, 2 shifts
// and 4 xors per four generators, with no blends to split and rejoin the halves.
template <int kGroups>
inline void philox_blocks_x4(uint32_t quad_begin, uint32_t row, uint32_t offset, uint32_t stream,
                             const __m256i (&round_keys)[10][2], uint32_t* out) {
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i mul0 = _mm256_set1_epi64x(philox_detail::kMul0);
  const __m256i mul1 = _mm256_set1_epi64x(philox_detail::kMul1);
  __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    c0[g] = _mm256_add_epi64(_mm256_set1_epi64x(quad_begin + 4 * g), lane);
    c1[g] = _mm256_set1_epi64x(row);
    c2[g] = _mm256_set1_epi64x(offset);
    c3[g] = _mm256_set1_epi64x(stream);
  }
  for (int round = 0; round < 10; ++round) {
    for (int g = 0; g < kGroups; ++g) {
      const __m256i product0 = _mm256_mul_epu32(c0[g], mul0);
      const __m256i product1 = _mm256_mul_epu32(c2[g], mul1);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product1, 32), c1[g]), round_keys[round][0]);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(product0, 32), c3[g]), round_keys[round][1]);
      c1[g] = product1;
      c3[g] = product0;
    }
  }
  // Words j = 0..3 of generator q go to out[4q + j]: pair (c0, c1) and (c2, c3) into
  // 64-bit lanes, then pick 128-bit quads.
  for (int g = 0; g < kGroups; ++g) {
    const __m256i low = _mm256_blend_epi32(c0[g], _mm256_slli_epi64(c1[g], 32), 0xAA);
    const __m256i high = _mm256_blend_epi32(c2[g], _mm256_slli_epi64(c3[g], 32), 0xAA);
    const __m256i even = _mm256_unpacklo_epi64(low, high);  // generators 0 and 2
    const __m256i odd = _mm256_unpackhi_epi64(low, high);   // generators 1 and 3
    uint32_t* group_out = out + 16 * g;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(group_out), _mm256_permute2x128_si256(even, odd, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(group_out + 8), _mm256_permute2x128_si256(even, odd, 0x31));
  }
}

}  // namespace philox_avx2
#endif

// out[4 * q + j] = word j of block (quad_begin + q, row, offset, stream), q < quads.
inline void philox_row_words(uint64_t seed, uint32_t row, uint32_t offset, RngStream stream, uint32_t quad_begin,
                             int64_t quads, uint32_t* out) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  int64_t q = 0;
#if defined(__AVX512F__)
  for (; q + 64 <= quads; q += 64) {
    philox_avx512::philox_blocks_x16<4>(quad_begin + static_cast<uint32_t>(q), row, offset,
                                        static_cast<uint32_t>(stream), key0, key1, out + 4 * q);
  }
  for (; q + 16 <= quads; q += 16) {
    philox_avx512::philox_blocks_x16<1>(quad_begin + static_cast<uint32_t>(q), row, offset,
                                        static_cast<uint32_t>(stream), key0, key1, out + 4 * q);
  }
#elif defined(__AVX2__)
  // The ten round keys, broadcast once: read as memory operands, they leave the 16 ymm
  // registers to three groups' state (12) and the two multipliers.
  __m256i round_keys[10][2];
  for (int round = 0; round < 10; ++round) {
    round_keys[round][0] = _mm256_set1_epi64x(key0 + round * philox_detail::kWeyl0);
    round_keys[round][1] = _mm256_set1_epi64x(key1 + round * philox_detail::kWeyl1);
  }
  for (; q + 12 <= quads; q += 12) {
    philox_avx2::philox_blocks_x4<3>(quad_begin + static_cast<uint32_t>(q), row, offset,
                                     static_cast<uint32_t>(stream), round_keys, out + 4 * q);
  }
  for (; q + 4 <= quads; q += 4) {
    philox_avx2::philox_blocks_x4<1>(quad_begin + static_cast<uint32_t>(q), row, offset,
                                     static_cast<uint32_t>(stream), round_keys, out + 4 * q);
  }
#endif
  for (; q < quads; ++q) {
    const Philox4x32 block = philox4x32_10(
        Philox4x32{{quad_begin + static_cast<uint32_t>(q), row, offset, static_cast<uint32_t>(stream)}}, key0, key1);
    for (int j = 0; j < 4; ++j) out[4 * q + j] = block.v[j];
  }
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
