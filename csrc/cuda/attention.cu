// attention on CUDA: FlashAttention-2 (Dao, 2023, Algorithm 1) forward with tensor-core
// mma.sync.m16n8k16 (fp32 accumulators), ldmatrix from swizzled shared memory, cp.async
// loads and an online softmax in registers.
//
// Rows. A thread block owns 128 "packed" query rows of one (batch, kv head): packed row
// r is query i = r / group of query head kv_head * group + r % group. The heads of a GQA
// group thus share every K/V tile the block loads (GQA by indexing, no key copies), and
// a short query block (32 tokens x 4 heads) still fills a 128-row tile.
//
// Pipeline (one K and one V buffer, as in FlashAttention-2's forward): the copy of V_j
// overlaps S = Q K_j^T and the softmax; the copy of the next K overlaps O += P V_j.
// Q goes to registers once. Key tiles of 64: one 64-bit visibility mask per tile (two
// warp ballots over kv_len, k_len and one key_valid byte per key) decides whether the
// tile is skipped (nothing visible), computed unmasked (everything visible) or masked.
// Block-causal tiles above the block diagonal of the whole query tile are never visited.
//
// Short queries (cached decoding: 32-128 tokens against thousands of keys) leave most
// SMs idle with one block per query tile, so the key tiles are split across blocks
// (split-KV): each split writes its normalised partial output and log-sum-exp in fp32
// to the workspace and a second kernel combines them.
//
// sm_80 and sm_90 both run this mma.sync kernel. Hopper's wgmma would need sm_90a-only
// code, TMA and warp-specialised pipelines (FlashAttention-3); not done here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda_check.cuh"
#include "ptx.cuh"
#include "unmask/attention_cuda.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh
namespace {

constexpr int kBlockM = 128;  // packed query rows per thread block
// Keys per tile: 64 keys x 2 bytes x D per K or V buffer (16 KiB at D = 128), and one
// visibility mask of two warp ballots.
constexpr int kBlockN = 64;
constexpr int kMinTilesPerSplit = 4;  // a split streams at least 256 keys, so its epilogue stays small
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

// Warps and 16-row mma tiles per warp. Q stays in registers (kMTiles * D / 16 * 4 words),
// so rows per warp shrink as D grows: D = 64 gives each warp 32 rows (twice the work per
// K/V fragment read from shared memory); D = 128 keeps 16 rows per warp (64 accumulator
// + 32 score + 32 Q registers) and uses 8 warps for the same 128-row tile.
template <int kHeadDim>
struct TileConfig;
template <>
struct TileConfig<64> {
  static constexpr int kWarps = 4, kMTiles = 2;
};
template <>
struct TileConfig<128> {
  static constexpr int kWarps = 8, kMTiles = 1;
};

template <int kHeadDim>
constexpr int shared_bytes() {
  return (kBlockM + 2 * kBlockN) * kHeadDim * 2;  // Q tile, one K and one V tile
}

struct Launch {
  int64_t group;       // query heads per kv head
  int64_t rows;        // packed query rows per (batch, kv head): q_len * group
  int64_t total_rows;  // batch * kv_heads * rows
  int splits;
  int tiles_per_split;
  float scale_log2;    // scale * log2(e): scores live in the exp2 domain
  float* partial_out;  // [splits][total_rows][head_dim], split launches only
  float* partial_lse;  // [splits][total_rows], log2 domain; -inf where a split saw no key
};

// A T value as float, and p rounded to T as pack() rounds it for the P V product.
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float as_operand(float p, __nv_bfloat16) { return __bfloat162float(__floats2bfloat162_rn(p, p).x); }
__device__ __forceinline__ float as_operand(float p, __half) { return __half2float(__floats2half2_rn(p, p).x); }
// The exponent bits of T: all set for inf and NaN.
__device__ __forceinline__ uint16_t exponent_bits(__nv_bfloat16) { return 0x7F80; }
__device__ __forceinline__ uint16_t exponent_bits(__half) { return 0x7C00; }

// ------------------------------------------------------------------ tiles and masks

// Byte offset of 16-byte chunk `chunk` of tile row `row`. A row is D / 8 chunks; the
// chunk index is XORed with row % 8 so that the 8 row addresses of one ldmatrix phase
// (same logical chunk, consecutive rows) land in 8 different 16-byte bank groups, and a
// warp's cp.async writes of one row stay conflict-free too.
template <int kHeadDim>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>((row * (kHeadDim / 8) + (chunk ^ (row % 8))) * 16);
}

// Keys at or past the end of this query's block are hidden (block-causal).
__device__ __forceinline__ int64_t block_end(const AttentionParams& p, int64_t query) {
  return ((p.q_offset + query) / p.block_size + 1) * p.block_size;
}

// One K or V tile: rows at or past key_limit (k_len, kv_len, and the end of the block of
// the query tile's last query under the block-causal mask) and rows key_valid hides (bit r
// of `visible`, the tile's key_mask) are zero-filled, so stale cache contents (even NaN)
// never reach the products: a hidden key's weight is 0, and 0 times NaN is NaN.
template <typename T, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_key_tile(uint32_t dst, const T* base, const int64_t (&stride)[3], int64_t batch,
                                              int64_t head, int tile, int64_t key_limit, uint64_t visible) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kBlockN * kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int step = 0; step < kBlockN * kChunks / kThreads; ++step) {
    const int index = step * kThreads + threadIdx.x;
    const int r = index / kChunks, c = index % kChunks;
    const int64_t key = static_cast<int64_t>(tile) * kBlockN + r;
    const bool valid = key < key_limit && ((visible >> r) & 1) != 0;
    const T* src = valid ? base + batch * stride[0] + key * stride[1] + head * stride[2] + c * 8 : base;
    cp_async_16(dst + swizzled<kHeadDim>(r, c), src, valid);
  }
}

// This lane's two keys of a tile (lane and lane + 32): loaded early, reduced to a mask later,
// so the key_valid read latency hides behind a tile's products.
struct KeyProbe {
  bool low, high;
};

__device__ __forceinline__ KeyProbe probe_keys(const AttentionParams& p, int64_t batch, int64_t key_limit, int tile) {
  const int64_t k0 = static_cast<int64_t>(tile) * kBlockN + threadIdx.x % 32, k1 = k0 + 32;
  KeyProbe probe{k0 < key_limit, k1 < key_limit};
  if (p.key_valid != nullptr) {
    const bool* valid = p.key_valid + batch * p.k_len;
    probe.low = probe.low && valid[k0];
    probe.high = probe.high && valid[k1];
  }
  return probe;
}

// Bit c: key tile * 64 + c is visible to every query as far as kv_len, k_len and
// key_valid go. Called by whole warps; every warp computes the same mask.
__device__ __forceinline__ uint64_t key_mask(KeyProbe probe) {
  const uint32_t low = __ballot_sync(0xFFFFFFFFu, probe.low);
  const uint32_t high = __ballot_sync(0xFFFFFFFFu, probe.high);
  return static_cast<uint64_t>(low) | (static_cast<uint64_t>(high) << 32);
}

// Whether V's 16-key slice kb of the tile in shared memory holds an inf or NaN. Called by
// whole warps (the answer is warp-uniform).
template <typename T, int kHeadDim>
__device__ __forceinline__ bool slice_holds_non_finite(const char* v_tile, int kb, int lane) {
  constexpr int kChunks = kHeadDim / 8;
  const uint16_t exponent = exponent_bits(T());
  bool found = false;
  for (int index = lane; index < 16 * kChunks; index += 32) {
    const uint16_t* chunk =
        reinterpret_cast<const uint16_t*>(v_tile + swizzled<kHeadDim>(kb * 16 + index / kChunks, index % kChunks));
#pragma unroll
    for (int i = 0; i < 8; ++i) found = found || (chunk[i] & exponent) == exponent;
  }
  return __ballot_sync(0xFFFFFFFFu, found) != 0;
}

// O += P V over 16-key slice kb for one 16-row mma tile, row by row, each row over the keys
// it sees only: for a slice some rows of the tile see and others do not whose V holds an
// inf or NaN (the mma would multiply it by the others' zero weights). p is rounded to T as
// the mma's operand is. Called by whole warps (the shuffles gather a row's 16 weights from
// the four lanes of its quad).
template <typename T, int kHeadDim, int kNBlocks, int kDBlocks>
__device__ __forceinline__ void add_slice_row_by_row(float (&o)[kDBlocks][4], const float (&s)[kNBlocks][4],
                                                     const int (&row_limit)[2], const char* v_tile, int kb,
                                                     int slice_key, int lane) {
  const int tig = lane % 4;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      // Key column kb * 16 + c of row rr: element 2 rr + c % 2 of n8 block 2 kb + c / 8 in
      // lane tig = (c % 8) / 2 of the quad.
      const float p = __shfl_sync(0xFFFFFFFFu, s[2 * kb + c / 8][2 * rr + c % 2], (lane & ~3) | ((c % 8) / 2));
      if (slice_key + c >= row_limit[rr]) continue;  // hidden from this row
      const float weight = as_operand(p, T());
#pragma unroll
      for (int db = 0; db < kDBlocks; ++db) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = db * 8 + 2 * tig + e;
          const T value = *reinterpret_cast<const T*>(v_tile + swizzled<kHeadDim>(kb * 16 + c, d / 8) + (d % 8) * 2);
          o[db][2 * rr + e] += weight * to_float(value);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ forward kernel

// Grid: (batch * kv_heads, query tiles of kBlockM packed rows, splits): batch * heads on x,
// whose limit is 2^31 - 1, not 65535.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(TileConfig<kHeadDim>::kWarps * 32)
    attention_forward_kernel(const AttentionParams p, const Launch a) {
  constexpr int kWarps = TileConfig<kHeadDim>::kWarps, kMTiles = TileConfig<kHeadDim>::kMTiles;
  constexpr int kThreads = kWarps * 32;
  constexpr int kRowsPerWarp = 16 * kMTiles;
  static_assert(kWarps * kRowsPerWarp == kBlockM, "warps must cover the query tile");
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kKSteps = kHeadDim / 16;  // k16 steps of Q K^T
  constexpr int kNBlocks = kBlockN / 8;   // n8 blocks of S per m16 tile
  constexpr int kDBlocks = kHeadDim / 8;  // n8 blocks of O per m16 tile

  UNMASK_DYNAMIC_SHARED(uint4, shared_words);  // uint4: 16-byte aligned for cp.async and ldmatrix
  const uint32_t sq = shared_address(shared_words);
  const uint32_t sk = sq + kBlockM * kHeadDim * 2;
  const uint32_t sv = sk + kBlockN * kHeadDim * 2;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int group_id = lane / 4, tig = lane % 4;  // mma fragment coordinates
  // blockIdx.x: (batch, kv head), up to 2^31 - 1 of them; blockIdx.y: the query tile.
  const int64_t batch = blockIdx.x / p.kv_heads, kv_head = blockIdx.x % p.kv_heads;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int rows_here = static_cast<int>(a.rows - row0 < kBlockM ? a.rows - row0 : kBlockM);
  const int warp_row0 = warp * kRowsPerWarp;
  // Warps whose rows all lie past the end (short query blocks) load and synchronise but
  // skip the products.
  const bool warp_active = warp_row0 < rows_here;

  int64_t key_limit = p.k_len;
  if (p.kv_len != nullptr) {
    const int64_t n = p.kv_len[batch];
    key_limit = n < key_limit ? (n > 0 ? n : 0) : key_limit;
  }
  int64_t key_end = key_limit;
  if (p.block_size > 0) {
    const int64_t last_query_end = block_end(p, (row0 + rows_here - 1) / a.group);
    key_end = last_query_end < key_end ? last_query_end : key_end;
  }
  const int tiles = static_cast<int>((key_end + kBlockN - 1) / kBlockN);
  const int tile_begin = blockIdx.z * a.tiles_per_split;
  const int tile_end = tiles < tile_begin + a.tiles_per_split ? tiles : tile_begin + a.tiles_per_split;

  // Per accumulator row (mt, rr): keys >= row_limit are hidden (block end, key_limit).
  int row_limit[kMTiles][2];
  int min_row_limit = INT_MAX;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      int64_t limit = key_limit;
      if (p.block_size > 0) {
        const int64_t end = block_end(p, (row0 + warp_row0 + mt * 16 + group_id + 8 * rr) / a.group);
        limit = end < limit ? end : limit;
      }
      row_limit[mt][rr] = static_cast<int>(limit);
      min_row_limit = row_limit[mt][rr] < min_row_limit ? row_limit[mt][rr] : min_row_limit;
    }
  }
  // Per 16-row mma tile of this warp, its rows' first and last key limits. Keys from
  // mtile_limit on are hidden from all 16 rows, so O += P V skips each 16-key slice from
  // there (its P is 0 in every row, and 0 times a NaN or inf in V would still be NaN).
  // Keys in [mtile_first_limit, key_end) are read and hidden from some rows but not all:
  // a slice holding one is "mixed", and where its V holds an inf or NaN it is added row
  // by row (add_slice_row_by_row). Where block_size and q_offset are multiples of 16 a
  // tile's rows share one block and no slice is mixed.
  int mtile_limit[kMTiles], mtile_first_limit[kMTiles];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    int last = row_limit[mt][0] > row_limit[mt][1] ? row_limit[mt][0] : row_limit[mt][1];
    int first = row_limit[mt][0] < row_limit[mt][1] ? row_limit[mt][0] : row_limit[mt][1];
#pragma unroll
    for (int lanes = 4; lanes < 32; lanes *= 2) {  // over the 8 row groups (lane / 4) of the tile
      const int other_last = __shfl_xor_sync(0xFFFFFFFFu, last, lanes);
      const int other_first = __shfl_xor_sync(0xFFFFFFFFu, first, lanes);
      last = other_last > last ? other_last : last;
      first = other_first < first ? other_first : first;
    }
    mtile_limit[mt] = last;
    mtile_first_limit[mt] = first;
  }
  const char* const v_tile = reinterpret_cast<const char*>(shared_words) + (sv - sq);

  float o[kMTiles][kDBlocks][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // log2 domain; row_sum is this thread's share
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int db = 0; db < kDBlocks; ++db) o[mt][db][0] = o[mt][db][1] = o[mt][db][2] = o[mt][db][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  int tile = tile_begin;
  uint64_t mask = 0;
  while (tile < tile_end && (mask = key_mask(probe_keys(p, batch, key_limit, tile))) == 0) ++tile;

  uint32_t qf[kMTiles][kKSteps][4];  // A fragments of this warp's Q rows
  if (tile < tile_end) {
    static_assert(kBlockM * kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int step = 0; step < kBlockM * kChunks / kThreads; ++step) {
      const int index = step * kThreads + threadIdx.x;
      const int r = index / kChunks, c = index % kChunks;
      const int64_t row = row0 + r;
      const bool valid = r < rows_here;
      const int64_t query = row / a.group, head = kv_head * a.group + row % a.group;
      const T* src = valid ? q + batch * p.q_stride[0] + query * p.q_stride[1] + head * p.q_stride[2] + c * 8 : q;
      cp_async_16(sq + swizzled<kHeadDim>(r, c), src, valid);
    }
    load_key_tile<T, kHeadDim, kThreads>(sk, k, p.k_stride, batch, kv_head, tile, key_end, mask);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (warp_active) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          // Lanes 0-15 address rows 0-15 at chunk 2ks, lanes 16-31 the same rows at 2ks+1:
          // registers a0..a3 = (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
          ldmatrix_x4(qf[mt][ks], sq + swizzled<kHeadDim>(warp_row0 + mt * 16 + lane % 16, 2 * ks + lane / 16));
        }
      }
    }
  }

  while (tile < tile_end) {
    cp_async_wait_all();
    __syncthreads();  // K of this tile has landed; every warp is done with the previous V
    load_key_tile<T, kHeadDim, kThreads>(sv, v, p.v_stride, batch, kv_head, tile, key_end, mask);
    cp_async_commit();
    const KeyProbe ahead = probe_keys(p, batch, key_limit, tile + 1);

    float s[kMTiles][kNBlocks][4];
    if (warp_active) {
      // S = Q K^T. K rows are keys, so the B operand (K^T, column-major) is K itself,
      // untransposed: lanes 0-7 / 8-15 / 16-23 / 24-31 address keys 0-7 / 0-7 / 8-15 /
      // 8-15 at chunks 2ks / 2ks+1 / 2ks / 2ks+1, giving b0, b1 of two n8 blocks.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.0f;
      }
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kNBlocks / 2; ++np) {
          uint32_t kf[4];
          ldmatrix_x4(kf, sk + swizzled<kHeadDim>(np * 16 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma(s[mt][2 * np], qf[mt][ks], kf[0], kf[1], T());
            mma(s[mt][2 * np + 1], qf[mt][ks], kf[2], kf[3], T());
          }
        }
      }

      // Accumulator element e of n8 block nb: row group_id + 8 * (e / 2), key column
      // nb * 8 + 2 * tig + e % 2.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] *= a.scale_log2;
        }
      }
      const int key0 = tile * kBlockN;
      if (mask != ~0ull || key0 + kBlockN > min_row_limit) {  // some key of the tile is hidden from some row
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int column = nb * 8 + 2 * tig + e % 2;
              const bool seen = ((mask >> column) & 1) != 0 && key0 + column < row_limit[mt][e / 2];
              s[mt][nb][e] = seen ? s[mt][nb][e] : -INFINITY;
            }
          }
        }
      }

      // Online softmax. A row's 64 scores sit in the 4 lanes of a quad (same group_id).
      // While a row has seen no key its max stays -inf and the exponent base is 0, so
      // exp2 never sees (-inf) - (-inf): hidden scores give 0, alpha gives 0.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
            tile_max = fmaxf(tile_max, fmaxf(s[mt][nb][2 * rr], s[mt][nb][2 * rr + 1]));
          }
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFFu, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xFFFFFFFFu, tile_max, 2));
          const float new_max = fmaxf(row_max[mt][rr], tile_max);
          const float base = new_max == -INFINITY ? 0.0f : new_max;
          const float alpha = exp2_approx(row_max[mt][rr] - base);
          row_max[mt][rr] = new_max;
          float tile_sum = 0.0f;
#pragma unroll
          for (int nb = 0; nb < kNBlocks; ++nb) {
            s[mt][nb][2 * rr] = exp2_approx(s[mt][nb][2 * rr] - base);
            s[mt][nb][2 * rr + 1] = exp2_approx(s[mt][nb][2 * rr + 1] - base);
            tile_sum += s[mt][nb][2 * rr] + s[mt][nb][2 * rr + 1];
          }
          row_sum[mt][rr] = row_sum[mt][rr] * alpha + tile_sum;
#pragma unroll
          for (int db = 0; db < kDBlocks; ++db) {
            o[mt][db][2 * rr] *= alpha;
            o[mt][db][2 * rr + 1] *= alpha;
          }
        }
      }
    }

    int next = tile + 1;
    uint64_t next_mask = next < tile_end ? key_mask(ahead) : 0;
    while (next < tile_end && next_mask == 0) {
      ++next;
      if (next < tile_end) next_mask = key_mask(probe_keys(p, batch, key_limit, next));
    }

    cp_async_wait_all();
    __syncthreads();  // V of this tile has landed; every warp is done with K
    if (next < tile_end) {
      load_key_tile<T, kHeadDim, kThreads>(sk, k, p.k_stride, batch, kv_head, next, key_end, next_mask);
      cp_async_commit();
    }

    if (warp_active) {
      // O += P V. The S accumulators of n8 blocks 2kb and 2kb+1 are exactly the A
      // fragment of keys 16kb..16kb+15 (rounded to T). V rows are keys, so B = V needs
      // the transposing ldmatrix: lanes 0-15 address keys 0-15 at chunk 2dp, lanes 16-31
      // at 2dp+1, giving b0, b1 of d blocks 2dp and 2dp+1.
#pragma unroll
      for (int kb = 0; kb < kBlockN / 16; ++kb) {
        const int slice_key = tile * kBlockN + kb * 16;
        bool seen[kMTiles], mixed[kMTiles], any_mixed = false;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {  // warp-uniform: the limits are the same in every lane
          seen[mt] = slice_key < mtile_limit[mt];
          mixed[mt] = seen[mt] && slice_key < key_end && slice_key + 16 > mtile_first_limit[mt] &&
                      mtile_first_limit[mt] < key_end;
          any_mixed = any_mixed || mixed[mt];
        }
        if (any_mixed && slice_holds_non_finite<T, kHeadDim>(v_tile, kb, lane)) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            if (!mixed[mt]) continue;
            add_slice_row_by_row<T, kHeadDim>(o[mt], s[mt], row_limit[mt], v_tile, kb, slice_key, lane);
            seen[mt] = false;  // done
          }
        }
        bool any_seen = false;
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) any_seen = any_seen || seen[mt];
        if (!any_seen) continue;
        uint32_t pf[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          pf[mt][0] = pack(s[mt][2 * kb][0], s[mt][2 * kb][1], T());
          pf[mt][1] = pack(s[mt][2 * kb][2], s[mt][2 * kb][3], T());
          pf[mt][2] = pack(s[mt][2 * kb + 1][0], s[mt][2 * kb + 1][1], T());
          pf[mt][3] = pack(s[mt][2 * kb + 1][2], s[mt][2 * kb + 1][3], T());
        }
#pragma unroll
        for (int dp = 0; dp < kDBlocks / 2; ++dp) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, sv + swizzled<kHeadDim>(kb * 16 + lane % 16, 2 * dp + lane / 16));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            if (!seen[mt]) continue;
            mma(o[mt][2 * dp], pf[mt], vf[0], vf[1], T());
            mma(o[mt][2 * dp + 1], pf[mt], vf[2], vf[3], T());
          }
        }
      }
    }
    tile = next;
    mask = next_mask;
  }

  // Epilogue: 4-byte (T pairs) or 8-byte (fp32 pairs) stores straight from the
  // accumulators; for the key lengths this kernel is for, the output is well under 1% of
  // the traffic and not worth a pass through shared memory.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float sum = row_sum[mt][rr];
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a query that saw no key: zeros
      const int r = warp_row0 + mt * 16 + group_id + 8 * rr;
      if (r >= rows_here) continue;
      const int64_t row = row0 + r;
      if (a.splits == 1) {
        const int64_t query = row / a.group, head = kv_head * a.group + row % a.group;
        T* dst = static_cast<T*>(p.out) + batch * p.out_stride[0] + query * p.out_stride[1] + head * p.out_stride[2];
#pragma unroll
        for (int db = 0; db < kDBlocks; ++db) {
          *reinterpret_cast<uint32_t*>(dst + db * 8 + 2 * tig) =
              pack(o[mt][db][2 * rr] * inv, o[mt][db][2 * rr + 1] * inv, T());
        }
      } else {
        const int64_t index = static_cast<int64_t>(blockIdx.z) * a.total_rows + blockIdx.x * a.rows + row;
        float* dst = a.partial_out + index * kHeadDim;
#pragma unroll
        for (int db = 0; db < kDBlocks; ++db) {
          *reinterpret_cast<float2*>(dst + db * 8 + 2 * tig) =
              make_float2(o[mt][db][2 * rr] * inv, o[mt][db][2 * rr + 1] * inv);
        }
        if (tig == 0) a.partial_lse[index] = sum > 0.0f ? row_max[mt][rr] + __log2f(sum) : -INFINITY;
      }
    }
  }
}

// ------------------------------------------------------------------ split-KV combine

constexpr int kCombineThreads = 256;

// out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse): one thread per four
// output elements of a packed row; reads splits * (D + 1) floats per row (L2-resident
// right after the forward kernel wrote them).
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(const AttentionParams p, const Launch a) {
  const int lanes_per_row = static_cast<int>(p.head_dim / 4);
  const int64_t rows_per_block = kCombineThreads / lanes_per_row;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / lanes_per_row;
  if (index >= a.total_rows) return;
  const int d = (threadIdx.x % lanes_per_row) * 4;

  float best = -INFINITY;
  for (int s = 0; s < a.splits; ++s) best = fmaxf(best, a.partial_lse[s * a.total_rows + index]);
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float weights = 0.0f;
  if (best > -INFINITY) {
    for (int s = 0; s < a.splits; ++s) {
      const float lse = a.partial_lse[s * a.total_rows + index];
      if (lse == -INFINITY) continue;  // this split saw no key of the row
      const float w = exp2f(lse - best);
      const float4 part = *reinterpret_cast<const float4*>(a.partial_out + (s * a.total_rows + index) * p.head_dim + d);
      acc.x += w * part.x;
      acc.y += w * part.y;
      acc.z += w * part.z;
      acc.w += w * part.w;
      weights += w;
    }
  }
  const float inv = weights > 0.0f ? 1.0f / weights : 0.0f;

  const int64_t bh = index / a.rows, row = index % a.rows;
  const int64_t batch = bh / p.kv_heads, kv_head = bh % p.kv_heads;
  const int64_t query = row / a.group, head = kv_head * a.group + row % a.group;
  T* dst = static_cast<T*>(p.out) + batch * p.out_stride[0] + query * p.out_stride[1] + head * p.out_stride[2] + d;
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack(acc.x * inv, acc.y * inv, T()), pack(acc.z * inv, acc.w * inv, T()));
}

// ------------------------------------------------------------------ host side

struct Plan {
  Launch launch;
  int64_t query_tiles;
};

Plan plan_launch(const AttentionParams& p) {
  Plan plan{};
  Launch& a = plan.launch;
  a.group = p.q_heads / p.kv_heads;
  a.rows = p.q_len * a.group;
  a.total_rows = p.batch * p.kv_heads * a.rows;
  a.scale_log2 = p.scale * kLog2e;
  plan.query_tiles = (a.rows + kBlockM - 1) / kBlockM;

  // Key tiles some query can see (kv_len lives on the device and only shortens this).
  int64_t key_end = p.k_len;
  if (p.block_size > 0 && p.q_len > 0) {
    const int64_t end = ((p.q_offset + p.q_len - 1) / p.block_size + 1) * p.block_size;
    key_end = end < key_end ? end : key_end;
  }
  const int64_t tiles = (key_end + kBlockN - 1) / kBlockN;

  // Split only when the query tiles alone leave SMs idle: aim for two blocks per SM,
  // with at least kMinTilesPerSplit tiles per split so the partial outputs written and
  // combined stay small next to the K and V reads.
  const int64_t blocks = plan.query_tiles * p.batch * p.kv_heads;
  const int64_t sms = sm_count();
  int64_t splits = 1;
  if (blocks < sms && tiles >= 2 * kMinTilesPerSplit) {
    const int64_t wanted = (2 * sms + blocks - 1) / blocks;
    const int64_t most = tiles / kMinTilesPerSplit;
    splits = wanted < most ? wanted : most;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
  }
  const int64_t per_split = tiles > 0 ? (tiles + splits - 1) / splits : 1;
  a.tiles_per_split = static_cast<int>(per_split);
  a.splits = static_cast<int>(tiles > 0 ? (tiles + per_split - 1) / per_split : 1);  // no empty trailing split
  return plan;
}

int64_t partial_floats(const Plan& plan, int64_t head_dim) {
  return plan.launch.splits > 1 ? plan.launch.splits * plan.launch.total_rows * head_dim : 0;
}

int64_t workspace_bytes_of(const Plan& plan, int64_t head_dim) {
  const int64_t rows = plan.launch.splits > 1 ? plan.launch.splits * plan.launch.total_rows : 0;
  return (partial_floats(plan, head_dim) + rows) * static_cast<int64_t>(sizeof(float));
}

// Shared memory over 48 KiB needs an opt-in per kernel and device; done once per device.
template <typename T, int kHeadDim>
Status allow_shared_memory() {
  constexpr int kBytes = shared_bytes<kHeadDim>();
  if (kBytes <= 48 * 1024) return ok_status();
  static std::atomic<uint64_t> done_devices{0};
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (error == cudaSuccess && bit != 0 && (done_devices.load(std::memory_order_relaxed) & bit) != 0) {
    return ok_status();
  }
  if (error == cudaSuccess) {
    error = cudaFuncSetAttribute(attention_forward_kernel<T, kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 kBytes);
  }
  if (error != cudaSuccess) {
    cudaGetLastError();  // reported here; not left for the next launch check
    record_cuda_error(error);
    return cuda_error();
  }
  done_devices.fetch_or(bit, std::memory_order_relaxed);
  return ok_status();
}

template <typename T, int kHeadDim>
Status launch(const AttentionParams& p, const Plan& plan, cudaStream_t stream) {
  const Status allowed = allow_shared_memory<T, kHeadDim>();
  if (!allowed.ok()) return allowed;
  const Launch& a = plan.launch;
  const dim3 grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>(plan.query_tiles),
                  static_cast<unsigned>(a.splits));
  launch_kernel("attention_forward_kernel", attention_forward_kernel<T, kHeadDim>, grid,
                dim3(TileConfig<kHeadDim>::kWarps * 32), shared_bytes<kHeadDim>(), stream, p, a);
  const Status status = check_launch();
  if (!status.ok() || a.splits == 1) return status;
  const int64_t rows_per_block = kCombineThreads / (kHeadDim / 4);
  const int64_t blocks = (a.total_rows + rows_per_block - 1) / rows_per_block;
  launch_kernel("attention_combine_kernel", attention_combine_kernel<T>, dim3(static_cast<unsigned>(blocks)),
                dim3(kCombineThreads), 0, stream, p, a);
  return check_launch();
}

template <typename T>
Status launch_for_head_dim(const AttentionParams& p, const Plan& plan, cudaStream_t stream) {
  return p.head_dim == 64 ? launch<T, 64>(p, plan, stream) : launch<T, 128>(p, plan, stream);
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

bool strides_aligned(const int64_t (&stride)[3]) {
  return stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

}  // namespace

int64_t attention_cuda_workspace_bytes(const AttentionParams& p) {
  if (p.batch < 1 || p.q_len < 1 || p.kv_heads < 1 || p.q_heads < 1 || p.q_heads % p.kv_heads != 0 ||
      (p.head_dim != 64 && p.head_dim != 128)) {
    return 0;
  }
  return workspace_bytes_of(plan_launch(p), p.head_dim);
}

Status attention_cuda(const AttentionParams& p, void* workspace, int64_t workspace_bytes, void* stream_handle) {
  const Status status = check_attention_params(p);
  if (!status.ok()) return status;
  if (p.dtype != ScalarType::kFloat16 && p.dtype != ScalarType::kBFloat16) {
    return unsupported("dtype", static_cast<double>(static_cast<int>(p.dtype)), "must be float16 or bfloat16 on CUDA");
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return unsupported("head_dim", static_cast<double>(p.head_dim), "must be 64 or 128 on CUDA");
  }
  if (p.batch * p.q_len == 0) return ok_status();
  // Key indices are int in the kernel; (batch, kv head) is gridDim.x.
  if (p.k_len > INT32_MAX / 2) return unsupported("k_len", static_cast<double>(p.k_len), "must be < 2^30 on CUDA");
  if (p.batch * p.kv_heads > INT32_MAX) {
    return unsupported("batch", static_cast<double>(p.batch), "times kv_heads must be < 2^31 on CUDA");
  }
  // 16-byte cp.async copies of every row.
  if (!aligned16(p.q)) return invalid_argument("q", 0, "must be 16-byte aligned");
  if (!aligned16(p.k)) return invalid_argument("k", 0, "must be 16-byte aligned");
  if (!aligned16(p.v)) return invalid_argument("v", 0, "must be 16-byte aligned");
  if (!aligned16(p.out)) return invalid_argument("out", 0, "must be 16-byte aligned");
  if (!strides_aligned(p.q_stride)) return invalid_argument("q_stride", 0, "must be multiples of 8 elements");
  if (!strides_aligned(p.k_stride)) return invalid_argument("k_stride", 0, "must be multiples of 8 elements");
  if (!strides_aligned(p.v_stride)) return invalid_argument("v_stride", 0, "must be multiples of 8 elements");
  if (!strides_aligned(p.out_stride)) return invalid_argument("out_stride", 0, "must be multiples of 8 elements");
  Plan launch_plan = plan_launch(p);
  if (launch_plan.query_tiles > 65535) {  // gridDim.y: q_len * group > 8M rows
    return unsupported("q_len", static_cast<double>(p.q_len), "times the head group must be <= 65535 * 128 on CUDA");
  }
  if (launch_plan.launch.splits > 1) {
    const int64_t needed = workspace_bytes_of(launch_plan, p.head_dim);
    if (workspace_bytes < needed) {
      return invalid_argument("workspace_bytes", static_cast<double>(workspace_bytes),
                              "must be at least attention_cuda_workspace_bytes(params)");
    }
    if (workspace == nullptr || !aligned16(workspace)) {
      return invalid_argument("workspace", 0, "must be 16-byte aligned and not null");
    }
    launch_plan.launch.partial_out = static_cast<float*>(workspace);
    launch_plan.launch.partial_lse = launch_plan.launch.partial_out + partial_floats(launch_plan, p.head_dim);
  }
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  return p.dtype == ScalarType::kBFloat16 ? launch_for_head_dim<__nv_bfloat16>(p, launch_plan, stream)
                                          : launch_for_head_dim<__half>(p, launch_plan, stream);
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
