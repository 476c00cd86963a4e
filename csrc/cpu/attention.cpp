// attention on the CPU: FlashAttention-2 tiling (Dao, 2023, Algorithm 1) with an online
// softmax and float32 accumulation.
//
// 1. Pack: every (batch, kv head) K as K^T tiles [tile][D][kKeyTile], zero-padded past
//    k_len, and (for float16/bfloat16 inputs) V as float32 [tile][kKeyTile][D]. Packed once and shared by
//    every query head of the group (GQA reads, never copies, per query head) and every
//    query tile, so the inner products stream contiguous 64-float rows.
// 2. One task per (batch, query head, query tile of kQueryTile rows): S = Q K^T for
//    each key tile the masks leave visible (tiles fully hidden by kv_len, key_valid or
//    the block-causal mask are skipped, never computed), online softmax, O += P V.
// With AVX-512 the two products run in register-blocked micro-kernels (24 accumulators
// of the 32 zmm registers); elsewhere plain loops the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "unmask/attention.h"
#include "vec_math.h"

namespace unmask {
namespace {

using cpu::fast_exp;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kKeyTile = 64;    // S row = 4 zmm; a K^T tile of D=128 is 32 KiB, L1-sized
// Q, S and O tiles of a task stay in L2 (~160 KiB at D=128), and 126 = 21 blocks of the
// 6-row micro-kernels: no short remainder block per tile (measured 2% over 128).
constexpr int64_t kQueryTile = 126;

void load_row(const void* base, ScalarType dtype, int64_t offset, int64_t n, float scale, float* out) {
  if (dtype == ScalarType::kFloat32) {
    const float* src = static_cast<const float*>(base) + offset;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = src[i] * scale;
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  if (dtype == ScalarType::kBFloat16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = cpu::bf16_to_float(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = cpu::fp16_to_float(src[i]) * scale;
  }
}

void store_row(void* base, ScalarType dtype, int64_t offset, int64_t n, const float* values) {
  switch (dtype) {
    case ScalarType::kFloat32: std::memcpy(static_cast<float*>(base) + offset, values, n * sizeof(float)); return;
    case ScalarType::kFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(base)[offset + i] = cpu::float_to_fp16(values[i]);
      return;
    case ScalarType::kBFloat16:
      for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(base)[offset + i] = cpu::float_to_bf16(values[i]);
      return;
  }
}

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

// o[r][:] = alpha[r] * o[r][:] + sum_j p[r][j] * v[j][:] over `keys` keys.
void pv_generic(const float* p, int64_t rows, int64_t keys, int64_t dim, const float* v, int64_t v_stride,
                const float* alpha, float* o) {
  for (int64_t r = 0; r < rows; ++r) {
    float* orow = o + r * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) orow[d] *= alpha[r];
    for (int64_t j = 0; j < keys; ++j) {
      const float pj = p[r * kKeyTile + j];
      const float* vrow = v + j * v_stride;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) orow[d] += pj * vrow[d];
    }
  }
}

#if defined(__AVX512F__)
// 6 rows x 64 keys: 24 accumulators, 4 K^T loads and 6 broadcasts per d.
template <int kRows>
void qk_avx512(const float* q, int64_t dim, const float* kt, float* s) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const float* krow = kt + d * kKeyTile;
    const __m512 k0 = _mm512_loadu_ps(krow), k1 = _mm512_loadu_ps(krow + 16);
    const __m512 k2 = _mm512_loadu_ps(krow + 32), k3 = _mm512_loadu_ps(krow + 48);
    for (int r = 0; r < kRows; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * dim + d]);
      acc[r][0] = _mm512_fmadd_ps(qb, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qb, k1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(qb, k2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(qb, k3, acc[r][3]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * kKeyTile + 16 * c, acc[r][c]);
}

// kRows rows x 64 columns of O (one 64-wide column band of a row `stride` floats long):
// 24 accumulators, 4 V loads and 6 broadcasts per key. Wider heads take several bands:
// a 3-row x 128-column block measured at half the speed, its V tile and O rows no
// longer fitting in L1 together.
template <int kRows>
void pv_band_avx512(const float* p, int64_t keys, const float* v, int64_t v_stride, int64_t stride, const float* alpha,
                    float* o) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * stride + 16 * c));
  }
  for (int64_t j = 0; j < keys; ++j) {
    const float* vrow = v + j * v_stride;
    const __m512 v0 = _mm512_loadu_ps(vrow), v1 = _mm512_loadu_ps(vrow + 16);
    const __m512 v2 = _mm512_loadu_ps(vrow + 32), v3 = _mm512_loadu_ps(vrow + 48);
    for (int r = 0; r < kRows; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * kKeyTile + j]);
      acc[r][0] = _mm512_fmadd_ps(pb, v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(pb, v1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(pb, v2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(pb, v3, acc[r][3]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * stride + 16 * c, acc[r][c]);
}

template <int kRows>
void pv_rows_avx512(const float* p, int64_t keys, int64_t dim, const float* v, int64_t v_stride, const float* alpha,
                    float* o) {
  for (int64_t band = 0; band < dim; band += 64) {
    pv_band_avx512<kRows>(p, keys, v + band, v_stride, dim, alpha, o + band);
  }
}
#endif

void qk_tile(const float* q, int64_t rows, int64_t dim, const float* kt, float* s) {
#if defined(__AVX512F__)
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) qk_avx512<6>(q + r * dim, dim, kt, s + r * kKeyTile);
  switch (rows - r) {
    case 5: qk_avx512<5>(q + r * dim, dim, kt, s + r * kKeyTile); break;
    case 4: qk_avx512<4>(q + r * dim, dim, kt, s + r * kKeyTile); break;
    case 3: qk_avx512<3>(q + r * dim, dim, kt, s + r * kKeyTile); break;
    case 2: qk_avx512<2>(q + r * dim, dim, kt, s + r * kKeyTile); break;
    case 1: qk_avx512<1>(q + r * dim, dim, kt, s + r * kKeyTile); break;
    default: break;
  }
#else
  qk_generic(q, rows, dim, kt, s);
#endif
}

// v: `keys` rows of `dim` floats, v_stride apart (the packed tile, or float32 input in place).
void pv_tile(const float* p, int64_t rows, int64_t keys, int64_t dim, const float* v, int64_t v_stride,
             const float* alpha, float* o) {
#if defined(__AVX512F__)
  if (dim % 64 == 0) {
    int64_t r = 0;
    for (; r + 6 <= rows; r += 6) pv_rows_avx512<6>(p + r * kKeyTile, keys, dim, v, v_stride, alpha + r, o + r * dim);
    const float* pr = p + r * kKeyTile;
    float* orow = o + r * dim;
    switch (rows - r) {
      case 5: pv_rows_avx512<5>(pr, keys, dim, v, v_stride, alpha + r, orow); break;
      case 4: pv_rows_avx512<4>(pr, keys, dim, v, v_stride, alpha + r, orow); break;
      case 3: pv_rows_avx512<3>(pr, keys, dim, v, v_stride, alpha + r, orow); break;
      case 2: pv_rows_avx512<2>(pr, keys, dim, v, v_stride, alpha + r, orow); break;
      case 1: pv_rows_avx512<1>(pr, keys, dim, v, v_stride, alpha + r, orow); break;
      default: break;
    }
    return;
  }
#endif
  pv_generic(p, rows, keys, dim, v, v_stride, alpha, o);
}

// ------------------------------------------------------------------ packing and masks

struct Packed {
  std::vector<float> kt;       // [batch][kv_heads][tiles][D][kKeyTile]
  std::vector<float> v;        // [batch][kv_heads][tiles][kKeyTile][D]; float16/bfloat16 inputs only
                               // (float32 V rows are read in place)
  std::vector<float> key_bias; // [batch][tiles * kKeyTile]: 0 visible, -inf hidden (kv_len, key_valid, padding)
  std::vector<int64_t> visible_keys;  // [batch][tiles]: keys of the tile that key masks leave visible
};

// One buffer reused across calls (growing only): repacking into fresh memory every call
// would page-fault tens of MB per attention layer. The mutex serialises concurrent calls.
std::mutex pack_mutex;
Packed& pack_buffers() {
  static Packed packed;
  return packed;
}

int64_t key_tiles(const AttentionParams& p) { return (p.k_len + kKeyTile - 1) / kKeyTile; }

void pack(const AttentionParams& p, Packed& packed) {
  const int64_t tiles = key_tiles(p), dim = p.head_dim;
  const int64_t head_tile_floats = tiles * kKeyTile * dim;
  packed.kt.resize(static_cast<size_t>(p.batch * p.kv_heads * head_tile_floats));
  const bool pack_v = p.dtype != ScalarType::kFloat32;
  packed.v.resize(pack_v ? packed.kt.size() : 0);
  packed.key_bias.resize(static_cast<size_t>(p.batch * tiles * kKeyTile));
  packed.visible_keys.resize(static_cast<size_t>(p.batch * tiles));

#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      float* bias = packed.key_bias.data() + b * tiles * kKeyTile + t * kKeyTile;
      int64_t visible = 0;
      for (int64_t j = 0; j < kKeyTile; ++j) {
        const int64_t key = t * kKeyTile + j;
        bool seen = key < p.k_len;
        if (seen && p.kv_len != nullptr) seen = key < p.kv_len[b];
        if (seen && p.key_valid != nullptr) seen = p.key_valid[b * p.k_len + key];
        bias[j] = seen ? 0.0f : -kInf;
        visible += seen;
      }
      packed.visible_keys[b * tiles + t] = visible;
    }
  }

#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      for (int64_t t = 0; t < tiles; ++t) {
        float* kt = packed.kt.data() + (b * p.kv_heads + h) * head_tile_floats + t * kKeyTile * dim;
        float* vt = pack_v ? packed.v.data() + (b * p.kv_heads + h) * head_tile_floats + t * kKeyTile * dim : nullptr;
        float row[1024];  // head_dim <= 1024 is checked by the launcher
        for (int64_t j = 0; j < kKeyTile; ++j) {
          const int64_t key = t * kKeyTile + j;
          if (key < p.k_len) {
            load_row(p.k, p.dtype, b * p.k_stride[0] + key * p.k_stride[1] + h * p.k_stride[2], dim, 1.0f, row);
            for (int64_t d = 0; d < dim; ++d) kt[d * kKeyTile + j] = row[d];
            if (pack_v) {
              load_row(p.v, p.dtype, b * p.v_stride[0] + key * p.v_stride[1] + h * p.v_stride[2], dim, 1.0f,
                       vt + j * dim);
            }
          } else {
            for (int64_t d = 0; d < dim; ++d) kt[d * kKeyTile + j] = 0.0f;
          }
        }
      }
    }
  }
}

// Block-causal visibility of a (query tile, key tile) pair, from block indices alone.
enum class TileVisibility { kHidden, kPartial, kFull };

TileVisibility causal_visibility(const AttentionParams& p, int64_t q_begin, int64_t q_end, int64_t k_begin,
                                 int64_t k_end) {
  if (p.block_size == 0) return TileVisibility::kFull;
  const int64_t first_query_block = (p.q_offset + q_begin) / p.block_size;
  const int64_t last_query_block = (p.q_offset + q_end - 1) / p.block_size;
  if (k_begin / p.block_size > last_query_block) return TileVisibility::kHidden;
  if ((k_end - 1) / p.block_size <= first_query_block) return TileVisibility::kFull;
  return TileVisibility::kPartial;
}

// ------------------------------------------------------------------ one task

struct TaskBuffers {
  std::vector<float> q, s, o;
  std::vector<float> row_max, row_sum, alpha;
};

void attend_query_tile(const AttentionParams& p, const Packed& packed, int64_t b, int64_t h, int64_t q_begin,
                       TaskBuffers& buf) {
  const int64_t dim = p.head_dim, tiles = key_tiles(p);
  const int64_t rows = std::min(kQueryTile, p.q_len - q_begin);
  const int64_t kv_head = h / (p.q_heads / p.kv_heads);
  const int64_t head_tile_floats = tiles * kKeyTile * dim;
  const float* kt_head = packed.kt.data() + (b * p.kv_heads + kv_head) * head_tile_floats;
  const bool packed_v = !packed.v.empty();
  const float* v_head = packed_v ? packed.v.data() + (b * p.kv_heads + kv_head) * head_tile_floats
                                 : static_cast<const float*>(p.v) + b * p.v_stride[0] + kv_head * p.v_stride[2];
  const int64_t v_stride = packed_v ? dim : p.v_stride[1];

  for (int64_t r = 0; r < rows; ++r) {
    load_row(p.q, p.dtype, b * p.q_stride[0] + (q_begin + r) * p.q_stride[1] + h * p.q_stride[2], dim, p.scale,
             buf.q.data() + r * dim);
  }
  std::fill(buf.o.begin(), buf.o.begin() + rows * dim, 0.0f);
  std::fill(buf.row_max.begin(), buf.row_max.begin() + rows, -kInf);
  std::fill(buf.row_sum.begin(), buf.row_sum.begin() + rows, 0.0f);

  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t k_begin = t * kKeyTile;
    const int64_t keys = std::min(kKeyTile, p.k_len - k_begin);
    const int64_t visible_keys = packed.visible_keys[b * tiles + t];
    if (visible_keys == 0) continue;
    const TileVisibility causal = causal_visibility(p, q_begin, q_begin + rows, k_begin, k_begin + keys);
    if (causal == TileVisibility::kHidden) continue;

    float* s = buf.s.data();
    qk_tile(buf.q.data(), rows, dim, kt_head + t * kKeyTile * dim, s);
    const float* bias = packed.key_bias.data() + b * tiles * kKeyTile + k_begin;
    const bool key_masked = visible_keys < kKeyTile;  // includes the zero padding past k_len

    for (int64_t r = 0; r < rows; ++r) {
      float* srow = s + r * kKeyTile;
      if (key_masked) {
#pragma omp simd
        for (int64_t j = 0; j < kKeyTile; ++j) srow[j] += bias[j];
      }
      if (causal == TileVisibility::kPartial) {
        // Keys of later blocks than this query's: from this column on, hidden.
        const int64_t limit = ((p.q_offset + q_begin + r) / p.block_size + 1) * p.block_size - k_begin;
        for (int64_t j = std::max<int64_t>(limit, 0); j < kKeyTile; ++j) srow[j] = -kInf;
      }
      float tile_max = -kInf;
#pragma omp simd reduction(max : tile_max)
      for (int64_t j = 0; j < kKeyTile; ++j) tile_max = srow[j] > tile_max ? srow[j] : tile_max;
      const float new_max = std::max(buf.row_max[r], tile_max);
      if (new_max == -kInf) {  // this query has seen no key yet: contributes nothing
        std::fill(srow, srow + kKeyTile, 0.0f);
        buf.alpha[r] = 1.0f;
        continue;
      }
      // Hidden keys (-inf) come out as exp(-87) ~ 1.6e-38 rather than 0: invisible next to
      // the row maximum's exact 1, and one select fewer in the hottest loop.
      float tile_sum = 0.0f;
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t j = 0; j < kKeyTile; ++j) {
        const float e = fast_exp(srow[j] - new_max);
        srow[j] = e;
        tile_sum += e;
      }
      buf.alpha[r] = buf.row_max[r] == -kInf ? 0.0f : fast_exp(buf.row_max[r] - new_max);
      buf.row_sum[r] = buf.row_sum[r] * buf.alpha[r] + tile_sum;
      buf.row_max[r] = new_max;
    }
    pv_tile(s, rows, keys, dim, v_head + k_begin * v_stride, v_stride, buf.alpha.data(), buf.o.data());
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* orow = buf.o.data() + r * dim;
    const float inv = buf.row_sum[r] > 0.0f ? 1.0f / buf.row_sum[r] : 0.0f;  // no visible key: zeros
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) orow[d] *= inv;
    store_row(p.out, p.dtype, b * p.out_stride[0] + (q_begin + r) * p.out_stride[1] + h * p.out_stride[2], dim, orow);
  }
}

}  // namespace

Status attention_cpu(const AttentionParams& p) {
  if (p.batch < 0 || p.q_len < 0 || p.k_len < 0 || p.q_heads < 1 || p.kv_heads < 1 ||
      p.q_heads % p.kv_heads != 0 || p.head_dim < 1 || p.head_dim > 1024 || p.block_size < 0 || p.q_offset < 0) {
    return Status::kInvalidArgument;
  }
  if (p.batch * p.q_len == 0) return Status::kOk;
  if (p.q == nullptr || p.out == nullptr || (p.k_len > 0 && (p.k == nullptr || p.v == nullptr))) {
    return Status::kInvalidArgument;
  }
  std::lock_guard<std::mutex> lock(pack_mutex);
  Packed& packed = pack_buffers();
  pack(p, packed);
  const int64_t query_tiles = (p.q_len + kQueryTile - 1) / kQueryTile;
  const int64_t tasks = p.batch * p.q_heads * query_tiles;
#pragma omp parallel
  {
    TaskBuffers buf;
    buf.q.resize(kQueryTile * p.head_dim);
    buf.o.resize(kQueryTile * p.head_dim);
    buf.s.resize(kQueryTile * kKeyTile);
    buf.row_max.resize(kQueryTile);
    buf.row_sum.resize(kQueryTile);
    buf.alpha.resize(kQueryTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t q_tile = task % query_tiles;
      const int64_t h = (task / query_tiles) % p.q_heads;
      const int64_t b = task / (query_tiles * p.q_heads);
      attend_query_tile(p, packed, b, h, q_tile * kQueryTile, buf);
    }
  }
  return Status::kOk;
}

}  // namespace unmask
