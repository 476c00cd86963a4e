// attention of one query (q_len 1) on the CPU: for each batch row and slice of its query
// heads, each head's query row against its kv head's keys, read in place. The tiled
// kernel (attention.cpp) packs every key tile, transposed, for its query tile; a tile of
// one row uses each packed key once, so packing cost more than the products (one query
// over 1024 keys ran 0.6-0.8x torch SDPA). Here each visible key's K row gives one dot
// product and its V row one multiply-add into the output: K and V are read once, nothing
// is packed. The softmax is the tiled kernel's (online_softmax_row, per key tile of
// kKeyTile), so masks, NaN and infinities, hidden keys (never read) and a query that sees
// no key (zeros) behave alike.
#include <algorithm>
#include <vector>

#include "attention_tiles.h"
#include "kernels.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace attention_detail {
namespace {

struct OneQueryBuffers {
  // Per query head of the task: the scaled query, the output, a key tile's scores and the
  // softmax's running state. `row`: one K or V row as float32.
  AlignedFloats q, o, s, row;
  std::vector<float> row_max, row_sum, alpha;
};

// The two row operations of the path, a K row's dot product with the query and a V row's
// weighted add into the output, on rows read in place at element `offset` of `base`.
// Any head dim, any build: each row through a float32 copy (none for float32) and
// `omp simd` loops.
struct GenericRows {
  const AttentionParams& p;
  float* row;  // p.head_dim floats

  const float* floats(const void* base, int64_t offset) const {
    if (p.dtype == ScalarType::kFloat32) return static_cast<const float*>(base) + offset;
    load_row(base, p.dtype, offset, p.head_dim, 1.0f, row);
    return row;
  }
  float dot(const float* q, const void* base, int64_t offset) const {
    const float* k = floats(base, offset);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < p.head_dim; ++d) sum += q[d] * k[d];
    return sum;
  }
  void add(float weight, const void* base, int64_t offset, float* o) const {
    const float* v = floats(base, offset);
#pragma omp simd
    for (int64_t d = 0; d < p.head_dim; ++d) o[d] += weight * v[d];
  }
};

#if defined(UNMASK_SIMD)
// Head dims that are whole vectors, one dtype: rows converted in registers as they are
// loaded, one horizontal sum per dot product. The generic loops' runtime trip count,
// remainder and separate conversion pass cost ~40 cycles a (key, head) at D 16, more
// than the products (one query over 1024 keys at 64 heads of 16: 0.46 ms).
template <ScalarType kType>
struct VectorRows {
  int64_t dim;  // a multiple of Simd::kWidth

  static Simd::Reg load(const void* base, int64_t offset) {
    if constexpr (kType == ScalarType::kFloat32) return Simd::load(static_cast<const float*>(base) + offset);
    if constexpr (kType == ScalarType::kBFloat16) return Simd::load_bf16(static_cast<const uint16_t*>(base) + offset);
    if constexpr (kType == ScalarType::kFloat16) return Simd::load_fp16(static_cast<const uint16_t*>(base) + offset);
  }
  float dot(const float* q, const void* base, int64_t offset) const {
    Simd::Reg sum = Simd::zero();
    for (int64_t d = 0; d < dim; d += Simd::kWidth) sum = Simd::fmadd(Simd::load(q + d), load(base, offset + d), sum);
    return Simd::reduce_add(sum);
  }
  void add(float weight, const void* base, int64_t offset, float* o) const {
    const Simd::Reg w = Simd::set1(weight);
    for (int64_t d = 0; d < dim; d += Simd::kWidth) {
      Simd::store(o + d, Simd::fmadd(w, load(base, offset + d), Simd::load(o + d)));
    }
  }
};
#endif

// Query heads [h_begin, h_end) of batch row b. The loops run key by key and, within a
// key, head by head: a key's heads lie next to each other ([B, L, H, D]), so K and V are
// read in memory order. Head by head, each row lay H * D elements from the next (4 KiB
// at d_model 1024), all in one L1 set and a new page every few rows: one query over 4096
// keys at 32 heads of 32 ran 5.8 ms that way, slower than SDPA.
template <typename Rows>
void attend_one_query(const AttentionParams& p, const Packed& packed, int64_t b, int64_t h_begin, int64_t h_end,
                      OneQueryBuffers& buf, const Rows& rows) {
  const int64_t dim = p.head_dim, tiles = key_tiles(p), heads = h_end - h_begin, group = p.q_heads / p.kv_heads;
  for (int64_t i = 0; i < heads; ++i) {
    // scale * log2(e): scores come out in base 2 for the exp2 of the softmax.
    load_row(p.q, p.dtype, row_offset(p.q_stride, b, 0, h_begin + i), dim, p.scale * cpu::kLog2e,
             buf.q.data() + i * dim);
  }
  std::fill(buf.o.begin(), buf.o.begin() + heads * dim, 0.0f);
  std::fill(buf.row_max.begin(), buf.row_max.begin() + heads, -kInf);
  std::fill(buf.row_sum.begin(), buf.row_sum.begin() + heads, 0.0f);

  for (int64_t t = 0; t < tiles; ++t) {
    const KeyTile tile = key_tile(p, packed, b, t, /*q_begin=*/0, /*rows=*/1);
    if (tile.hidden()) continue;
    int64_t keys = tile.keys;  // those before k_len, and before the query's block-causal limit
    if (tile.causal == TileVisibility::kPartial) {
      int64_t limit;
      causal_row_keys(p, tile, 0, 1, &limit);
      keys = std::min(keys, limit);
    }
    for (int64_t j = 0; j < keys; ++j) {
      const int64_t key = tile.begin + j;
      const bool hidden = tile.bias[j] != 0.0f;  // by kv_len or key_valid: never read
      for (int64_t i = 0; i < heads; ++i) {
        const int64_t kv_head = (h_begin + i) / group;
        buf.s[i * kKeyTile + j] =
            hidden ? -kInf : rows.dot(buf.q.data() + i * dim, p.k, row_offset(p.k_stride, b, key, kv_head));
      }
    }
    for (int64_t i = 0; i < heads; ++i) {
      float* s = buf.s.data() + i * kKeyTile;
      std::fill(s + keys, s + kKeyTile, -kInf);
      online_softmax_row(s, nullptr, buf.row_max[i], buf.row_sum[i], buf.alpha[i]);
      if (buf.alpha[i] != 1.0f) {
        float* o = buf.o.data() + i * dim;
        const float alpha = buf.alpha[i];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] *= alpha;
      }
    }
    for (int64_t j = 0; j < keys; ++j) {
      if (tile.bias[j] != 0.0f) continue;  // a hidden key's V is never read: 0 * NaN would be NaN
      const int64_t key = tile.begin + j;
      for (int64_t i = 0; i < heads; ++i) {
        const int64_t kv_head = (h_begin + i) / group;
        rows.add(buf.s[i * kKeyTile + j], p.v, row_offset(p.v_stride, b, key, kv_head), buf.o.data() + i * dim);
      }
    }
  }
  for (int64_t i = 0; i < heads; ++i) store_output_row(p, b, 0, h_begin + i, buf.row_sum[i], buf.o.data() + i * dim);
}

// attend_one_query with the row operations this call's dtype and head dim allow.
void attend_heads(const AttentionParams& p, const Packed& packed, int64_t b, int64_t h_begin, int64_t h_end,
                  OneQueryBuffers& buf) {
#if defined(UNMASK_SIMD)
  if (p.head_dim % Simd::kWidth == 0) {
    switch (p.dtype) {
      case ScalarType::kFloat32:
        return attend_one_query(p, packed, b, h_begin, h_end, buf, VectorRows<ScalarType::kFloat32>{p.head_dim});
      case ScalarType::kBFloat16:
        return attend_one_query(p, packed, b, h_begin, h_end, buf, VectorRows<ScalarType::kBFloat16>{p.head_dim});
      case ScalarType::kFloat16:
        return attend_one_query(p, packed, b, h_begin, h_end, buf, VectorRows<ScalarType::kFloat16>{p.head_dim});
    }
  }
#endif
  attend_one_query(p, packed, b, h_begin, h_end, buf, GenericRows{p, buf.row.data()});
}

}  // namespace

void attention_one_query(const AttentionParams& p, const Packed& packed) {
  // Tasks of a batch row's heads, split so every thread gets work: a batch row's heads
  // together read each key's rows in memory order, and splitting them across threads
  // halves each one's share of every row.
  const int64_t splits = std::min<int64_t>(p.q_heads, std::max<int64_t>(1, (max_threads() + p.batch - 1) / p.batch));
  const int64_t heads_per_task = (p.q_heads + splits - 1) / splits;
  const int64_t tasks = p.batch * splits;
  // Below 2^18 multiply-adds (16 heads x 1024 keys x D 16) one thread does the call: waking
  // the team costs a few microseconds (rms_norm.cpp's reasoning; this line is not tuned).
#pragma omp parallel if (p.batch * p.q_heads * p.k_len * p.head_dim >= (int64_t{1} << 18))
  {
    static thread_local OneQueryBuffers buf;  // kept across calls, growing only (attention.cpp's TaskBuffers)
    buf.q.resize(heads_per_task * p.head_dim);
    buf.o.resize(heads_per_task * p.head_dim);
    buf.s.resize(heads_per_task * kKeyTile);
    buf.row.resize(p.head_dim);
    buf.row_max.resize(heads_per_task);
    buf.row_sum.resize(heads_per_task);
    buf.alpha.resize(heads_per_task);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / splits, h_begin = (task % splits) * heads_per_task;
      const int64_t h_end = std::min(p.q_heads, h_begin + heads_per_task);
      if (h_begin < h_end) attend_heads(p, packed, b, h_begin, h_end, buf);
    }
  }
}

}  // namespace attention_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
