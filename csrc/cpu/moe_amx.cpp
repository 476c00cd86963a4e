// moe_swiglu for bfloat16 on AMX tiles (the AMX build; unmask/moe.h, moe.cpp). The same
// plan as moe.cpp (pairs sorted by expert, each expert's weight rows read once for all
// its tokens), with the products on tiles: TDPBF16PS multiplies 16 weight rows by 16
// tokens over 32 inputs an instruction (8192 multiply-adds, against AVX-512's 16 a FMA),
// so a long prompt's call is no longer bound by the float32 FMAs (moe.cpp's floor from
// ~32 tokens per expert), and a decoding step's few tokens per expert still read each
// weight once, as a tile straight from the weight matrix.
//
// The operands: A = 16 rows of a weight matrix x 32 inputs, loaded in place (rows are the
// matrix's rows, dim or hidden elements apart; a block's last partial rows or inputs
// are copied into a zero-padded tile); B = 16 of the expert's slots x 32 inputs in the
// VNNI layout (amx_tiles.h), packed once per call. The accumulators hold 16 rows x 16
// slots: C^T of the usual token-major product, so weights need no packing.
//
// Precision. x and the weights are bfloat16, so the gate and up products are exact and
// summed in float32, as moe.cpp's. The hidden activations are float32 (moe.cpp keeps them
// so; torch's products round them to bfloat16, 2^-9 relative): each is split into three
// bfloat16 pieces, hi + mid + lo, which hold its 24 significant bits exactly (truncation
// leaves at most 16, then 8), and the down products run on all three into one float32
// accumulator: the sum of 3 hidden exact products a dot product, within the float32
// reference's rounding (tests/test_moe.py measures it). Three products where one would
// do cost the down matrix 3x its multiply-adds on tiles, still a fraction of one FMA
// pass. Values below 2^-126 count as zero on tiles (TDPBF16PS reads bfloat16 denormals
// as 0 and flushes denormal sums): an error below 2^-126 times a weight a term.
// One difference from float32 arithmetic: an infinite down weight times an activation
// that is exactly a bfloat16 (zero mid and lo pieces) adds inf + 0 * inf = NaN where
// float32 gives inf (a weight that is inf makes NaN of any zero activation anyway).
//
// Each slot's sums are taken in the same order whatever other slots share its tiles (a
// tile's column is one slot; padding columns are zero and never stored), so a token's
// result does not depend on its companions, and every bfloat16 call of this build takes
// this path, one token or many.
#include "amx_tiles.h"

#if defined(UNMASK_AMX)
#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe_parts.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace moe_detail {
namespace {

using tiles::depth_chunks;
using tiles::kDepth;
using tiles::load_depth_chunk;
using tiles::kTileRows;
constexpr int64_t kTileHalves = kTileRows * kDepth;  // bfloat16 values in one tile (1 KiB)
constexpr int kPieces = 3;                           // bfloat16 pieces of a float32 activation
// Down rows a pass (down_pass): four tile blocks.
constexpr int64_t kDownBlocks = 4;
// Work items a thread takes at a time: consecutive items, so that the rows each item
// prefetches for its successor (prefetch_ahead) are used by the same thread 7
// times in 8.
constexpr int kItemsPerGrab = 8;

// GCC's tileloadd builtin does not tell the optimiser that it reads memory: a barrier
// on both sides of writing a buffer that tile loads read (before: the previous load's
// read of it stays before the writes; after: the writes stay before the next load).
inline void tile_load_barrier() { __asm__ __volatile__("" : : : "memory"); }

// An expert's slots in runs of 16 (the columns of one B operand): expert e's groups are
// [first[e], first[e + 1]), group g's first slot is slot[g] and it holds count[g] slots.
struct Groups {
  std::vector<int64_t> first, slot, count;
  int64_t total = 0;
};

void group_slots(const Slots& slots, int64_t n_experts, Groups& groups) {
  groups.first.assign(n_experts + 1, 0);
  groups.slot.clear();
  groups.count.clear();
  for (int64_t e = 0; e < n_experts; ++e) {
    for (int64_t s = slots.first_slot[e]; s < slots.first_slot[e + 1]; s += kTileRows) {
      groups.slot.push_back(s);
      groups.count.push_back(std::min(kTileRows, slots.first_slot[e + 1] - s));
    }
    groups.first[e + 1] = static_cast<int64_t>(groups.slot.size());
  }
  groups.total = groups.first[n_experts];
}

// Into L2, the kilobyte `ahead` bfloat16 values past `block` that matches chunk c of a
// block: called with the next 16-row block (contiguous after this one), which arrives as
// one sequential stream while this one is multiplied. A tile load in place touches 16
// rows a row apart, a pattern the hardware prefetchers follow poorly (prefetching each
// row ahead, a step's down products read their weights at ~60% of the rate of moe.cpp's
// row-by-row loads).
inline void prefetch_ahead(const uint16_t* block, int64_t ahead, int64_t c) {
  // As an integer: past the matrix's end the address is outside the tensor (a prefetch
  // does not fault; pointer arithmetic there would be undefined).
  const auto next = reinterpret_cast<std::uintptr_t>(block) + (ahead + c * kTileHalves) * 2;
  for (int64_t line = 0; line < kTileHalves * 2; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T1);
  }
}

// Where the A operand of rows [0, rows) of a weight block (row_halves apart) and inputs
// [first, first + 32) is: in place when the block has 16 rows and the 32 inputs, else
// copied into `staging` with zeros past the rows and the row's end.
struct TileSource {
  const uint16_t* base;
  int64_t stride_bytes;
};

TileSource weight_tile(const uint16_t* block, int64_t row_halves, int64_t rows, int64_t first, uint16_t* staging) {
  if (rows == kTileRows && first + kDepth <= row_halves) return {block + first, row_halves * 2};
  tile_load_barrier();
  for (int64_t r = 0; r < kTileRows; ++r) {
    _mm512_storeu_si512(staging + r * kDepth, load_depth_chunk(r < rows ? block + r * row_halves : nullptr, first, row_halves));
  }
  tile_load_barrier();
  return {staging, kDepth * 2};
}

// B operands of x: group g's tokens' rows, chunk c of 32 inputs at xp + (g * chunks + c) * 512.
void pack_tokens(const MoeParams& p, const Slots& slots, const Groups& groups, int64_t g, uint16_t* xp) {
  const auto* x = static_cast<const uint16_t*>(p.x);
  const int64_t chunks = depth_chunks(p.dim);
  const uint16_t* rows[kTileRows];
  for (int64_t m = 0; m < kTileRows; ++m) {
    rows[m] = m < groups.count[g] ? x + (slots.pair_of_slot[groups.slot[g] + m] / p.per_token) * p.x_row_stride
                                  : nullptr;
  }
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i r[kTileRows];
    for (int64_t m = 0; m < kTileRows; ++m) r[m] = load_depth_chunk(rows[m], c * kDepth, p.dim);
    tiles::transpose_16x16_dwords(r);
    uint16_t* tile = xp + (g * chunks + c) * kTileHalves;
    for (int64_t i = 0; i < kTileRows; ++i) _mm512_storeu_si512(tile + i * kDepth, r[i]);
  }
}

// The three bfloat16 pieces of 16 float32 values, hi + mid + lo == v exactly for finite
// v of at least 2^-126 in magnitude, as what is left stays normal (each piece the
// truncation of what is left, so no piece overflows; below, tiles read zero anyway). A
// NaN or inf is its own hi piece with zero mid and lo (inf - inf would make NaN of an
// inf); an activation's NaN is quiet, and its quiet bit is in the hi piece.
void split_pieces(__m512 v, __m256i (&piece)[kPieces]) {
  const __m512i mask_high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i exponent = _mm512_set1_epi32(0x7F800000);
  const __mmask16 nonfinite = _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);
  __m512 rest = v;
  for (int i = 0; i < kPieces; ++i) {
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(rest), mask_high);
    piece[i] = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
    rest = _mm512_maskz_sub_ps(static_cast<__mmask16>(~nonfinite), rest, _mm512_castsi512_ps(bits));
  }
}

// B operands of the hidden activations: group g's slots' rows of `hidden`, piece i and
// chunk c of 32 at hp + ((i * groups + g) * chunks + c) * 512.
void pack_hidden(const MoeParams& p, const Groups& groups, const float* hidden, int64_t g, uint16_t* hp) {
  const int64_t chunks = depth_chunks(p.hidden);
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i r[kPieces][kTileRows];
    for (int64_t m = 0; m < kTileRows; ++m) {
      __m256i halves[2][kPieces];
      for (int h = 0; h < 2; ++h) {
        const int64_t first = c * kDepth + h * 16;
        const int64_t lanes = m < groups.count[g] ? std::clamp<int64_t>(p.hidden - first, 0, 16) : 0;
        const float* row = lanes > 0 ? hidden + (groups.slot[g] + m) * p.hidden + first : hidden;  // not read if 0
        split_pieces(_mm512_maskz_loadu_ps(static_cast<__mmask16>((uint32_t{1} << lanes) - 1), row), halves[h]);
      }
      for (int i = 0; i < kPieces; ++i) {
        r[i][m] = _mm512_inserti64x4(_mm512_castsi256_si512(halves[0][i]), halves[1][i], 1);
      }
    }
    for (int i = 0; i < kPieces; ++i) {
      tiles::transpose_16x16_dwords(r[i]);
      uint16_t* tile = hp + ((i * groups.total + g) * chunks + c) * kTileHalves;
      for (int64_t k = 0; k < kTileRows; ++k) _mm512_storeu_si512(tile + k * kDepth, r[i][k]);
    }
  }
}

// Accumulator tiles as 16 x 16 float32 (row = weight row, column = slot).
struct alignas(64) Sums {
  float v[4][kTileRows * kTileRows];
};

// A 16 x 16 float32 tile (row = weight row, column = slot) written transposed: rows
// [0, rows) of column m to out + m * row_stride, for the first `count` columns.
void store_transposed(const float* tile, int64_t rows, int64_t count, float* out, int64_t row_stride) {
  __m512i r[kTileRows];
  for (int64_t i = 0; i < kTileRows; ++i) r[i] = _mm512_load_si512(tile + i * kTileRows);
  tiles::transpose_16x16_dwords(r);
  const auto row_mask = static_cast<__mmask16>((uint32_t{1} << rows) - 1);
  for (int64_t m = 0; m < count; ++m) _mm512_mask_storeu_ps(out + m * row_stride, row_mask, _mm512_castsi512_ps(r[m]));
}

// hidden rows [j0, j0 + rows) of expert e for all its slots: tiles 0-3 gate and up sums
// of two groups, 4 and 5 the gate and up rows, 6 and 7 the groups' tokens.
void gate_up_block(const MoeParams& p, const Groups& groups, const uint16_t* xp, int64_t e, int64_t j0, int64_t rows,
                   float* hidden, uint16_t* staging, Sums& sums) {
  const int64_t chunks = depth_chunks(p.dim);
  const int64_t offset = (e * p.hidden + j0) * p.dim;
  const uint16_t* gate = static_cast<const uint16_t*>(p.gate) + offset;
  const uint16_t* up = static_cast<const uint16_t*>(p.up) + offset;
  for (int64_t g = groups.first[e]; g < groups.first[e + 1]; g += 2) {
    const bool two = g + 1 < groups.first[e + 1];
    const bool first = g == groups.first[e];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      if (first) {
        prefetch_ahead(gate, kTileRows * p.dim, c);  // the next block's
        prefetch_ahead(up, kTileRows * p.dim, c);
      }
      const TileSource a_gate = weight_tile(gate, p.dim, rows, c * kDepth, staging);
      _tile_loadd(4, a_gate.base, a_gate.stride_bytes);
      const TileSource a_up = weight_tile(up, p.dim, rows, c * kDepth, staging + kTileHalves);
      _tile_loadd(5, a_up.base, a_up.stride_bytes);
      _tile_loadd(6, xp + (g * chunks + c) * kTileHalves, kDepth * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      if (two) {
        _tile_loadd(7, xp + ((g + 1) * chunks + c) * kTileHalves, kDepth * 2);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, sums.v[0], kTileRows * 4);
    _tile_stored(1, sums.v[1], kTileRows * 4);
    _tile_stored(2, sums.v[2], kTileRows * 4);
    _tile_stored(3, sums.v[3], kTileRows * 4);
    for (int pair = 0; pair < (two ? 2 : 1); ++pair) {
      float* gate_sums = sums.v[2 * pair];
      const float* up_sums = sums.v[2 * pair + 1];
#pragma omp simd
      for (int64_t i = 0; i < kTileRows * kTileRows; ++i) gate_sums[i] = swiglu(gate_sums[i], up_sums[i]);
      store_transposed(gate_sums, rows, groups.count[g + pair], hidden + groups.slot[g + pair] * p.hidden + j0, p.hidden);
    }
  }
}

// routed rows [i0, i0 + rows) of expert e's slots, rows <= 64: four 16-row blocks of
// down rows against one group's pieces at a time, the three pieces loaded once a chunk
// for the four blocks' products. Tiles 0-3 the blocks' sums (hi, mid and lo products in
// one accumulator), 4 a block's rows, 5-7 the pieces. At a step's one group an expert
// the pieces are most of what the tiles load (three 1 KiB tiles a chunk against one of
// weights a block); one block a pass read the down weights at 70% of the read rate.
void down_pass(const MoeParams& p, const Groups& groups, const uint16_t* hp, int64_t e, int64_t i0, int64_t rows,
               float* routed, uint16_t* staging, Sums& sums) {
  const int64_t chunks = depth_chunks(p.hidden);
  const uint16_t* down = static_cast<const uint16_t*>(p.down) + (e * p.dim + i0) * p.hidden;
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  const int64_t block_halves = kTileRows * p.hidden;
  const int64_t piece_stride = groups.total * chunks * kTileHalves;
  auto block_tile = [&](int64_t block, int64_t c) {
    return weight_tile(down + block * block_halves, p.hidden, std::min(kTileRows, rows - block * kTileRows), c * kDepth,
                       staging);
  };
  for (int64_t g = groups.first[e]; g < groups.first[e + 1]; ++g) {
    const bool first_group = g == groups.first[e];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      if (first_group) {
        for (int64_t block = 0; block < kDownBlocks; ++block) {
          prefetch_ahead(down, (kDownBlocks + block) * block_halves, c);  // the next pass's
        }
      }
      const uint16_t* pieces = hp + (g * chunks + c) * kTileHalves;
      _tile_loadd(5, pieces, kDepth * 2);
      _tile_loadd(6, pieces + piece_stride, kDepth * 2);
      _tile_loadd(7, pieces + 2 * piece_stride, kDepth * 2);
      // Unrolled by hand: a tile register is an immediate of the instruction (the
      // intrinsics paste its number into the assembly).
      TileSource a = block_tile(0, c);
      _tile_loadd(4, a.base, a.stride_bytes);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(0, 4, 7);
      if (blocks > 1) {
        a = block_tile(1, c);
        _tile_loadd(4, a.base, a.stride_bytes);
        _tile_dpbf16ps(1, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (blocks > 2) {
        a = block_tile(2, c);
        _tile_loadd(4, a.base, a.stride_bytes);
        _tile_dpbf16ps(2, 4, 5);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (blocks > 3) {
        a = block_tile(3, c);
        _tile_loadd(4, a.base, a.stride_bytes);
        _tile_dpbf16ps(3, 4, 5);
        _tile_dpbf16ps(3, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
      }
    }
    _tile_stored(0, sums.v[0], kTileRows * 4);
    _tile_stored(1, sums.v[1], kTileRows * 4);
    _tile_stored(2, sums.v[2], kTileRows * 4);
    _tile_stored(3, sums.v[3], kTileRows * 4);
    for (int64_t block = 0; block < blocks; ++block) {
      store_transposed(sums.v[block], std::min(kTileRows, rows - block * kTileRows), groups.count[g],
                       routed + groups.slot[g] * p.dim + i0 + block * kTileRows, p.dim);
    }
  }
}

}  // namespace

void moe_swiglu_bf16_amx(const MoeParams& p, const Slots& slots, float* hidden, float* routed) {
  // The calling thread's buffers, kept from call to call up to kKeptBufferBytes.
  static thread_local Groups kept_groups;
  static thread_local Scratch<uint16_t> packed_tokens, packed_hidden;
  // By reference: inside the parallel region the name of a thread_local is each thread's own.
  Groups& groups = kept_groups;
  group_slots(slots, p.n_experts, groups);
  const int64_t dim_chunks = depth_chunks(p.dim), hidden_chunks = depth_chunks(p.hidden);
  uint16_t* xp = packed_tokens.take(groups.total * dim_chunks * kTileHalves);
  uint16_t* hp = packed_hidden.take(kPieces * groups.total * hidden_chunks * kTileHalves);
  const std::vector<Item> gate_items = items_of(slots, p.n_experts, p.hidden, kTileRows);
  const std::vector<Item> down_items = items_of(slots, p.n_experts, p.dim, kDownBlocks * kTileRows);
  const int64_t gate_count = static_cast<int64_t>(gate_items.size());
  const int64_t down_count = static_cast<int64_t>(down_items.size());
  const int64_t macs = p.tokens * p.per_token * p.hidden * p.dim * 3;
#pragma omp parallel if (macs >= kParallelMacs)
  {
    tiles::configure_tiles(8);
    alignas(64) uint16_t staging[2 * kTileHalves];  // a block's partial tiles (weight_tile)
    Sums sums;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups.total; ++g) pack_tokens(p, slots, groups, g, xp);
    tile_load_barrier();
#pragma omp for schedule(dynamic, kItemsPerGrab)
    for (int64_t item = 0; item < gate_count; ++item) {
      const Item& it = gate_items[item];
      gate_up_block(p, groups, xp, it.expert, it.row_begin, it.row_end - it.row_begin, hidden, staging, sums);
    }
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups.total; ++g) pack_hidden(p, groups, hidden, g, hp);
    tile_load_barrier();
#pragma omp for schedule(dynamic, kItemsPerGrab)
    for (int64_t item = 0; item < down_count; ++item) {
      const Item& it = down_items[item];
      down_pass(p, groups, hp, it.expert, it.row_begin, it.row_end - it.row_begin, routed, staging, sums);
    }
    _tile_release();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) weighted_sum(p, slots, routed, t);
  }
  packed_tokens.release_if_large();
  packed_hidden.release_if_large();
}

}  // namespace moe_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
#endif  // UNMASK_AMX
