// What the AMX build's tile kernels share (attention_amx.cpp, moe_amx.cpp): whether this
// build has AMX, the tile shape, the tile configuration and the 32-bit transpose that
// puts operands in the "VNNI" layout TDPBF16PS reads its second operand in.
//
// TDPBF16PS C, A, B: C[m][n] += sum over k of A[m][k] * B[k][n] for a 16 x 32 bfloat16
// A (16 rows of 64 bytes) and a 32 x 16 bfloat16 B stored as 16 rows of 16 pairs (row i
// holds B[2i][n], B[2i + 1][n] for each n): 8192 multiply-adds an instruction into 16 x 16
// float32 accumulators, with bfloat16 inputs below 2^-126 read as zero.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define UNMASK_AMX 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "isa.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace tiles {

constexpr int64_t kTileRows = 16;  // rows of a tile (64 bytes each)
constexpr int64_t kDepth = 32;     // bfloat16 values in a tile row: one product's depth

// Chunks of kDepth values that n values fill (the last one padded with zeros).
inline int64_t depth_chunks(int64_t n) { return (n + kDepth - 1) / kDepth; }

// 32 bfloat16 values of a row from `first` on, zero past `width` (the padding) or for a
// null row.
inline __m512i load_depth_chunk(const uint16_t* row, int64_t first, int64_t width) {
  if (row == nullptr) return _mm512_setzero_si512();
  const int64_t lanes = std::clamp<int64_t>(width - first, 0, kDepth);
  if (lanes == kDepth) return _mm512_loadu_si512(row + first);
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << lanes) - 1), row + first);
}

// The layout of LDTILECFG's 64-byte operand (Intel SDM vol. 1, 18.2).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 .. count - 1 as 16 rows of 64 bytes. Per thread: the configuration is thread
// state, and each thread that configures ends with _tile_release().
inline void configure_tiles(int count) {
  TileConfig config;
  for (int tile = 0; tile < count; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = kTileRows;
  }
  // GCC's ldtilecfg builtin does not tell the optimiser it reads the operand: without this
  // barrier -O3 dropped the stores above and configured zero-sized tiles (tilezero: SIGILL).
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[i] is row i): 32-bit
// and 64-bit interleaves within 128-bit lanes, then two rounds of lane shuffles. On 16
// rows of 16 bfloat16 pairs it gives a B operand: row i of the result holds pair i of
// every input row.
inline void transpose_16x16_dwords(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4k + c], lane L: column 4L + c of rows 4k .. 4k + 3.
  for (int k = 0; k < 16; k += 4) {
    b[k] = _mm512_unpacklo_epi64(a[k], a[k + 2]);
    b[k + 1] = _mm512_unpackhi_epi64(a[k], a[k + 2]);
    b[k + 2] = _mm512_unpacklo_epi64(a[k + 1], a[k + 3]);
    b[k + 3] = _mm512_unpackhi_epi64(a[k + 1], a[k + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i low01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i low23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i high23 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(low01, low23, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(high01, high23, 0xDD);
  }
}

}  // namespace tiles
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
#endif  // AMX, AMX-BF16 and AVX512-BF16
