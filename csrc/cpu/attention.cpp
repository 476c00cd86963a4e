// attention on the CPU: FlashAttention-2 tiling (Dao, 2023, Algorithm 1) with an online
// softmax and float32 accumulation.
//
// 1. Pack: every (batch, kv head) K as K^T tiles [tile][D][kKeyTile], zero-padded past
//    k_len, and V as float32 [tile][kKeyTile][D]. Packed once and shared by every query
//    head of the group (GQA reads, never copies, per query head) and every query tile,
//    so the inner products stream contiguous rows. V is packed for float32 too: read in
//    place, its rows lie H * D floats apart (16 KiB for 32 heads of 128), all in the same
//    L1 set, and attention measured ~9% slower. The packing walks K and V in memory
//    order (pack_key_tile).
// 2. One task per (batch, query head, query tile of kQueryTile rows): S = Q K^T for
//    each key tile the masks leave visible (tiles fully hidden by kv_len, key_valid or
//    the block-causal mask are skipped, never computed), online softmax, O += P V.
// A block of at most kQueryTile queries (one query tile) skips the global pack: a task
// takes a batch row's group of kv heads and reads each key tile's rows where they lie
// (float32 and bfloat16 tiles with no hidden key) or copies them for the group in memory
// order (attend_head_group).
// With AVX-512 or AVX2 + FMA the two products run in register-blocked micro-kernels
// (6 rows x one band of columns); elsewhere plain loops the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include "attention_tiles.h"
#include "kernels.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace {
using namespace attention_detail;

// Q, S and O tiles of a task stay in L2 (~170 KiB at D=128), and 132 = 22 blocks of the
// 6-row micro-kernels: no short remainder block per tile (126 measured 2% over 128). A
// block of 128 queries is one tile, which packs its key tiles itself: with 126 it was a
// tile of 126 and one of 2 over a global pack, 1.2-1.6x slower (bench/attention.py --sweep,
// "full 128" rows; [4, 128, H, D] over 512 keys 1.4 -> 2.1-2.2x SDPA). Splitting longer
// blocks into even tiles instead (140 as 72 + 68, not 132 + 8) measured no faster.
constexpr int64_t kQueryTile = 132;

// ------------------------------------------------------------------ micro-kernels

// s[r][0:64] = sum_d q[r][d] * kt[d][0:64] for `rows` rows (q rows `dim` apart).
[[maybe_unused]] void qk_generic(const float* q, int64_t rows, int64_t dim, const float* kt, float* s) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kKeyTile] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const float qd = q[r * dim + d];
      const float* krow = kt + d * kKeyTile;
#pragma omp simd
      for (int64_t j = 0; j < kKeyTile; ++j) acc[j] += qd * krow[j];
    }
    std::memcpy(s + r * kKeyTile, acc, sizeof acc);
  }
}

// V's rows are float32 (a packed tile, or a float32 input read in place) or bfloat16 (an
// input read in place, converted as loaded): T, rows v_row elements apart.

// orow[:] += sum_j prow[j] * v[j][:] over keys [first, end).
template <typename T>
void add_weighted_rows(const float* prow, int64_t first, int64_t end, int64_t dim, const T* v, int64_t v_row,
                       float* orow) {
  for (int64_t j = first; j < end; ++j) {
    const float pj = prow[j];
    const T* vrow = v + j * v_row;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) orow[d] += pj * to_float(vrow[d]);
  }
}

// o[r][:] = alpha[r] * o[r][:] + sum_j p[r][j] * v[j][:] over `keys` keys.
// row_keys (nullable): row r meets only the keys it sees (block-causal), so that a V it
// gives weight 0 is never multiplied in (0 times a NaN or inf V is NaN).
template <typename T>
void pv_generic(const float* p, int64_t rows, int64_t keys, int64_t dim, const T* v, int64_t v_row,
                const int64_t* row_keys, const float* alpha, float* o) {
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = o + r * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) orow[d] *= alpha[r];
    add_weighted_rows(p + r * kKeyTile, 0, row_keys != nullptr ? std::min(keys, row_keys[r]) : keys, dim, v, v_row,
                      orow);
  }
}

// Register-blocked micro-kernels over cpu::Simd (simd.h): AVX-512 (16 floats, 32
// registers) or AVX2 + FMA (8 floats, 16 registers). A block is kRows = 6 rows by one
// band of kBandVecs vectors: 6 x 4 zmm = 24 accumulators, or 6 x 2 ymm = 12 accumulators
// plus 2 loads and a broadcast in 16 ymm registers (the 6 x 16 shape of AVX2 GEMM kernels).
#if defined(UNMASK_SIMD)
using cpu::Simd;
constexpr int kBandVecs = Simd::kWidth == 16 ? 4 : 2;
constexpr int kBlockRows = 6;
constexpr int64_t kBand = kBandVecs * Simd::kWidth;  // floats per band: 64 (AVX-512) or 16 (AVX2)
static_assert(kKeyTile % kBand == 0, "a key tile is a whole number of bands");

// Calls body(std::integral_constant<int, R>, first_row) for blocks of kBlockRows rows,
// then one block of the remaining 1..5 rows: the row count is a compile-time constant,
// so every accumulator lives in a register.
template <typename Body>
void for_row_blocks(int64_t rows, Body body) {
  int64_t r = 0;
  for (; r + kBlockRows <= rows; r += kBlockRows) body(std::integral_constant<int, kBlockRows>{}, r);
  switch (rows - r) {
    case 5: body(std::integral_constant<int, 5>{}, r); break;
    case 4: body(std::integral_constant<int, 4>{}, r); break;
    case 3: body(std::integral_constant<int, 3>{}, r); break;
    case 2: body(std::integral_constant<int, 2>{}, r); break;
    case 1: body(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// Q rows regrouped for qk_band: each block of up to kBlockRows rows stored d-major
// ([d][row]), so the kernel's broadcasts walk one pointer instead of kRows row pointers
// (which spilled to the stack with AVX2's 16 general registers in use).
void interleave_row_blocks(const float* q, int64_t rows, int64_t dim, float* blocked) {
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t block = std::min<int64_t>(kBlockRows, rows - r0);
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t r = 0; r < block; ++r) blocked[r0 * dim + d * block + r] = q[(r0 + r) * dim + d];
  }
}

// s[r][band] = sum_d q[d][r] * kt[d][band] for kRows rows: kBandVecs K^T loads and kRows
// broadcasts per d. q is one interleaved block; kt and s point at the band's first
// column; rows of s are kKeyTile apart.
template <int kRows>
void qk_band(const float* q, int64_t dim, const float* kt, float* s) {
  Simd::Reg acc[kRows][kBandVecs];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kBandVecs; ++c) acc[r][c] = Simd::zero();
  for (int64_t d = 0; d < dim; ++d) {
    Simd::Reg k[kBandVecs];
    for (int c = 0; c < kBandVecs; ++c) k[c] = Simd::load(kt + d * kKeyTile + c * Simd::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const Simd::Reg qb = Simd::set1(q[d * kRows + r]);
      for (int c = 0; c < kBandVecs; ++c) acc[r][c] = Simd::fmadd(qb, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kBandVecs; ++c) Simd::store(s + r * kKeyTile + c * Simd::kWidth, acc[r][c]);
}

// A vector of V's elements as float32 (bfloat16 converted as loaded).
inline Simd::Reg load_floats(const float* at) { return Simd::load(at); }
inline Simd::Reg load_floats(const BFloat16* at) { return Simd::load_bf16(reinterpret_cast<const uint16_t*>(at)); }

// kRows rows x one band of O columns (O rows `dim` floats apart, V rows v_row): o = alpha * o + p V over
// `keys` keys, kBandVecs V loads and kRows broadcasts per key. Bands rather than whole rows:
// a 3-row x 128-column AVX-512 block measured at half the speed, its V tile and O rows no
// longer fitting in L1 together.
// kVecs: the band's width in vectors, kBandVecs where D allows, else 1 (D 16, 32 or 48 with
// AVX-512: one vector per row, so small head dims keep a register-blocked P V).
template <int kRows, int kVecs = kBandVecs, typename T>
void pv_band(const float* p, int64_t keys, const T* v, int64_t v_row, int64_t dim, const float* alpha, float* o) {
  Simd::Reg acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const Simd::Reg a = Simd::set1(alpha[r]);
    for (int c = 0; c < kVecs; ++c) acc[r][c] = Simd::mul(a, Simd::load(o + r * dim + c * Simd::kWidth));
  }
  for (int64_t j = 0; j < keys; ++j) {
    Simd::Reg vj[kVecs];
    for (int c = 0; c < kVecs; ++c) vj[c] = load_floats(v + j * v_row + c * Simd::kWidth);
    for (int r = 0; r < kRows; ++r) {
      const Simd::Reg pb = Simd::set1(p[r * kKeyTile + j]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] = Simd::fmadd(pb, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kVecs; ++c) Simd::store(o + r * dim + c * Simd::kWidth, acc[r][c]);
}
#endif


// row_keys (nullable): for a tile cut by the block-causal diagonal, how many of its
// keys each row sees (non-decreasing down the rows). A block of rows then computes only
// the bands of S and the keys of P V its last row can see: the tiles on the diagonal
// cost about half. Columns of S left unwritten lie past every row's limit, where the
// softmax writes -inf.

// q: the tile's rows as interleave_row_blocks leaves them (SIMD builds), else row-major.
void qk_tile(const float* q, int64_t rows, int64_t dim, const float* kt, const int64_t* row_keys, float* s) {
#if defined(UNMASK_SIMD)
  for_row_blocks(rows, [&](auto block_rows, int64_t r) {
    constexpr int kRows = decltype(block_rows)::value;
    const int64_t cols = row_keys != nullptr ? row_keys[r + kRows - 1] : kKeyTile;
    for (int64_t band = 0; band < cols; band += kBand) {
      qk_band<kRows>(q + r * dim, dim, kt + band, s + r * kKeyTile + band);
    }
  });
#else
  (void)row_keys;
  qk_generic(q, rows, dim, kt, s);
#endif
}

// v: the tile's `keys` rows of `dim` elements, v_row apart (packed: dim floats).
template <typename T>
void pv_tile(const float* p, int64_t rows, int64_t keys, int64_t dim, const T* v, int64_t v_row,
             const int64_t* row_keys, const float* alpha, float* o) {
#if defined(UNMASK_SIMD)
  if (dim % Simd::kWidth == 0) {
    const bool wide = dim % kBand == 0;
    for_row_blocks(rows, [&](auto block_rows, int64_t r) {
      constexpr int kRows = decltype(block_rows)::value;
      // The keys every row of the block sees run through the register block; the few
      // that only its later rows see (a block-causal boundary inside the block) row by
      // row: a row must not meet a V it gives weight 0 (0 times a NaN or inf V is NaN).
      const int64_t shared_keys = row_keys != nullptr ? std::min(keys, row_keys[r]) : keys;
      if (wide) {
        for (int64_t band = 0; band < dim; band += kBand) {
          pv_band<kRows>(p + r * kKeyTile, shared_keys, v + band, v_row, dim, alpha + r, o + r * dim + band);
        }
      } else {
        for (int64_t band = 0; band < dim; band += Simd::kWidth) {
          pv_band<kRows, 1>(p + r * kKeyTile, shared_keys, v + band, v_row, dim, alpha + r, o + r * dim + band);
        }
      }
      for (int64_t i = 1; row_keys != nullptr && i < kRows; ++i) {
        add_weighted_rows(p + (r + i) * kKeyTile, shared_keys, std::min(keys, row_keys[r + i]), dim, v, v_row,
                          o + (r + i) * dim);
      }
    });
    return;
  }
#endif
  pv_generic(p, rows, keys, dim, v, v_row, row_keys, alpha, o);
}

// ------------------------------------------------------------------ packing and masks

// One buffer reused across calls (sized by fit_pack): repacking into fresh memory every
// call would page-fault tens of MB per attention layer. The mutex serialises concurrent calls.
std::mutex pack_mutex;
Packed& pack_buffers() {
  static Packed packed;
  return packed;
}

// `staging` holds eight keys of every kv head, [head][key][D], for the K transpose.
void pack_key_tile(const AttentionParams& p, Packed& packed, int64_t b, int64_t t, std::vector<float>& staging) {
  const int64_t dim = p.head_dim, tiles = key_tiles(p);
  const int64_t first = t * kKeyTile;
  const int64_t head_tile_floats = tiles * kKeyTile * dim;
  const int64_t tile_offset = t * kKeyTile * dim;
  const float* bias = packed.key_bias.data() + b * tiles * kKeyTile + t * kKeyTile;
  // Transpose eight keys at a time: each K^T row then receives 32 contiguous bytes per
  // pass instead of one float per cache line.
  constexpr int64_t kGroup = 8;
  staging.resize(static_cast<size_t>(p.kv_heads * kGroup * dim));
  for (int64_t j0 = 0; j0 < kKeyTile; j0 += kGroup) {
    for (int64_t g = 0; g < kGroup; ++g) {
      const int64_t key = first + j0 + g;
      for (int64_t h = 0; h < p.kv_heads; ++h) {
        float* k_row = staging.data() + (h * kGroup + g) * dim;
        float* v_row = packed.v.data() + (b * p.kv_heads + h) * head_tile_floats + tile_offset + (j0 + g) * dim;
        copy_key_rows(p, b, key, h, bias[j0 + g] == 0.0f, k_row, v_row);  // hidden: zero scores, masked by key_bias
      }
    }
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      float* kt = packed.kt.data() + (b * p.kv_heads + h) * head_tile_floats + tile_offset;
      const float* rows = staging.data() + h * kGroup * dim;
      for (int64_t d = 0; d < dim; ++d) {
        for (int64_t g = 0; g < kGroup; ++g) kt[d * kKeyTile + j0 + g] = rows[g * dim + d];
      }
    }
  }
}


// ------------------------------------------------------------------ one task

// One query head's tile of rows on its way through the key tiles: Q (scaled, and laid
// out for the micro-kernels), the output accumulator and the running softmax.
struct QueryTileState {
  AlignedFloats q;  // [rows][D], interleave_row_blocks' layout in SIMD builds
  AlignedFloats o;  // [rows][D]
  std::vector<float> row_max, row_sum;
};

struct TaskBuffers {
  AlignedFloats q_rows, s;  // Q rows as loaded; S of one key tile [rows][kKeyTile]
  std::vector<float> alpha;
  std::vector<int64_t> row_keys;
  std::vector<QueryTileState> heads;  // the task's query heads
  AlignedFloats kt, k_rows, v;        // packed in the task: K^T of one kv head; the group's K and V rows
  SpreadPrefetch next;                // the rows of the head after this one
};

// Query rows [q_begin, q_begin + rows) of head h loaded, scaled by scale * log2(e) (scores
// come out in base 2 for the exp2 of the softmax), with the output and softmax reset.
void start_query_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t q_begin, int64_t rows,
                      AlignedFloats& q_rows, QueryTileState& state) {
  const int64_t dim = p.head_dim;
  q_rows.resize(rows * dim);
  state.q.resize(rows * dim);
  state.o.assign(rows * dim, 0.0f);
  state.row_max.assign(rows, -kInf);
  state.row_sum.assign(rows, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    load_row(p.q, p.dtype, row_offset(p.q_stride, b, q_begin + r, h), dim,
             p.scale * cpu::kLog2e, q_rows.data() + r * dim);
  }
#if defined(UNMASK_SIMD)
  interleave_row_blocks(q_rows.data(), rows, dim, state.q.data());
#else
  std::copy(q_rows.begin(), q_rows.begin() + rows * dim, state.q.begin());
#endif
}

// One key tile (K^T kt [D][kKeyTile], V rows v [kKeyTile][D], v_row elements apart) for a
// query head's rows.
template <typename T>
void attend_key_tile(const AttentionParams& p, const KeyTile& tile, int64_t rows, const int64_t* row_keys,
                     const float* kt, const T* v, int64_t v_row, QueryTileState& state, TaskBuffers& buf) {
  float* s = buf.s.data();
  qk_tile(state.q.data(), rows, p.head_dim, kt, row_keys, s);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = s + r * kKeyTile;
    if (row_keys != nullptr) std::fill(srow + row_keys[r], srow + kKeyTile, -kInf);
    online_softmax_row(srow, tile.key_masked() ? tile.bias : nullptr, state.row_max[r], state.row_sum[r],
                       buf.alpha[r]);
  }
  pv_tile(s, rows, tile.keys, p.head_dim, v, v_row, row_keys, buf.alpha.data(), state.o.data());
}

void finish_query_tile(const AttentionParams& p, int64_t b, int64_t h, int64_t q_begin, int64_t rows,
                       QueryTileState& state) {
  for (int64_t r = 0; r < rows; ++r) {
    store_output_row(p, b, q_begin + r, h, state.row_sum[r], state.o.data() + r * p.head_dim);
  }
}

// The block-causal rows of a tile the diagonal cuts (null for any other tile).
const int64_t* tile_row_keys(const AttentionParams& p, const KeyTile& tile, int64_t q_begin, int64_t rows,
                             TaskBuffers& buf) {
  if (tile.causal != TileVisibility::kPartial) return nullptr;
  causal_row_keys(p, tile, q_begin, rows, buf.row_keys.data());
  return buf.row_keys.data();
}

// Query tile [q_begin, q_begin + kQueryTile) of head h against the global pack's tiles.
void attend_query_tile(const AttentionParams& p, const Packed& packed, int64_t b, int64_t h, int64_t q_begin,
                       TaskBuffers& buf) {
  const int64_t dim = p.head_dim, tiles = key_tiles(p), rows = std::min(kQueryTile, p.q_len - q_begin);
  const int64_t kv_head = h / (p.q_heads / p.kv_heads), head_tile_floats = tiles * kKeyTile * dim;
  const float* kt_head = packed.kt.data() + (b * p.kv_heads + kv_head) * head_tile_floats;
  const float* v_head = packed.v.data() + (b * p.kv_heads + kv_head) * head_tile_floats;
  QueryTileState& state = buf.heads[0];
  start_query_tile(p, b, h, q_begin, rows, buf.q_rows, state);
  for (int64_t t = 0; t < tiles; ++t) {
    const KeyTile tile = key_tile(p, packed, b, t, q_begin, rows);
    if (tile.hidden()) continue;
    attend_key_tile(p, tile, rows, tile_row_keys(p, tile, q_begin, rows, buf), kt_head + t * kKeyTile * dim,
                    v_head + tile.begin * dim, dim, state, buf);
  }
  finish_query_tile(p, b, h, q_begin, rows, state);
}

// A short query block (one query tile, every query of the call) of batch row b: kv heads
// [first, last) and, of their query heads, those in [q_first, q_last), through every key
// tile, packed here rather than in the global pack (each tile meets one query tile per
// query head: packed here it stays in L1/L2, where the global pack writes every tile to
// memory and reads it back). Where a tile is copied (hidden keys, float16 inputs),
// each key's rows for the group are copied in memory order ([B, L, H, D]: a key's heads
// are adjacent); copied head by head, a row of 16-32 floats lay on a page of its own, and
// [4, 8, 32, 32] over 512 keys spent ~2.7x per tile what it did with its keys in cache.
// Software prefetches of the rows, 4-16 keys or a tile ahead, measured 0.72-1.06x with
// tasks of one head, and a whole tile spread over the tile's compute (as the lanes kernel
// does) 0.84-1.04x on [4, 8, H, D] over 512 keys; one head ahead is what stays.
void attend_head_group(const AttentionParams& p, const Packed& packed, int64_t b, int64_t first, int64_t last,
                       int64_t q_first, int64_t q_last, TaskBuffers& buf) {
  const int64_t dim = p.head_dim, rows = p.q_len, group = p.q_heads / p.kv_heads, tile_floats = kKeyTile * dim;
  for (int64_t h = q_first; h < q_last; ++h) start_query_tile(p, b, h, 0, rows, buf.q_rows, buf.heads[h - q_first]);
  for (int64_t t = 0; t < key_tiles(p); ++t) {
    const KeyTile tile = key_tile(p, packed, b, t, 0, rows);
    if (tile.hidden()) continue;
    const int64_t* row_keys = tile_row_keys(p, tile, 0, rows, buf);
    // float32 and bfloat16 rows of a tile whose keys are all visible are read where they
    // lie: K transposed straight from them, V in place. Copying them first measured
    // 1.04-1.46x slower on float32 [4, 8, H, D] over 512 keys (D 32 to 16). A tile with
    // hidden keys is copied, its hidden rows as zeros: they are never read.
    const bool in_place = (p.dtype == ScalarType::kFloat32 || p.dtype == ScalarType::kBFloat16) && !tile.key_masked();
    for (int64_t j = 0; !in_place && j < kKeyTile; ++j) {  // hidden keys and those past k_len: zeros
      for (int64_t h = first; h < last; ++h) {
        const int64_t at = (h - first) * tile_floats + j * dim;
        copy_key_rows(p, b, tile.begin + j, h, tile.bias[j] == 0.0f, buf.k_rows.data() + at, buf.v.data() + at);
      }
    }
    for (int64_t h = first; h < last; ++h) {
      const int64_t heads_begin = std::max(q_first, h * group), heads_end = std::min(q_last, (h + 1) * group);
      if (heads_begin >= heads_end) continue;
      // K^T and the query heads, from rows of K and V of element type T, k_row and v_row apart.
      const auto attend = [&](const auto* k_rows, int64_t k_row, const auto* v_rows, int64_t v_row) {
        transpose(k_rows, kKeyTile, dim, k_row, buf.kt.data(), kKeyTile);
        for (int64_t q_head = heads_begin; q_head < heads_end; ++q_head) {
          attend_key_tile(p, tile, rows, row_keys, buf.kt.data(), v_rows, v_row, buf.heads[q_head - q_first], buf);
        }
      };
      // The input rows the next head reads in place (the next tile's first head after the
      // last), asked for while this one computes: 1.00-1.08x on [4, 8, H, D] over 512 keys
      // (D 32 to 128). A copied tile's next head reads the task's buffer.
      const bool last_head = h + 1 == last;
      if (in_place || last_head) {
        buf.next.start(p, b, tile.begin + (last_head ? kKeyTile : 0), tile.begin + (last_head ? 2 : 1) * kKeyTile,
                       last_head ? first : h + 1, (last_head ? first : h + 1) + 1, /*steps=*/1);
        buf.next.step();
      }
      const int64_t k_at = row_offset(p.k_stride, b, tile.begin, h), v_at = row_offset(p.v_stride, b, tile.begin, h);
      if (!in_place) {
        attend(buf.k_rows.data() + (h - first) * tile_floats, dim, buf.v.data() + (h - first) * tile_floats, dim);
      } else if (p.dtype == ScalarType::kFloat32) {
        attend(static_cast<const float*>(p.k) + k_at, p.k_stride[1], static_cast<const float*>(p.v) + v_at,
               p.v_stride[1]);
      } else {
        attend(static_cast<const BFloat16*>(p.k) + k_at, p.k_stride[1], static_cast<const BFloat16*>(p.v) + v_at,
               p.v_stride[1]);
      }
    }
  }
  for (int64_t h = q_first; h < q_last; ++h) finish_query_tile(p, b, h, 0, rows, buf.heads[h - q_first]);
}

// The per-head state of a short block's task stays within L2 with its key tiles: at most
// this many floats of Q and O (2 x rows x D a query head), which caps its kv heads.
constexpr int64_t kGroupStateFloats = int64_t{1} << 17;  // 512 KiB

}  // namespace

Status attention(const AttentionParams& p) {
  const Status status = check_attention_params(p);
  if (!status.ok()) return status;
  // The per-task buffers hold kQueryTile rows of D floats; the Python table sends larger D to the reference.
  if (p.head_dim > kMaxHeadDim) return unsupported("head_dim", static_cast<double>(p.head_dim), "must be <= 1024 on the CPU");
  if (p.batch * p.q_len == 0) return ok_status();
  std::lock_guard<std::mutex> lock(pack_mutex);
  Packed& packed = pack_buffers();
#if defined(UNMASK_AMX)
  if (p.dtype == ScalarType::kBFloat16) return attention_amx_bf16(p, packed);  // attention_amx.cpp
#endif
  const int64_t query_tiles = (p.q_len + kQueryTile - 1) / kQueryTile;
  // A short query block (one query tile per head, e.g. a cached decoding step's 32 queries
  // against every cached key) uses each key tile once per query head: its tasks pack
  // their tiles themselves (attend_head_group). Longer blocks share the global pack
  // across their query tiles.
  const bool pack_locally = query_tiles == 1;
  pack_masks(p, packed, /*keys_too=*/!pack_locally);
  if (p.q_len == 1) {  // one query: no key tile is worth packing for a single row
    attention_one_query(p, packed);  // attention_one_query.cpp
    return ok_status();
  }
#if defined(__AVX512F__)
  if (lanes_apply(p)) {  // a cached decoding step's block: the queries along the lanes
    attention_lanes(p, packed);  // attention_lanes.cpp
    return ok_status();
  }
#endif
  if (!pack_locally) {
#pragma omp parallel
    {
      std::vector<float> staging;
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t t = 0; t < key_tiles(p); ++t) pack_key_tile(p, packed, b, t, staging);
      }
    }
  }
  const HeadGroups split(p, kGroupStateFloats / (2 * p.q_len * p.head_dim * (p.q_heads / p.kv_heads)));
  const int64_t tasks = pack_locally ? split.tasks(p) : p.batch * p.q_heads * query_tiles;
#pragma omp parallel
  {
    // Kept by each (pooled) OpenMP thread across calls, growing only: allocated per call,
    // they were freed back to the OS and page-faulted in again (a [1, 32, 8, 128] float32
    // call measured 65 -> 58 us).
    static thread_local TaskBuffers buf;
    buf.s.resize(kQueryTile * kKeyTile);
    buf.alpha.resize(kQueryTile);
    buf.row_keys.resize(kQueryTile);
    if (pack_locally) {
      const int64_t heads = split.query_heads_per_task();
      if (static_cast<int64_t>(buf.heads.size()) < heads) buf.heads.resize(heads);
      buf.kt.resize(kKeyTile * p.head_dim);
      buf.k_rows.resize(split.per_group * kKeyTile * p.head_dim);
      buf.v.resize(buf.k_rows.size());
    } else if (buf.heads.empty()) {
      buf.heads.resize(1);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      if (!pack_locally) {
        const int64_t q_tile = task % query_tiles;
        const int64_t h = (task / query_tiles) % p.q_heads;
        const int64_t b = task / (query_tiles * p.q_heads);
        attend_query_tile(p, packed, b, h, q_tile * kQueryTile, buf);
        continue;
      }
      const HeadGroups::Task t = split.task(p, task);
      if (t.q_first < t.q_last) attend_head_group(p, packed, t.b, t.first, t.last, t.q_first, t.q_last, buf);
    }
  }
  return ok_status();
}

}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
