// Attention of a short query block on the CPU with the queries along the vector lanes.
//
// A cached decoding step attends a block of 32 queries to every cached key. The tiled
// kernel (attention.cpp) puts keys along the lanes: every key tile is transposed into
// K^T for the one query tile that uses it (~20% of such a call at D 128), and every
// score row needs horizontal reductions in its softmax. With the block's queries along
// the lanes of two zmm instead:
//   S^T[j] = sum_d K[j][d] Q^T[d]       a broadcast of K[j][d] per vector FMA: K's rows
//                                        are read as they lie, no transpose;
//   online softmax per lane              running maxima, sums and rescale factors are
//                                        vectors, with no horizontal reduction;
//   O^T[d] += sum_j V[j][d] P^T[j]       a broadcast of V[j][d] per vector FMA;
// and O^T is transposed back once per (batch, head). A task takes a group of heads; a
// float32 key tile with no hidden key is read where it lies, any other is copied key by
// key, in memory order, hidden rows as zeros (copy_rows). The arithmetic
// per score is the tiled kernel's: the products in float32 with the same FMAs per term,
// the softmax in base 2 with the same polynomial, the same lazy rescaling (kMaxSlack)
// and the same NaN and hidden-key rules (attention_tiles.h, online_softmax_row), lane
// by lane.
#include <algorithm>
#include <cstring>

#include "attention_tiles.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace attention_detail {
#if defined(__AVX512F__)  // lanes_apply (attention_tiles.h)
namespace {

// 25-32 queries in two zmm of lanes. With AVX2's four ymm and 16 registers the products
// no longer block well, and it measured no faster than the tiled kernel there.
constexpr int kVecs = 2;
constexpr int kLanes = static_cast<int>(kLaneRows);
static_assert(kLanes == kVecs * Simd::kWidth, "two zmm of lanes");
// Accumulators of the two products: half the register file, the rest for operands:
// 8 keys x 2 zmm of S^T, 8 dims x 2 zmm of O^T.
constexpr int kAccumulators = 16;
constexpr int kScoreKeys = std::min(8, kAccumulators / kVecs);  // keys of a block of scores
constexpr int kOutputDims = kAccumulators / kVecs;              // dims of a block of P V
static_assert(kKeyTile % kScoreKeys == 0, "key blocks tile a key tile");

alignas(64) constexpr float kLaneIndex[kLaneRows] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
static_assert(kLaneRows == 32, "kLaneIndex lists every lane");

// One query head's state across key tiles: Q^T, O^T and the running softmax per lane.
struct HeadState {
  AlignedFloats qt;  // Q^T [D][lanes], scaled into base 2; lanes past the block 0
  AlignedFloats ot;  // O^T [D][lanes]
  alignas(64) float row_max[kLaneRows];
  alignas(64) float row_sum[kLaneRows];
  // No key tile attended yet: O^T holds nothing, and the first tile's P V is stored into
  // it rather than added (zeroing it and rescaling the zeros cost ~5% of a 32 x 32 call).
  bool fresh;
};

struct LaneBuffers {
  std::vector<HeadState> heads;  // the task's query heads
  AlignedFloats k, v;  // a key tile's rows of K and V per kv head [kv head][kKeyTile][D], hidden keys zero
  AlignedFloats st;    // S^T, then P^T, of one head and key tile [kKeyTile][lanes]
  AlignedFloats rows;  // a head's Q or O as rows [lanes][D], either side of their transposes
  SpreadPrefetch next;  // the next key tile's rows
};

// st[j][:] = sum_d k[j][d] * qt[d][:] for kKeys keys (rows of k `k_row` floats apart; at
// most 8, so their row pointers stay in registers).
template <int kKeys>
void scores(const float* k, int64_t dim, int64_t k_row, const float* qt, float* st) {
  Simd::Reg acc[kKeys][kVecs];
  for (int j = 0; j < kKeys; ++j)
    for (int c = 0; c < kVecs; ++c) acc[j][c] = Simd::zero();
  for (int64_t d = 0; d < dim; ++d) {
    Simd::Reg q[kVecs];
    for (int c = 0; c < kVecs; ++c) q[c] = Simd::load(qt + d * kLanes + c * Simd::kWidth);
    for (int j = 0; j < kKeys; ++j) {
      const Simd::Reg kb = Simd::set1(k[j * k_row + d]);
      for (int c = 0; c < kVecs; ++c) acc[j][c] = Simd::fmadd(kb, q[c], acc[j][c]);
    }
  }
  for (int j = 0; j < kKeys; ++j)
    for (int c = 0; c < kVecs; ++c) Simd::store(st + j * kLanes + c * Simd::kWidth, acc[j][c]);
}

// ot[d][:] += sum_j v[j][d] * pt[j][:] over `keys` keys for kDims dims from `first` (rows
// of v `v_row` floats apart).
// first_lane (nullable, a tile the block-causal diagonal cuts): key j adds only to lanes
// from first_lane[j] on. A lane that does not see a key must not meet its V at all: its
// weight there is 0, but 0 times a NaN or inf V is NaN.
template <int kDims>
void accumulate(const float* pt, int64_t keys, const float* v, int64_t v_row, int64_t first, const float* first_lane,
                bool fresh, float* ot) {
  Simd::Reg acc[kDims][kVecs];
  for (int i = 0; i < kDims; ++i)
    for (int c = 0; c < kVecs; ++c)
      acc[i][c] = fresh ? Simd::zero() : Simd::load(ot + (first + i) * kLanes + c * Simd::kWidth);
  Simd::Reg lane[kVecs];
  for (int c = 0; c < kVecs; ++c) lane[c] = Simd::load(kLaneIndex + c * Simd::kWidth);
  for (int64_t j = 0; j < keys; ++j) {
    Simd::Reg w[kVecs];
    for (int c = 0; c < kVecs; ++c) w[c] = Simd::load(pt + j * kLanes + c * Simd::kWidth);
    const float* vrow = v + j * v_row + first;
    if (first_lane == nullptr) {
      for (int i = 0; i < kDims; ++i) {
        const Simd::Reg vb = Simd::set1(vrow[i]);
        for (int c = 0; c < kVecs; ++c) acc[i][c] = Simd::fmadd(vb, w[c], acc[i][c]);
      }
    } else {
      Simd::Mask sees[kVecs];
      for (int c = 0; c < kVecs; ++c) sees[c] = Simd::at_least(lane[c], Simd::set1(first_lane[j]));
      for (int i = 0; i < kDims; ++i) {
        const Simd::Reg vb = Simd::set1(vrow[i]);
        for (int c = 0; c < kVecs; ++c) acc[i][c] = Simd::fmadd_where(sees[c], vb, w[c], acc[i][c]);
      }
    }
  }
  for (int i = 0; i < kDims; ++i)
    for (int c = 0; c < kVecs; ++c) Simd::store(ot + (first + i) * kLanes + c * Simd::kWidth, acc[i][c]);
}

// The first `keys` rows of a key tile's K and V for kv heads [first, last), hidden ones
// zero (copy_key_rows). Key by key, its heads in turn: the order they lie in [B, L, H, D].
// Head by head, each row lies on a page of its own (a head's keys are H * D elements
// apart, 4 KiB at d_model 1024), where the prefetcher stops: tasks of several heads
// measured 2-8% faster than tasks of one on 32 queries against 1024-4096 keys.
void copy_rows(const AttentionParams& p, const KeyTile& tile, int64_t keys, int64_t b, int64_t first, int64_t last,
               LaneBuffers& buf) {
  const int64_t dim = p.head_dim, head_floats = kKeyTile * dim;
  for (int64_t j = 0; j < keys; ++j) {
    const int64_t key = tile.begin + j;
    for (int64_t h = first; h < last; ++h) {
      const int64_t at = (h - first) * head_floats + j * dim;
      copy_key_rows(p, b, key, h, tile.bias[j] == 0.0f, buf.k.data() + at, buf.v.data() + at);
    }
  }
}

// Q^T of query head h, scaled by scale * log2(e) (scores come out in base 2 for the exp2
// of the softmax), with O^T and the running softmax reset. rows: [lanes][D] scratch.
void start_head(const AttentionParams& p, int64_t b, int64_t h, HeadState& head, float* rows) {
  const int64_t dim = p.head_dim;
  for (int64_t r = 0; r < p.q_len; ++r) {
    load_row(p.q, p.dtype, row_offset(p.q_stride, b, r, h), dim, p.scale * cpu::kLog2e, rows + r * dim);
  }
  std::fill(rows + p.q_len * dim, rows + kLanes * dim, 0.0f);  // lanes past the block
  transpose(rows, kLanes, dim, dim, head.qt.data(), kLanes);
  head.fresh = true;
  std::fill(head.row_max, head.row_max + kLaneRows, -kInf);
  std::fill(head.row_sum, head.row_sum + kLaneRows, 0.0f);
}

// One query head through the first `keys` keys of a key tile (its kv head's rows k and v,
// k_row and v_row floats apart), asking for the next tile's rows (next) as it goes.
void attend_tile(const AttentionParams& p, const KeyTile& tile, int64_t keys, const float* k, int64_t k_row,
                 const float* v, int64_t v_row, HeadState& head, float* st, SpreadPrefetch& next) {
  constexpr int kWidth = Simd::kWidth;
  const int64_t dim = p.head_dim;
  float* ot = head.ot.data();
  const Simd::Reg neg_inf = Simd::set1(-kInf), zero = Simd::zero(), lowest = Simd::set1(-126.0f);
  Simd::Reg row_max[kVecs], row_sum[kVecs];
  for (int c = 0; c < kVecs; ++c) {
    row_max[c] = Simd::load(head.row_max + c * kWidth);
    row_sum[c] = Simd::load(head.row_sum + c * kWidth);
  }

  // Rows past `keys` in the last block of 8 hold other keys (an earlier tile's or zeros
  // in the copy; this tile's later, visible keys in place): their scores are never read.
  for (int64_t j = 0; j < keys; j += kScoreKeys) {
    scores<kScoreKeys>(k + j * k_row, dim, k_row, head.qt.data(), st + j * kLanes);
    next.step();
  }

  // Masks (a select, not an add: a hidden key's NaN score, from NaN in Q, is -inf too)
  // and the tile's maximum per lane (a NaN score leaves it alone).
  const bool key_masked = tile.key_masked(), causal = tile.causal == TileVisibility::kPartial;
  Simd::Reg tile_max[kVecs];
  for (int c = 0; c < kVecs; ++c) tile_max[c] = neg_inf;
  alignas(64) float first_lane[kKeyTile];  // block-causal: lane r sees key j from first_lane[j] on
  for (int64_t j = 0; j < keys; ++j) {
    const Simd::Reg hide = Simd::set1(key_masked ? tile.bias[j] : 0.0f);
    // Block-causal: lane r sees the key once q_offset + r reaches the key's block.
    if (causal) {
      first_lane[j] = static_cast<float>(
          std::clamp<int64_t>((tile.begin + j) / p.block_size * p.block_size - p.q_offset, 0, kLanes));
    }
    for (int c = 0; c < kVecs; ++c) {
      Simd::Reg lane_hide = hide;
      if (causal) {
        const Simd::Reg lane = Simd::load(kLaneIndex + c * kWidth);
        lane_hide = Simd::add(hide, Simd::select(Simd::at_least(lane, Simd::set1(first_lane[j])), zero, neg_inf));
      }
      Simd::Reg x = Simd::load(st + j * kLanes + c * kWidth);
      x = Simd::add(Simd::keep_or_zero(Simd::equal(lane_hide, zero), x), lane_hide);
      Simd::store(st + j * kLanes + c * kWidth, x);
      tile_max[c] = Simd::max(x, tile_max[c]);
    }
  }

  // A lane's running maximum moves where a score passes it by more than kMaxSlack, or
  // where it has none yet; O^T and the sums are rescaled only when some lane's does.
  Simd::Mask moves[kVecs];
  uint32_t any_moves = 0;
  for (int c = 0; c < kVecs; ++c) {
    moves[c] = Simd::either(Simd::at_least(tile_max[c], Simd::add(row_max[c], Simd::set1(kMaxSlack))),
                            Simd::equal(row_max[c], neg_inf));
    any_moves |= Simd::bits(moves[c]);
  }
  if (any_moves != 0) {
    Simd::Reg alpha[kVecs], shift[kVecs];
    for (int c = 0; c < kVecs; ++c) {
      const Simd::Reg moved = Simd::select(moves[c], Simd::max(tile_max[c], row_max[c]), row_max[c]);
      // exactly 1 where the maximum stays; 0 where there was none (the lane's output and
      // sum are still 0, or NaN, which stays NaN) or it fell more than 2^126
      shift[c] = Simd::select(Simd::equal(row_max[c], neg_inf), neg_inf, Simd::sub(row_max[c], moved));
      alpha[c] = Simd::max(lowest, shift[c]);
      row_max[c] = moved;
    }
    cpu::exp2_interleaved(alpha);
    for (int c = 0; c < kVecs; ++c) {
      alpha[c] = Simd::keep_or_zero(Simd::at_least(shift[c], lowest), alpha[c]);
      row_sum[c] = Simd::mul(row_sum[c], alpha[c]);
    }
    if (!head.fresh) {
      for (int64_t d = 0; d < dim; ++d)
        for (int c = 0; c < kVecs; ++c)
          Simd::store(ot + d * kLanes + c * kWidth, Simd::mul(alpha[c], Simd::load(ot + d * kLanes + c * kWidth)));
    }
  }

  // Weights 2^(s - max): 0 for hidden keys and below 2^-126 (subnormal products take
  // microcode assists), NaN kept. A lane with no maximum yet has only -inf or NaN scores.
  Simd::Reg base[kVecs];
  for (int c = 0; c < kVecs; ++c) base[c] = Simd::select(Simd::equal(row_max[c], neg_inf), zero, row_max[c]);
  for (int64_t j = 0; j < keys; ++j) {
    Simd::Reg z[kVecs], e[kVecs];
    for (int c = 0; c < kVecs; ++c) {
      z[c] = Simd::sub(Simd::load(st + j * kLanes + c * kWidth), base[c]);
      e[c] = Simd::max(lowest, z[c]);  // NaN where z is NaN (max returns its second operand)
    }
    cpu::exp2_interleaved(e);
    for (int c = 0; c < kVecs; ++c) {
      e[c] = Simd::keep_or_zero(Simd::nan_or_at_least(z[c], lowest), e[c]);
      Simd::store(st + j * kLanes + c * kWidth, e[c]);
      row_sum[c] = Simd::add(row_sum[c], e[c]);
    }
  }
  for (int c = 0; c < kVecs; ++c) {
    Simd::store(head.row_max + c * kWidth, row_max[c]);
    Simd::store(head.row_sum + c * kWidth, row_sum[c]);
  }

  const float* limits = causal ? first_lane : nullptr;
  int64_t d = 0;
  for (; d + kOutputDims <= dim; d += kOutputDims) {
    accumulate<kOutputDims>(st, keys, v, v_row, d, limits, head.fresh, ot);
    next.step();
  }
  for (; d < dim; ++d) accumulate<1>(st, keys, v, v_row, d, limits, head.fresh, ot);
  head.fresh = false;
}

// O = O^T transposed, over each lane's sum (zeros for a query that saw no key).
void finish_head(const AttentionParams& p, int64_t b, int64_t h, HeadState& head, float* rows) {
  if (head.fresh) std::fill(head.ot.begin(), head.ot.begin() + p.head_dim * kLanes, 0.0f);  // every tile hidden
  transpose(head.ot.data(), p.head_dim, kLanes, kLanes, rows, p.head_dim);
  for (int64_t r = 0; r < p.q_len; ++r) store_output_row(p, b, r, h, head.row_sum[r], rows + r * p.head_dim);
}

// Batch row b, kv heads [first, last) and their query heads [q_first, q_last), through
// every key tile.
void attend_heads(const AttentionParams& p, const Packed& packed, int64_t b, int64_t first, int64_t last,
                  int64_t q_first, int64_t q_last, LaneBuffers& buf) {
  const int64_t group = p.q_heads / p.kv_heads, head_floats = kKeyTile * p.head_dim;
  for (int64_t h = q_first; h < q_last; ++h) start_head(p, b, h, buf.heads[h - q_first], buf.rows.data());
  for (int64_t t = 0; t < key_tiles(p); ++t) {
    const KeyTile tile = key_tile(p, packed, b, t, 0, p.q_len);
    if (tile.hidden()) continue;
    // On the block-causal diagonal, the keys the block's last query sees: the rest are
    // hidden from every query and never reach an output (a tile read in place may load up
    // to 7 of their K rows, visible to the key masks, into scores that are never read).
    const int64_t keys = tile.causal != TileVisibility::kPartial
                             ? tile.keys
                             : std::clamp<int64_t>(((p.q_offset + p.q_len - 1) / p.block_size + 1) * p.block_size -
                                                       tile.begin, 0, tile.keys);
    // The next tile's rows, asked for while this one computes (SpreadPrefetch): a task of
    // one or two heads reads 0.5-1 KiB of a key's rows at a time, each key on a new page,
    // where the hardware prefetcher stops.
    const int64_t steps = (q_last - q_first) * ((keys + kScoreKeys - 1) / kScoreKeys + p.head_dim / kOutputDims);
    buf.next.start(p, b, (t + 1) * kKeyTile, (t + 2) * kKeyTile, first, last, steps);
    // float32 rows of a tile whose keys are all visible are read where they lie (already in
    // L2, asked for during the tile before): copying them measured 1.07-1.08x slower on
    // [1-4, 32, 8, 128] over 1024-4096 keys. A tile with hidden keys is copied, its hidden
    // rows as zeros: they are never read.
    const bool in_place = p.dtype == ScalarType::kFloat32 && !tile.key_masked();
    if (!in_place) copy_rows(p, tile, keys, b, first, last, buf);
    for (int64_t h = q_first; h < q_last; ++h) {
      const int64_t kv = h / group;
      HeadState& head = buf.heads[h - q_first];
      if (in_place) {
        attend_tile(p, tile, keys, static_cast<const float*>(p.k) + row_offset(p.k_stride, b, tile.begin, kv),
                    p.k_stride[1], static_cast<const float*>(p.v) + row_offset(p.v_stride, b, tile.begin, kv),
                    p.v_stride[1], head, buf.st.data(), buf.next);
      } else {
        const int64_t at = (kv - first) * head_floats;
        attend_tile(p, tile, keys, buf.k.data() + at, p.head_dim, buf.v.data() + at, p.head_dim, head, buf.st.data(),
                    buf.next);
      }
    }
  }
  for (int64_t h = q_first; h < q_last; ++h) finish_head(p, b, h, buf.heads[h - q_first], buf.rows.data());
}

}  // namespace

void attention_lanes(const AttentionParams& p, const Packed& packed) {
  const HeadGroups split(p, /*max_per_group=*/p.kv_heads);  // a head's lanes state is small: no cap
  const int64_t tasks = split.tasks(p);
#pragma omp parallel
  {
    // Kept by each (pooled) OpenMP thread across calls, growing only (attention.cpp's TaskBuffers).
    static thread_local LaneBuffers buf;
    const size_t head_floats = static_cast<size_t>(kLaneRows * p.head_dim);
    buf.heads.resize(static_cast<size_t>(split.query_heads_per_task()));
    for (HeadState& head : buf.heads) {
      head.qt.resize(head_floats);
      head.ot.resize(head_floats);
    }
    buf.k.resize(static_cast<size_t>(split.per_group * kKeyTile * p.head_dim));
    buf.v.resize(buf.k.size());
    buf.st.resize(static_cast<size_t>(kKeyTile * kLaneRows));
    buf.rows.resize(head_floats);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const HeadGroups::Task t = split.task(p, task);
      if (t.q_first < t.q_last) attend_heads(p, packed, t.b, t.first, t.last, t.q_first, t.q_last, buf);
    }
  }
}
#endif  // __AVX512F__

}  // namespace attention_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
