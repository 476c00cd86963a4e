// What the attention kernels of one instruction-set build share: the buffers' alignment,
// the key tile, the key masks, block-causal tile visibility and the
// online softmax's row steps. attention.cpp runs float32 tiles on the vector units;
// attention_amx.cpp runs bfloat16 tiles on AMX where the build has it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "amx_tiles.h"
#include "isa.h"
#include "rows.h"
#include "simd.h"
#include "unmask/attention.h"
#include "vec_math.h"

namespace unmask::cpu {
inline namespace UNMASK_CPU_ISA {  // isa.h
namespace attention_detail {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Buffers the micro-kernels load whole vectors from start on a cache line: malloc's 16-byte
// alignment splits every 64-byte load across two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;
constexpr int64_t kKeyTile = 64;    // S row = 4 zmm; a K^T tile of D=128 is 32 KiB, L1-sized
constexpr int64_t kMaxHeadDim = 1024;

// The running maximum of a row moves only when a score passes it by more than this (log2
// units): weights then reach 2^8 at most, far inside float32's range, and most tiles of a
// row skip the maximum's horizontal reduction and the rescale of its sum and output (the
// lazy rescaling of FlashAttention-4; the softmax is the same).
constexpr float kMaxSlack = 8.0f;

// One row of S for a key tile, through the online softmax: masked by the key bias (when
// not null; a select, not an add: a hidden key's NaN score, from NaN in Q, is -inf too),
// the running maximum and sum updated, alpha set to the factor the row's output must be
// scaled by, and the weights 2^(s - max) written in place.
// - Hidden keys (-inf), and any weight more than 2^-126 below the maximum, get exactly 0:
//   a weight of 2^-126 times V rounds to a subnormal product, and every FMA that makes
//   one takes a microcode assist (a row of P V over hidden padding keys measured 8x
//   slower on Sapphire Rapids).
// - A NaN score (NaN in Q or a visible key) stays NaN and makes the row NaN, as in the
//   reference. A row that has seen no key yet contributes nothing, unless its scores are
//   NaN (NaN or inf in Q): then its output is NaN (the sum stays NaN through every tile).
// - Written against Simd where it is built, in registers: the omp simd loops left the
//   softmax at ~20% of a [1, 1024, 32, 128] call, mostly in horizontal reductions and the
//   exp's conversions, which kMaxSlack now skips on most tiles.
inline void online_softmax_row(float* srow, const float* bias, float& row_max, float& row_sum, float& alpha) {
  alpha = 1.0f;
#if defined(UNMASK_SIMD)
  // In registers: one load of the row, no horizontal maximum on most tiles.
  constexpr int kVecs = kKeyTile / Simd::kWidth;
  Simd::Reg x[kVecs];
  Simd::Reg max = Simd::set1(-kInf);
  for (int c = 0; c < kVecs; ++c) {
    x[c] = Simd::load(srow + c * Simd::kWidth);
    if (bias != nullptr) {  // a select, not an add: a hidden key's NaN score (NaN in Q) is -inf too
      const Simd::Reg b = Simd::load(bias + c * Simd::kWidth);
      x[c] = Simd::add(Simd::keep_or_zero(Simd::equal(b, Simd::zero()), x[c]), b);
    }
    max = Simd::max(x[c], max);  // a NaN score leaves the maximum alone
  }
  if (row_max == -kInf || Simd::bits(Simd::at_least(max, Simd::set1(row_max + kMaxSlack))) != 0) {
    const float new_max = std::max(row_max, Simd::reduce_max(max));
    if (new_max == -kInf) {
      for (int c = 0; c < kVecs; ++c) {
        if (Simd::bits(Simd::equal(x[c], x[c])) != (1u << Simd::kWidth) - 1) row_sum = kNaN;
      }
      std::fill(srow, srow + kKeyTile, 0.0f);
      return;
    }
    const float shift = row_max - new_max;
    alpha = shift >= -126.0f ? cpu::exp2_poly(shift) : 0.0f;
    row_max = new_max;
  }
  const Simd::Reg vmax = Simd::set1(row_max), lowest = Simd::set1(-126.0f);
  Simd::Reg z[kVecs];
  for (int c = 0; c < kVecs; ++c) {
    z[c] = Simd::sub(x[c], vmax);
    x[c] = Simd::max(lowest, z[c]);  // NaN where z is NaN (max returns its second operand)
  }
  cpu::exp2_interleaved(x);
  Simd::Reg sum = Simd::zero();
  for (int c = 0; c < kVecs; ++c) {
    x[c] = Simd::keep_or_zero(Simd::nan_or_at_least(z[c], lowest), x[c]);
    Simd::store(srow + c * Simd::kWidth, x[c]);
    sum = Simd::add(sum, x[c]);
  }
  row_sum = row_sum * alpha + Simd::reduce_add(sum);
#else
  float tile_max = -kInf;
  for (int64_t j = 0; j < kKeyTile; ++j) {
    if (bias != nullptr && bias[j] != 0.0f) srow[j] = -kInf;
    tile_max = srow[j] > tile_max ? srow[j] : tile_max;  // a NaN score leaves the maximum alone
  }
  if (row_max == -kInf || tile_max >= row_max + kMaxSlack) {
    const float new_max = std::max(row_max, tile_max);
    if (new_max == -kInf) {
      if (std::any_of(srow, srow + kKeyTile, [](float x) { return x != x; })) row_sum = kNaN;
      std::fill(srow, srow + kKeyTile, 0.0f);
      return;
    }
    const float shift = row_max - new_max;
    alpha = shift >= -126.0f ? cpu::exp2_poly(shift) : 0.0f;
    row_max = new_max;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < kKeyTile; ++j) {
    const float z = srow[j] - row_max;
    const float e = z < -126.0f ? 0.0f : z == z ? cpu::exp2_poly(z) : z;
    srow[j] = e;
    sum += e;
  }
  row_sum = row_sum * alpha + sum;
#endif
}

// 1 / a row's softmax sum: zeros for a query that saw no key (sum 0), NaN where the sum is.
inline float inverse_row_sum(float sum) { return sum > 0.0f ? 1.0f / sum : sum == 0.0f ? 0.0f : kNaN; }

// A query row's output o (D floats, scaled in place) divided by its softmax sum and
// stored at out[b, query, h] in the output dtype.
inline void store_output_row(const AttentionParams& p, int64_t b, int64_t query, int64_t h, float sum, float* o) {
  const float inv = inverse_row_sum(sum);
#pragma omp simd
  for (int64_t d = 0; d < p.head_dim; ++d) o[d] *= inv;
  store_row(p.out, p.dtype, row_offset(p.out_stride, b, query, h), p.head_dim, o);
}

// A bfloat16 element of an input read in place (the kernels' loads convert it to float32).
struct BFloat16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return cpu::bf16_to_float(x.bits); }

// dst[c][r] = src[r][c] as float32 for a rows x cols block (rows of src src_stride
// elements apart, of dst dst_stride floats apart). In 8 x 8 blocks of AVX registers where
// the build has them (24 shuffles per 64 floats): the scalar walks took 15-20% of a
// cached-block call (the K transpose, 32 queries x 1024 keys) and ~25% of a 32 x 32 one
// (the lanes kernel's Q^T and O^T, attention_lanes.cpp), one strided store or load per
// float. A bfloat16 source (K read in place) is converted as it is loaded.
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t src_stride, float* dst, int64_t dst_stride) {
  int64_t r0 = 0;
#if defined(UNMASK_SIMD)
  // Eight elements of a row as eight floats.
  const auto load8 = [](const T* at) {
    if constexpr (std::is_same_v<T, BFloat16>) {
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    } else {
      return _mm256_loadu_ps(at);
    }
  };
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(src + (r0 + i) * src_stride + c0);
      for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5), ...
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // quads: (a0 b0 c0 d0 | a4 b4 c4 d4), ...
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {  // halves: column i from rows 0-3 and 4-7, then column i + 4
        _mm256_storeu_ps(dst + (c0 + i) * dst_stride + r0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c0 + i + 4) * dst_stride + r0, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
    for (; c0 < cols; ++c0) {
      for (int64_t i = r0; i < r0 + 8; ++i) dst[c0 * dst_stride + i] = to_float(src[i * src_stride + c0]);
    }
  }
#endif
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t i = r0; i < rows; ++i) dst[c * dst_stride + i] = to_float(src[i * src_stride + c]);
  }
}

struct Packed {
  AlignedFloats kt;            // [batch][kv_heads][tiles][D][kKeyTile]
  AlignedFloats v;             // [batch][kv_heads][tiles][kKeyTile][D]
  AlignedFloats key_bias;      // [batch][tiles * kKeyTile]: 0 visible, -inf hidden (kv_len, key_valid, padding)
  std::vector<int64_t> visible_keys;  // [batch][tiles]: keys of the tile that key masks leave visible
};

// Threads an OpenMP parallel region of this call would run on (1 without OpenMP): the
// attention paths split their tasks so every one has work.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The tasks of a short query block (attention.cpp's head groups, attention_lanes): a
// batch row's kv heads in groups as large as still give each thread four tasks (a group's
// copy of a key's rows reads one stretch of memory), of at most max_per_group kv heads.
// With fewer kv heads than that (a batch of one under GQA or MQA), a kv head's query heads
// are split among tasks too, each copying the kv head's rows for itself.
struct HeadGroups {
  struct Task {
    int64_t b, first, last;   // batch row, kv heads [first, last)
    int64_t q_first, q_last;  // their query heads this task takes (none when q_first >= q_last)
  };

  int64_t group, per_group, groups, slices, per_slice;

  HeadGroups(const AttentionParams& p, int64_t max_per_group) : group(p.q_heads / p.kv_heads) {
    const int64_t wanted = 4 * max_threads();
    const int64_t groups_for_threads = std::clamp<int64_t>((wanted + p.batch - 1) / p.batch, 1, p.kv_heads);
    const int64_t for_threads = (p.kv_heads + groups_for_threads - 1) / groups_for_threads;
    per_group = std::max<int64_t>(1, std::min(for_threads, max_per_group));
    groups = (p.kv_heads + per_group - 1) / per_group;
    slices = per_group == 1 ? std::clamp<int64_t>((wanted + p.batch * groups - 1) / (p.batch * groups), 1, group) : 1;
    per_slice = (group + slices - 1) / slices;
  }

  int64_t tasks(const AttentionParams& p) const { return p.batch * groups * slices; }
  int64_t query_heads_per_task() const { return slices == 1 ? per_group * group : per_slice; }

  Task task(const AttentionParams& p, int64_t index) const {
    const int64_t slice = index % slices, b = index / (slices * groups);
    const int64_t first = (index / slices % groups) * per_group, last = std::min(p.kv_heads, first + per_group);
    const int64_t q_first = first * group + slice * per_slice;
    const int64_t q_last = slices == 1 ? last * group : std::min((first + 1) * group, q_first + per_slice);
    return {b, first, last, q_first, q_last};
  }
};

inline int64_t key_tiles(const AttentionParams& p) { return (p.k_len + kKeyTile - 1) / kKeyTile; }

// Sizes a pack buffer kept across calls: it grows as calls need (fresh memory every call
// would page-fault tens of MB per layer), and gives its memory back when a call needs under
// a quarter of what it holds above 64 MiB: one long prefill's pack (hundreds of MB at
// 4096 positions and a batch of 16) would otherwise stay held for the life of a server.
template <typename Buffer>
inline void fit_pack(Buffer& buffer, size_t need) {
  constexpr size_t kKeptBytes = size_t{64} << 20;
  if (buffer.capacity() * sizeof(typename Buffer::value_type) > kKeptBytes && need < buffer.capacity() / 4) {
    Buffer().swap(buffer);
  }
  buffer.resize(need);
}

// Sizes the buffers (the K and V ones when keys_too) and builds the key masks (K and V:
// pack_key_tile).
inline void pack_masks(const AttentionParams& p, Packed& packed, bool keys_too) {
  const int64_t tiles = key_tiles(p), dim = p.head_dim;
  const int64_t head_tile_floats = tiles * kKeyTile * dim;
  if (keys_too) {
    fit_pack(packed.kt, static_cast<size_t>(p.batch * p.kv_heads * head_tile_floats));
    fit_pack(packed.v, packed.kt.size());
  }
  packed.key_bias.resize(static_cast<size_t>(p.batch * tiles * kKeyTile));
  packed.visible_keys.resize(static_cast<size_t>(p.batch * tiles));

  // A thread per 64 key tiles at least: below that the fork and join cost more than the work.
#pragma omp parallel for collapse(2) schedule(static) if (p.batch * tiles >= 64)
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
}

// Key `key` of (batch b, kv head h): its K and V rows in float32 where `visible`, zeros
// where it is hidden (kv_len, key_valid) or past k_len. Hidden keys are never read: a
// cache's rows past kv_len may hold anything, NaN included, and 0 * NaN in P V would
// poison a row.
inline void copy_key_rows(const AttentionParams& p, int64_t b, int64_t key, int64_t h, bool visible, float* k_row,
                          float* v_row) {
  const int64_t dim = p.head_dim;
  if (visible) {
    load_row(p.k, p.dtype, row_offset(p.k_stride, b, key, h), dim, 1.0f, k_row);
    load_row(p.v, p.dtype, row_offset(p.v_stride, b, key, h), dim, 1.0f, v_row);
  } else {
    std::fill(k_row, k_row + dim, 0.0f);
    std::fill(v_row, v_row + dim, 0.0f);
  }
}

// The next key tile's K and V rows of a task's kv heads, asked for in L2 a few lines at a
// time between the current tile's micro-kernel calls (step), so that memory reads the next
// tile while the core computes on this one. Asked for in one burst before the compute (as
// before), the prefetches filled the core's miss buffers and waited on memory as a copy
// would: reading a tile and computing on it took turns. Spread, a cached-block call
// ([1-4, 32, 8, 128] against 1024-4096 keys, K and V from DRAM) measured 1.04-1.13x
// faster. A prefetch is a hint: nothing is faulted in, and a hidden row it brings into
// cache (its values are not looked at) is never read by the kernels.
class SpreadPrefetch {
 public:
  // Keys [first_key, end_key) of kv heads [first_head, end_head) of batch row b, spread
  // over about `steps` calls of step().
  void start(const AttentionParams& p, int64_t b, int64_t first_key, int64_t end_key, int64_t first_head,
             int64_t end_head, int64_t steps) {
    const int64_t element_bytes = p.dtype == ScalarType::kFloat32 ? 4 : 2;
    k_ = static_cast<const char*>(p.k);
    v_ = static_cast<const char*>(p.v);
    // Byte strides: a batch row, a key, a head; of K then V.
    for (int i = 0; i < 3; ++i) {
      k_stride_[i] = p.k_stride[i] * element_bytes;
      v_stride_[i] = p.v_stride[i] * element_bytes;
    }
    b_ = b;
    key_ = first_key;
    end_key_ = std::min(end_key, p.k_len);
    first_head_ = head_ = first_head;
    end_head_ = end_head;
    line_ = 0;
    row_bytes_ = p.head_dim * element_bytes;
    // A row that may start inside a cache line can end in one more line than its length
    // covers: then its last byte is asked for too.
    misaligned_ = (reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v) |
                   static_cast<uintptr_t>(k_stride_[0] | k_stride_[1] | k_stride_[2] | v_stride_[0] | v_stride_[1] |
                                          v_stride_[2])) % 64 != 0;
    const int64_t per_row = (row_bytes_ + 63) / 64 + (misaligned_ ? 1 : 0);
    const int64_t lines = std::max<int64_t>(0, end_key_ - key_) * (end_head - first_head) * per_row;
    per_step_ = (lines + std::max<int64_t>(steps, 1) - 1) / std::max<int64_t>(steps, 1);
  }

  // The next per_step_ lines of K and of V (a row's positions: every 64 bytes from its
  // start, then its last byte where rows may start inside a line).
  void step() {
    for (int64_t n = 0; n < per_step_ && key_ < end_key_; ++n) {
      __builtin_prefetch(k_ + b_ * k_stride_[0] + key_ * k_stride_[1] + head_ * k_stride_[2] + line_, 0, 2);
      __builtin_prefetch(v_ + b_ * v_stride_[0] + key_ * v_stride_[1] + head_ * v_stride_[2] + line_, 0, 2);
      if (line_ + 64 < row_bytes_) {
        line_ += 64;
        continue;
      }
      if (misaligned_ && line_ != row_bytes_ - 1) {
        line_ = row_bytes_ - 1;
        continue;
      }
      line_ = 0;
      if (++head_ < end_head_) continue;
      head_ = first_head_;
      ++key_;
    }
  }

 private:
  const char* k_ = nullptr;
  const char* v_ = nullptr;
  int64_t k_stride_[3] = {}, v_stride_[3] = {};
  int64_t b_ = 0, key_ = 0, end_key_ = 0, first_head_ = 0, head_ = 0, end_head_ = 0, line_ = 0, row_bytes_ = 0;
  int64_t per_step_ = 0;
  bool misaligned_ = false;
};

// The K^T and V tiles of key tile t of batch b, for every kv head. Key-major, the order
// of the inputs in memory ([B, L, H, D]: a key's heads are adjacent): walked head by
// head instead, each 512-byte row of a 128-dim head lay 16 KiB from the next, a new
// page per row that the hardware prefetcher does not cross (packing measured 10.3 ms
// that way, 8-9 ms this way, of a ~150 ms [1, 1024, 32, 128] call).

// Block-causal visibility of a (query tile, key tile) pair, from block indices alone.
enum class TileVisibility { kHidden, kPartial, kFull };

inline TileVisibility causal_visibility(const AttentionParams& p, int64_t q_begin, int64_t q_end, int64_t k_begin,
                                 int64_t k_end) {
  if (p.block_size == 0) return TileVisibility::kFull;
  const int64_t first_query_block = (p.q_offset + q_begin) / p.block_size;
  const int64_t last_query_block = (p.q_offset + q_end - 1) / p.block_size;
  if (k_begin / p.block_size > last_query_block) return TileVisibility::kHidden;
  if ((k_end - 1) / p.block_size <= first_query_block) return TileVisibility::kFull;
  return TileVisibility::kPartial;
}

// Key tile t of batch b as the query rows [q_begin, q_begin + rows) meet it.
struct KeyTile {
  int64_t begin, keys;   // its first key and its keys before k_len
  int64_t visible_keys;  // those the key masks leave visible
  TileVisibility causal;
  const float* bias;     // its kKeyTile entries of packed.key_bias
  bool key_masked() const { return visible_keys < kKeyTile; }  // includes the zero padding past k_len
  bool hidden() const { return visible_keys == 0 || causal == TileVisibility::kHidden; }  // skipped, never computed
};

inline KeyTile key_tile(const AttentionParams& p, const Packed& packed, int64_t b, int64_t t, int64_t q_begin,
                        int64_t rows) {
  const int64_t tiles = key_tiles(p), begin = t * kKeyTile, keys = std::min(kKeyTile, p.k_len - begin);
  return KeyTile{begin, keys, packed.visible_keys[b * tiles + t],
                 causal_visibility(p, q_begin, q_begin + rows, begin, begin + keys),
                 packed.key_bias.data() + b * tiles * kKeyTile + begin};
}

// row_keys[r]: how many of the tile's keys query row q_begin + r sees under the
// block-causal mask (keys of later blocks than a query's are hidden), for a tile the
// diagonal cuts (TileVisibility::kPartial).
inline void causal_row_keys(const AttentionParams& p, const KeyTile& tile, int64_t q_begin, int64_t rows,
                            int64_t* row_keys) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t limit = ((p.q_offset + q_begin + r) / p.block_size + 1) * p.block_size - tile.begin;
    row_keys[r] = std::clamp<int64_t>(limit, 0, kKeyTile);
  }
}

// Blocks of kLaneMinRows..kLaneRows queries (a cached decoding step's block of 32) run
// with the queries along the lanes of two zmm (attention_lanes.cpp; AVX-512 builds).
// Against the tiled kernel, same session, on [B, 32, H, D] against 1024-4096 keys:
// 1.28-1.52x SDPA instead of 1.16-1.32x. Shorter blocks leave lanes idle and measured
// no faster (24 and 16 queries) or slower (8 queries against 512 keys, 0.8x).
constexpr int64_t kLaneRows = 32;
constexpr int64_t kLaneMinRows = 25;
#if defined(__AVX512F__)
inline bool lanes_apply(const AttentionParams& p) { return p.q_len >= kLaneMinRows && p.q_len <= kLaneRows; }
void attention_lanes(const AttentionParams& p, const Packed& packed);
#else
inline bool lanes_apply(const AttentionParams&) { return false; }
#endif

// One query (q_len 1): its row against the keys read in place, nothing packed
// (attention_one_query.cpp).
void attention_one_query(const AttentionParams& p, const Packed& packed);

// The AMX build's bfloat16 kernel (attention_amx.cpp); other builds do not define it.
#if defined(UNMASK_AMX)  // amx_tiles.h
Status attention_amx_bf16(const AttentionParams& p, Packed& packed);
#endif

}  // namespace attention_detail
}  // namespace UNMASK_CPU_ISA
}  // namespace unmask::cpu
