// Small math helpers written so that GCC and Clang vectorise the loops that call them
// (std::exp does not vectorise without -ffast-math, which would also drop the NaN
// checks the sampler relies on).
#pragma once

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>  // _BitScanForward
#endif

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline int lowest_set_bit(uint32_t bits) {  // bits != 0
#if defined(_MSC_VER) && !defined(__clang__)
  unsigned long index;
  _BitScanForward(&index, bits);
  return static_cast<int>(index);
#else
  return __builtin_ctz(bits);
#endif
}

inline int set_bit_count(uint32_t bits) {
#if defined(_MSC_VER) && !defined(__clang__)
  return static_cast<int>(__popcnt(bits));
#else
  return __builtin_popcount(bits);
#endif
}

inline float bf16_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

// IEEE half to float without branches on the common path: normals and zeros by
// rebiasing the exponent, subnormals through a float multiply, inf/NaN by forcing the
// exponent to all ones.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // mantissa * 2^-24
  } else if (exponent == 31) {
    magnitude = bits_to_float(0x7F800000u | (mantissa << 13));
  } else {
    magnitude = bits_to_float(((exponent + 112u) << 23) | (mantissa << 13));
  }
  return bits_to_float(float_to_bits(magnitude) | sign);
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^r on [0, 1): a degree-5 polynomial fitted for minimax relative error with 2^0
// exactly 1, so a softmax row's maximum adds exactly 1 to its sum: 7.4e-8 in exact
// arithmetic, 1.8e-7 after float Horner rounding (the same as on [-0.5, 0.5]: relative
// error is shift-invariant for 2^x). Degree 6 measured 12% slower in the sampler for
// error that float sums cannot see. The softmaxes work in base 2 (scores pre-multiplied
// by log2 e), which saves the multiply of an e^x range reduction. The range reduction
// uses floor rather than round-to-nearest because AVX-512 then needs two instructions
// for it: vreduceps (z - floor z) and vscalefps (times 2^floor z).
constexpr int kExp2Degree = 5;
constexpr float kExp2Poly[kExp2Degree + 1] = {1.0f, 0.69315105676651f, 0.24016660451889038f,
                                              0.05579448491334915f, 0.009022697806358337f, 0.001865033758804202f};

// 2^z for z < 127 (below -126, and -inf, give 2^-126: negligible next to a softmax
// row's maximum). Written so that `omp simd` loops vectorise it.
inline float exp2_poly(float z) {
  z = std::max(z, -126.0f);
  const float k = std::floor(z);
  const float r = z - k;
  float p = kExp2Poly[kExp2Degree];
  for (int i = kExp2Degree - 1; i >= 0; --i) p = p * r + kExp2Poly[i];
  return bits_to_float(float_to_bits(p) + (static_cast<uint32_t>(static_cast<int32_t>(k)) << 23));
}

// Monotone map of a float to uint32: a > b  <=>  key(a) > key(b) (NaN excluded; -0
// and +0 share a key, as they compare equal). Radix selection on these keys finds the
// k-th largest logit without sorting.
inline uint32_t order_key(float value) {
  const uint32_t bits = value == 0.0f ? 0u : float_to_bits(value);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_to_float(uint32_t key) {
  return bits_to_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h

// float -> bfloat16 bits, round to nearest even (NaN stays NaN).
inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// float -> IEEE half bits, round to nearest even, with overflow to inf and subnormals.
inline uint16_t float_to_fp16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7E00u;                 // NaN
  if (magnitude >= 0x477FF000u) return sign | 0x7C00u;                // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) {                                      // below 2^-14: subnormal half
    const float scaled = bits_to_float(magnitude) * 16777216.0f;      // value * 2^24, exact
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));      // current mode: nearest even
  }
  const uint32_t rebiased = magnitude - 0x38000000u;                  // exponent bias 127 -> 15
  const uint32_t rounded = rebiased + 0xFFFu + ((rebiased >> 13) & 1u);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
