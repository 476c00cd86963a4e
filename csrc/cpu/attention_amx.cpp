// bfloat16 attention on AMX tiles (Intel Advanced Matrix Extensions, Sapphire Rapids and
// later): the AMX build's kernel for bfloat16 inputs. The same FlashAttention-2 tiling as
// attention.cpp (online softmax over key tiles of kKeyTile, float32 scores, sums and
// output), with both products as AMX tile dot products: TDPBF16PS multiplies a 16 x 32
// bfloat16 tile by a 32 x 16 one into 16 x 16 float32 accumulators, 8192 multiply-adds an
// instruction, about 8x the float32 FMA rate of AVX-512 (a bf16 [2048]^2 matmul measured
// 2.4 TFLOP/s on 2 cores against 0.34 in float32).
//
// S = Q K^T: A = 16 query rows x 32 dims of Q (read in place from the task's copy),
//   B = K in the "VNNI" layout AMX expects: for 16 keys and 32 dims, row i holds dims
//   (2i, 2i + 1) of each key, so a tile is the 16 keys' rows transposed as 32-bit pairs.
// O += P V: A = 16 query rows x 32 keys of P (the softmax's weights rounded to bfloat16,
//   as FlashAttention does on GPUs), B = V in VNNI layout: row i holds keys (2i, 2i + 1)
//   of 16 dims, interleaved.
// Scores are scaled in float32 after the product (Q times scale in bfloat16 would round
// the scores by 2^-9 relative), and the row sums are of the float32 weights.
// Head dims pad to a multiple of 32 with zeros (Q and K: zero products; V: columns never
// stored). Tile registers: 0-3 accumulators, 4 the A operand, 5 the B operand.
#include "attention_tiles.h"

#if defined(UNMASK_AMX)
#include <cstdint>

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace attention_detail {
namespace {

using Halves = std::vector<uint16_t, CacheLineAllocator<uint16_t>>;
using tiles::kDepth;
using tiles::load_depth_chunk;
using tiles::kTileRows;
using tiles::transpose_16x16_dwords;
constexpr int64_t kKeyBlocks = kKeyTile / kTileRows;
// A multiple of 16 rows; the task's Q, S, P and O tiles (~100 KiB at D = 128) stay in L2.
constexpr int64_t kAmxQueryTile = 128;

int64_t padded_dim(int64_t dim) { return tiles::depth_chunks(dim) * kDepth; }

void configure_tiles() { tiles::configure_tiles(6); }

// The rows of K and V of key tile t of (batch b, kv head h), read in place by the packing
// below: null for hidden keys and those past k_len, which are never read (a cache's stale
// rows may hold NaN) and pack as zeros.
struct KeyTileRows {
  const uint16_t* k[kKeyTile];
  const uint16_t* v[kKeyTile];
};

KeyTileRows key_tile_rows(const AttentionParams& p, const float* bias, int64_t b, int64_t h, int64_t t) {
  KeyTileRows rows;
  const auto* k = static_cast<const uint16_t*>(p.k);
  const auto* v = static_cast<const uint16_t*>(p.v);
  for (int64_t j = 0; j < kKeyTile; ++j) {
    const int64_t key = t * kKeyTile + j;
    const bool visible = bias[j] == 0.0f;
    rows.k[j] = visible ? k + row_offset(p.k_stride, b, key, h) : nullptr;
    rows.v[j] = visible ? v + row_offset(p.v_stride, b, key, h) : nullptr;
  }
  return rows;
}

// K as B operands of S = Q K^T: tile (chunk c, key block n) at kt + (n * chunks + c) * 512,
// 16 rows of 64 bytes.
void pack_keys(const KeyTileRows& rows, int64_t dim, int64_t dp, uint16_t* kt) {
  const int64_t chunks = dp / kDepth;
  for (int64_t n = 0; n < kKeyBlocks; ++n) {
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = load_depth_chunk(rows.k[n * kTileRows + j], c * kDepth, dim);
      transpose_16x16_dwords(r);
      uint16_t* tile = kt + (n * chunks + c) * kTileRows * kDepth;
      for (int i = 0; i < 16; ++i) _mm512_store_si512(tile + i * kDepth, r[i]);
    }
  }
}

// V as B operands of O += P V: tile (key chunk kc, column chunk n of 16 dims) at
// v + (n * 32 + 16 kc) * 32, 16 rows of 64 bytes; row i interleaves keys 2i and 2i + 1.
// Returns the last key of the tile whose V holds an inf or NaN (-1: none), for
// accumulate_cut_block.
int64_t pack_values(const KeyTileRows& rows, int64_t dim, int64_t dp, uint16_t* v) {
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  const __m512i exponent = _mm512_set1_epi16(0x7F80);  // all ones: inf or NaN
  constexpr int64_t kPairs = kKeyTile / 2;
  int64_t last_nonfinite = -1;
  for (int64_t i = 0; i < kPairs; ++i) {
    for (int64_t d = 0; d < dp; d += kDepth) {
      const __m512i a = load_depth_chunk(rows.v[2 * i], d, dim), b = load_depth_chunk(rows.v[2 * i + 1], d, dim);
      if (_mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exponent), exponent) != 0) {
        last_nonfinite = 2 * i + 1;
      } else if (_mm512_cmpeq_epi16_mask(_mm512_and_si512(a, exponent), exponent) != 0) {
        last_nonfinite = std::max(last_nonfinite, 2 * i);
      }
      const int64_t n = d / 16;
      _mm512_store_si512(v + (n * kPairs + i) * kDepth, _mm512_permutex2var_epi16(a, low, b));
      _mm512_store_si512(v + ((n + 1) * kPairs + i) * kDepth, _mm512_permutex2var_epi16(a, high, b));
    }
  }
  return last_nonfinite;
}

// Returns pack_values' last key with a non-finite V.
int64_t pack_key_tile(const AttentionParams& p, const float* bias, int64_t b, int64_t h, int64_t t, int64_t dp,
                      uint16_t* kt, uint16_t* v) {
  const KeyTileRows rows = key_tile_rows(p, bias, b, h, t);
  pack_keys(rows, p.head_dim, dp, kt);
  return pack_values(rows, p.head_dim, dp, v);
}

struct AmxTask {
  Halves q, p, kt, v;  // Q [rows][dp], P [rows][kKeyTile], one packed key tile
  Halves masked_v;     // a packed V tile with a cut block's later keys zero (accumulate_cut_block)
  AlignedFloats s, o;            // S [rows][kKeyTile], O [rows][dp]
  AlignedFloats row_sums;        // [rows][16]: each row's sum of weights, in 16 partial sums
  std::vector<float> row_max, alpha;
  std::vector<int64_t> row_keys;
};

// S[16m .. 16m + 15][0 .. 63] = Q K^T for one 16-row block.
void scores(const uint16_t* q, int64_t dp, const uint16_t* kt, float* s) {
  const int64_t chunks = dp / kDepth;
  constexpr int64_t kTileBytes = kTileRows * kDepth;  // halves per packed tile
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, q + c * kDepth, dp * 2);
    _tile_loadd(5, kt + (0 * chunks + c) * kTileBytes, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, kt + (1 * chunks + c) * kTileBytes, 64);
    _tile_dpbf16ps(1, 4, 5);
    _tile_loadd(5, kt + (2 * chunks + c) * kTileBytes, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(5, kt + (3 * chunks + c) * kTileBytes, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  constexpr int64_t kRowBytes = kKeyTile * 4;
  _tile_stored(0, s + 0 * kTileRows, kRowBytes);
  _tile_stored(1, s + 1 * kTileRows, kRowBytes);
  _tile_stored(2, s + 2 * kTileRows, kRowBytes);
  _tile_stored(3, s + 3 * kTileRows, kRowBytes);
}

// O[16 rows][64 columns from column chunk `first`] += P V over the tile's keys for one
// 16-row block (up to four chunks of 16 columns): O's rows are the accumulator tiles,
// loaded and stored in place, so P V needs no buffer and no vector pass of its own.
void accumulate_values(const uint16_t* p, const uint16_t* v, int64_t first, int64_t count, float* o, int64_t dp) {
  constexpr int64_t kPairs = kKeyTile / 2;
  constexpr int64_t kChunkHalves = kPairs * kDepth;  // one column chunk of packed V
  const int64_t stride = dp * 4;
  float* block = o + first * 16;
  _tile_loadd(0, block, stride);
  _tile_loadd(1, block + 16, stride);
  if (count > 2) {
    _tile_loadd(2, block + 32, stride);
    _tile_loadd(3, block + 48, stride);
  }
  for (int64_t kc = 0; kc < kKeyTile / kDepth; ++kc) {
    _tile_loadd(4, p + kc * kDepth, kKeyTile * 2);
    const uint16_t* column = v + (first * kPairs + kc * kTileRows) * kDepth;
    _tile_loadd(5, column, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, column + kChunkHalves, 64);
    _tile_dpbf16ps(1, 4, 5);
    if (count > 2) {
      _tile_loadd(5, column + 2 * kChunkHalves, 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(5, column + 3 * kChunkHalves, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, block, stride);
  _tile_stored(1, block + 16, stride);
  if (count > 2) {
    _tile_stored(2, block + 32, stride);
    _tile_stored(3, block + 48, stride);
  }
}

// A 16-row block that the block-causal diagonal cuts: its first row sees the tile's keys
// below `shared` only. The tile product multiplies every row by every key of a chunk, and
// a row must not meet a V it gives weight 0 (0 times a NaN or inf V is NaN, and a
// cache's later blocks may hold anything): the product takes the keys every row sees,
// from a copy of V with the later keys zero, and each row adds the later keys it sees
// (row_keys) on the vector unit, from the packed V (keys 2i and 2i + 1 interleaved).
// Slow, and taken only where such a key's V holds an inf or NaN (pack_values reports
// it): elsewhere 0 times V adds 0, and the tile product over every key is exact.
void accumulate_cut_block(const uint16_t* p, const uint16_t* v, int64_t shared, const int64_t* row_keys,
                          int64_t block_rows, float* o, int64_t dp, Halves& masked_v) {
  constexpr int64_t kPairs = kKeyTile / 2;
  const int64_t column_chunks = dp / 16;
  masked_v.assign(v, v + kKeyTile * dp);
  for (int64_t n = 0; n < column_chunks; ++n) {
    for (int64_t i = shared / 2; i < kPairs; ++i) {
      uint16_t* pair = masked_v.data() + (n * kPairs + i) * kDepth;
      for (int64_t e = 0; e < kDepth; ++e) {
        if (2 * i + (e & 1) >= shared) pair[e] = 0;
      }
    }
  }
  for (int64_t first = 0; first < column_chunks; first += 4) {
    accumulate_values(p, masked_v.data(), first, std::min<int64_t>(4, column_chunks - first), o, dp);
  }
  for (int64_t r = 0; r < block_rows; ++r) {
    float* orow = o + r * dp;
    for (int64_t j = shared; j < row_keys[r]; ++j) {
      const float w = cpu::bf16_to_float(p[r * kKeyTile + j]);
      for (int64_t d = 0; d < dp; ++d) {
        orow[d] += w * cpu::bf16_to_float(v[((d / 16) * kPairs + j / 2) * kDepth + (d % 16) * 2 + (j & 1)]);
      }
    }
  }
}

// 2^r on [0, 1) to 7.5e-5 relative (a degree-3 minimax fit; float32 exp2's degree 5 is
// 2.6e-6): enough for weights that are rounded to bfloat16 (2^-9) before P V, and the sum
// of the same values normalises them. Two FMAs a vector fewer in the kernel's busiest loop.
constexpr float kWeightPoly[4] = {0.99992514f, 0.69583398f, 0.22606707f, 0.07802403f};

template <int kN>
void exp2_weights(__m512 (&z)[kN]) {
  __m512 whole[kN], r[kN];
  for (int g = 0; g < kN; ++g) {
    whole[g] = _mm512_roundscale_ps(z[g], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    r[g] = _mm512_sub_ps(z[g], whole[g]);
    z[g] = _mm512_set1_ps(kWeightPoly[3]);
  }
  for (int i = 2; i >= 0; --i) {
    for (int g = 0; g < kN; ++g) z[g] = _mm512_fmadd_ps(z[g], r[g], _mm512_set1_ps(kWeightPoly[i]));
  }
  for (int g = 0; g < kN; ++g) z[g] = _mm512_scalef_ps(z[g], whole[g]);
}

// The online softmax of one row of S, in registers: scaled to base 2, masked (columns
// from visible_columns on, and keys the bias hides: a select, so a hidden key's NaN score
// is -inf too), the running maximum and the row's 16 partial sums updated, and the
// weights written to prow as bfloat16. The rules on NaN, on weights below 2^-126, on
// rows that have seen no key yet and on the lazy maximum (kMaxSlack) are those of
// attention_tiles.h's online_softmax_row, here with the scale and the bfloat16 weights.
void softmax_row(const float* srow, float scale, const float* bias, int64_t visible_columns, float& row_max,
                 float* row_sums, float& alpha, uint16_t* prow) {
  constexpr int kVecs = kKeyTile / 16;
  const __m512 minus_inf = _mm512_set1_ps(-kInf);
  __m512 x[kVecs];
  __m512 max = minus_inf;
  for (int c = 0; c < kVecs; ++c) {
    x[c] = _mm512_mul_ps(_mm512_load_ps(srow + 16 * c), _mm512_set1_ps(scale));
    if (visible_columns < kKeyTile) {
      const int64_t lanes = std::clamp<int64_t>(visible_columns - 16 * c, 0, 16);
      x[c] = _mm512_mask_mov_ps(minus_inf, static_cast<__mmask16>((uint32_t{1} << lanes) - 1), x[c]);
    }
    if (bias != nullptr) {
      x[c] = _mm512_mask_mov_ps(minus_inf, _mm512_cmp_ps_mask(_mm512_load_ps(bias + 16 * c), _mm512_setzero_ps(),
                                                              _CMP_EQ_OQ), x[c]);
    }
    max = _mm512_max_ps(x[c], max);  // a NaN score leaves the maximum alone
  }
  alpha = 1.0f;
  if (row_max == -kInf || _mm512_cmp_ps_mask(max, _mm512_set1_ps(row_max + kMaxSlack), _CMP_GT_OQ) != 0) {
    const float new_max = std::max(row_max, _mm512_reduce_max_ps(max));
    if (new_max == -kInf) {  // no key seen yet: contributes nothing, unless its scores are NaN
      __mmask16 nan = 0;
      for (int c = 0; c < kVecs; ++c) nan |= _mm512_cmp_ps_mask(x[c], x[c], _CMP_UNORD_Q);
      if (nan != 0) row_sums[0] = kNaN;
      std::fill(prow, prow + kKeyTile, uint16_t{0});
      return;
    }
    const float shift = row_max - new_max;
    alpha = shift >= -126.0f ? cpu::exp2_poly(shift) : 0.0f;
    row_max = new_max;
  }
  const __m512 lowest = _mm512_set1_ps(-126.0f);
  __m512 z[kVecs], e[kVecs];
  for (int c = 0; c < kVecs; ++c) {
    z[c] = _mm512_sub_ps(x[c], _mm512_set1_ps(row_max));
    e[c] = _mm512_max_ps(lowest, z[c]);  // NaN where z is NaN
  }
  exp2_weights(e);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < kVecs; ++c) {
    e[c] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z[c], lowest, _CMP_NLT_UQ), e[c]);
    sum = _mm512_add_ps(sum, e[c]);
  }
  for (int c = 0; c < kVecs; c += 2) _mm512_store_si512(prow + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(e[c + 1], e[c]));
  _mm512_store_ps(row_sums, _mm512_fmadd_ps(_mm512_load_ps(row_sums), _mm512_set1_ps(alpha), sum));
}

// packed_nonfinite: pack_values' last key with a non-finite V, per packed tile.
void attend_query_tile(const AttentionParams& p, const Packed& packed, const Halves& packed_kt,
                       const Halves& packed_v, const std::vector<int64_t>& packed_nonfinite, int64_t b, int64_t h,
                       int64_t q_begin, bool pack_locally, AmxTask& task) {
  const int64_t dim = p.head_dim, dp = padded_dim(dim), tiles = key_tiles(p);
  const int64_t rows = std::min(kAmxQueryTile, p.q_len - q_begin);
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const auto* q = static_cast<const uint16_t*>(p.q);
  for (int64_t r = 0; r < blocks * kTileRows; ++r) {
    uint16_t* q_row = task.q.data() + r * dp;
    int64_t copied = 0;
    if (r < rows) {
      std::memcpy(q_row, q + row_offset(p.q_stride, b, q_begin + r, h), dim * 2);
      copied = dim;
    }
    std::fill(q_row + copied, q_row + dp, uint16_t{0});
  }
  std::fill(task.p.begin() + rows * kKeyTile, task.p.begin() + blocks * kTileRows * kKeyTile, uint16_t{0});
  std::fill(task.o.begin(), task.o.begin() + blocks * kTileRows * dp, 0.0f);
  std::fill(task.row_max.begin(), task.row_max.begin() + rows, -kInf);
  std::fill(task.row_sums.begin(), task.row_sums.begin() + rows * 16, 0.0f);
  const float scale = p.scale * cpu::kLog2e;
  const int64_t tile_halves = kKeyTile * dp;

  for (int64_t t = 0; t < tiles; ++t) {
    const KeyTile tile = key_tile(p, packed, b, t, q_begin, rows);
    if (tile.hidden()) continue;
    const uint16_t* kt = task.kt.data();
    const uint16_t* v = task.v.data();
    int64_t last_nonfinite;
    if (pack_locally) {
      last_nonfinite = pack_key_tile(p, tile.bias, b, kv_head, t, dp, task.kt.data(), task.v.data());
    } else {
      const int64_t index = (b * p.kv_heads + kv_head) * tiles + t;
      kt = packed_kt.data() + index * tile_halves;
      v = packed_v.data() + index * tile_halves;
      last_nonfinite = packed_nonfinite[index];
    }
    if (tile.causal == TileVisibility::kPartial) {
      causal_row_keys(p, tile, q_begin, rows, task.row_keys.data());
    } else {
      std::fill(task.row_keys.begin(), task.row_keys.begin() + rows, kKeyTile);
    }
    for (int64_t m = 0; m < blocks; ++m) {
      float* s = task.s.data() + m * kTileRows * kKeyTile;
      scores(task.q.data() + m * kTileRows * dp, dp, kt, s);
      for (int64_t r = m * kTileRows; r < std::min(rows, (m + 1) * kTileRows); ++r) {
        softmax_row(task.s.data() + r * kKeyTile, scale, tile.key_masked() ? tile.bias : nullptr, task.row_keys[r],
                    task.row_max[r], task.row_sums.data() + r * 16, task.alpha[r], task.p.data() + r * kKeyTile);
      }
      for (int64_t r = m * kTileRows; r < std::min(rows, (m + 1) * kTileRows); ++r) {
        if (task.alpha[r] == 1.0f) continue;  // most rows of most tiles (kMaxSlack)
        float* orow = task.o.data() + r * dp;
        const __m512 alpha = _mm512_set1_ps(task.alpha[r]);
        for (int64_t d = 0; d < dp; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(alpha, _mm512_load_ps(orow + d)));
      }
      const int64_t column_chunks = dp / 16, first_row = m * kTileRows;
      const int64_t block_rows = std::min(rows, first_row + kTileRows) - first_row;
      // Only where a key some row does not see holds an inf or NaN V: elsewhere 0 times V is 0.
      if (tile.causal == TileVisibility::kPartial && last_nonfinite >= task.row_keys[first_row]) {
        accumulate_cut_block(task.p.data() + first_row * kKeyTile, v, task.row_keys[first_row],
                             task.row_keys.data() + first_row, block_rows, task.o.data() + first_row * dp, dp,
                             task.masked_v);
        continue;
      }
      for (int64_t first = 0; first < column_chunks; first += 4) {
        accumulate_values(task.p.data() + first_row * kKeyTile, v, first, std::min<int64_t>(4, column_chunks - first),
                          task.o.data() + first_row * dp, dp);
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const float sum = _mm512_reduce_add_ps(_mm512_load_ps(task.row_sums.data() + r * 16));
    store_output_row(p, b, q_begin + r, h, sum, task.o.data() + r * dp);
  }
}

}  // namespace

Status attention_amx_bf16(const AttentionParams& p, Packed& packed) {
  const int64_t dp = padded_dim(p.head_dim), tiles = key_tiles(p);
  const int64_t query_tiles = (p.q_len + kAmxQueryTile - 1) / kAmxQueryTile;
  // As in attention.cpp: a short query block packs its key tiles in the task, longer ones
  // share one pack across their query tiles.
  const bool pack_locally = query_tiles == 1;
  pack_masks(p, packed, /*keys_too=*/false);
  static Halves packed_kt, packed_v;  // guarded by the caller's pack mutex, like `packed`
  static std::vector<int64_t> packed_nonfinite;
  if (!pack_locally) {
    const size_t halves = static_cast<size_t>(p.batch * p.kv_heads * tiles * kKeyTile * dp);
    fit_pack(packed_kt, halves);
    fit_pack(packed_v, halves);
    packed_nonfinite.resize(static_cast<size_t>(p.batch * p.kv_heads * tiles));
#pragma omp parallel for collapse(3) schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t h = 0; h < p.kv_heads; ++h) {
          const int64_t index = (b * p.kv_heads + h) * tiles + t, offset = index * kKeyTile * dp;
          packed_nonfinite[index] = pack_key_tile(p, packed.key_bias.data() + b * tiles * kKeyTile + t * kKeyTile,
                                                  b, h, t, dp, packed_kt.data() + offset, packed_v.data() + offset);
        }
      }
    }
  }
  const int64_t tasks = p.batch * p.q_heads * query_tiles;
#pragma omp parallel
  {
    configure_tiles();  // per thread: the tile configuration is thread state
    static thread_local AmxTask task;  // reused across calls, as attention.cpp's TaskBuffers
    const int64_t padded_rows = kAmxQueryTile;
    task.q.resize(padded_rows * dp);
    task.p.resize(padded_rows * kKeyTile);
    task.s.resize(padded_rows * kKeyTile);
    task.o.resize(padded_rows * dp);
    task.row_max.resize(padded_rows);
    task.row_sums.resize(padded_rows * 16);
    task.alpha.resize(padded_rows);
    task.row_keys.resize(padded_rows);
    if (pack_locally) {
      task.kt.resize(kKeyTile * dp);
      task.v.resize(kKeyTile * dp);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < tasks; ++index) {
      const int64_t q_tile = index % query_tiles;
      const int64_t h = (index / query_tiles) % p.q_heads;
      const int64_t b = index / (query_tiles * p.q_heads);
      attend_query_tile(p, packed, packed_kt, packed_v, packed_nonfinite, b, h, q_tile * kAmxQueryTile, pack_locally,
                        task);
    }
    _tile_release();
  }
  return ok_status();
}

}  // namespace attention_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
#endif  // UNMASK_AMX
