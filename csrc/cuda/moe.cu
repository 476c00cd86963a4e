// moe_swiglu on CUDA (unmask/moe.h's contract) for bfloat16 models such as LLaDA 2.0's,
// in four launches per 4096 tokens and no host read, so that a model's step can be a CUDA
// graph:
//   1. route: one block counts each expert's (token, choice) pairs, lays every expert's
//      pairs out as consecutive slots and cuts them into tiles of 16 slots;
//   2. gate_up: hidden[slot] = silu(gate_e x) * up_e x per (tile, 64 hidden units), kept
//      as the three bfloat16 pieces of its float32 value (below);
//   3. down: routed[pair] = down_e hidden[slot], float32, per (tile, 64 outputs);
//   4. combine: out[t] = sum over j, in j order, of weights[t, j] * routed[t, j].
// Grids are sized for the worst routing (at most pairs / 16 + min(E, pairs) tiles);
// blocks past the tiles the route made return at once. Longer calls run 4096 tokens at a
// time through one workspace (~370 MB at LLaDA2.0-mini's widths; 128 pairs an expert).
//
// Products. mma.sync.m16n8k16 with the weights as the A operand, read in place as the
// [out, in] rows they are (16 rows a warp), and 8 of the tile's tokens as the B operand
// (column-major 16 x 8 is x's own row-major [token, in]): C is weights x tokens, as the
// CPU tile kernel's, and no operand is transposed or staged. Each lane of a quad loads
// 16 contiguous bytes (8 inputs) of its rows and of its token, so a warp reads 64-byte
// runs of 16 weight rows: one load step covers 32 inputs in two mmas. Which 16 of the 32
// inputs an mma sees is a permutation of k applied alike to A and B, so the sums are
// the same dot products (mma's fragment layout, PTX ISA 9.7.13.4.8: lane 4g + c holds
// A[g][2c, 2c+1], A[g+8][2c, 2c+1], A[g][2c+8, 2c+9], A[g+8][2c+8, 2c+9] and
// B[2c, 2c+1][g], B[2c+8, 2c+9][g]; here logical k 2c, 2c+1, 2c+8, 2c+9 of the first mma
// are inputs 8c..8c+3 of the step, and of the second 8c+4..8c+7).
//
// Precision, as the CPU kernels: x and the weights are bfloat16, so the gate and up
// products are exact, summed in float32 (as the tensor cores sum: Hopper's do not round
// each addition to nearest, so the bits differ from the CPU's and the interpreter's); the
// hidden activations stay float32, and the down product runs on each split into three
// bfloat16 pieces that add up to it exactly (a NaN or inf is one piece, the others zero;
// below ~2^-102 the last piece loses bits to bfloat16's range). The second and third
// pieces meet the weights with inf and NaN zeroed, so an infinite weight times an
// activation gives inf as in float32 (inf times the zero pieces would be NaN).
//
// Traffic. At a denoising step (a few tokens per expert) each chosen expert's weights
// are read once per tile: the call's floor is one read of the chosen experts, as on the
// CPU. Many tokens per expert reread a weight row once per 16 tokens, from L2 when the
// tiles of one expert run together (they are adjacent on the grid's x). Not yet timed on
// a GPU (unmask.gpucheck's moe bench).
//
// Batch invariance: a token's column of C depends on its own inputs alone, and its
// outputs are summed in its own order, so its bits do not depend on which tokens share
// the call or on the slot order (which the route's atomics leave unspecified).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda_check.cuh"
#include "ptx.cuh"
#include "unmask/moe_cuda.h"

namespace unmask {
UNMASK_BUILD_NAMESPACE_BEGIN  // cuda_check.cuh
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = kWarps * 16;  // weight rows per block: one 16-row mma tile per warp
constexpr int kSlotsPerTile = 16;           // tokens per tile: two 8-token mma blocks
constexpr int kStep = 32;                   // inputs per load step: 8 per lane of a quad
constexpr int kMaxExperts = 1024;           // the route scans one expert per thread
constexpr int kCombineWarps = 8;            // tokens per combine block, a warp each
constexpr int64_t kTokensPerLaunch = 4096;  // bounds the workspace: routed is pairs x dim floats

// The workspace, carved by layout_of().
struct Layout {
  int* tiles_used;   // [1]
  int* tile_expert;  // [max_tiles]
  int* tile_begin;   // [max_tiles]: first slot
  int* tile_end;     // [max_tiles]: the expert's end slot
  int* slot_pair;    // [pairs]: the pair (t * per_token + j) in each slot
  uint16_t* pieces;  // [pairs][3][hidden_stride] bfloat16 bits, by slot; units past hidden are 0
  float* routed;     // [pairs][dim], by pair
  int64_t max_tiles, hidden_stride;
};

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Every expert with c pairs has ceil(c / 16) tiles: at most pairs / 16 + one partial tile
// per expert that has a pair.
int64_t max_tiles_of(const MoeParams& p) {
  const int64_t pairs = p.tokens * p.per_token;
  return (pairs + kSlotsPerTile - 1) / kSlotsPerTile + (pairs < p.n_experts ? pairs : p.n_experts);
}

// Byte offsets of the workspace's parts (16-byte aligned) and its size, for p.tokens up
// to kTokensPerLaunch; base may be null.
Layout layout_of(const MoeParams& p, void* base, int64_t* bytes) {
  Layout w{};
  w.max_tiles = max_tiles_of(p);
  w.hidden_stride = round_up(p.hidden, kRowsPerBlock);  // the gate_up grid writes every row of it
  const int64_t pairs = p.tokens * p.per_token;
  char* at = static_cast<char*>(base);
  int64_t used = 0;
  auto carve = [&](int64_t size) {
    char* part = at == nullptr ? nullptr : at + used;
    used += round_up(size, 16);
    return part;
  };
  w.tiles_used = reinterpret_cast<int*>(carve(sizeof(int)));
  w.tile_expert = reinterpret_cast<int*>(carve(w.max_tiles * sizeof(int)));
  w.tile_begin = reinterpret_cast<int*>(carve(w.max_tiles * sizeof(int)));
  w.tile_end = reinterpret_cast<int*>(carve(w.max_tiles * sizeof(int)));
  w.slot_pair = reinterpret_cast<int*>(carve(pairs * sizeof(int)));
  w.pieces = reinterpret_cast<uint16_t*>(carve(pairs * 3 * w.hidden_stride * sizeof(uint16_t)));
  w.routed = reinterpret_cast<float*>(carve(pairs * p.dim * sizeof(float)));
  *bytes = used;
  return w;
}

__device__ __forceinline__ bool valid_expert(const MoeParams& p, int64_t e) { return e >= 0 && e < p.n_experts; }

// ------------------------------------------------------------------ 1. route

// Inclusive sum over the 32 lanes (all of them call).
__device__ __forceinline__ int warp_inclusive_sum(int value, int lane) {
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int before = __shfl_up_sync(0xFFFFFFFFu, value, offset);
    if (lane >= offset) value += before;
  }
  return value;
}

__global__ void __launch_bounds__(kMaxExperts) route_kernel(MoeParams p, Layout w) {
  UNMASK_SHARED_ARRAY(int, count, kMaxExperts);
  UNMASK_SHARED_ARRAY(int, cursor, kMaxExperts);
  UNMASK_SHARED_ARRAY(int, warp_slots, 32);
  UNMASK_SHARED_ARRAY(int, warp_tiles, 32);
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t pairs = p.tokens * p.per_token;
  count[t] = 0;
  __syncthreads();
  for (int64_t q = t; q < pairs; q += kMaxExperts) {
    const int64_t e = p.experts[q];
    if (valid_expert(p, e)) atomicAdd(&count[e], 1);  // an invalid id's token is NaN (combine)
  }
  __syncthreads();

  // Each expert's first slot and first tile: exclusive sums over the experts, thread t
  // holding expert t (warp sums, then a scan of the 32 warp totals by warp 0).
  const int slots = count[t], tiles = (slots + kSlotsPerTile - 1) / kSlotsPerTile;
  const int slot_sum = warp_inclusive_sum(slots, lane), tile_sum = warp_inclusive_sum(tiles, lane);
  if (lane == 31) {
    warp_slots[warp] = slot_sum;
    warp_tiles[warp] = tile_sum;
  }
  __syncthreads();
  if (warp == 0) {
    const int all_slots = warp_inclusive_sum(warp_slots[lane], lane);
    const int all_tiles = warp_inclusive_sum(warp_tiles[lane], lane);
    warp_slots[lane] = all_slots;
    warp_tiles[lane] = all_tiles;
  }
  __syncthreads();
  const int first_slot = slot_sum - slots + (warp > 0 ? warp_slots[warp - 1] : 0);
  const int first_tile = tile_sum - tiles + (warp > 0 ? warp_tiles[warp - 1] : 0);
  cursor[t] = first_slot;
  for (int i = 0; i < tiles; ++i) {
    w.tile_expert[first_tile + i] = t;
    w.tile_begin[first_tile + i] = first_slot + i * kSlotsPerTile;
    w.tile_end[first_tile + i] = first_slot + slots;
  }
  if (t == 0) *w.tiles_used = warp_tiles[31];
  __syncthreads();
  for (int64_t q = t; q < pairs; q += kMaxExperts) {
    const int64_t e = p.experts[q];
    if (valid_expert(p, e)) w.slot_pair[atomicAdd(&cursor[e], 1)] = static_cast<int>(q);
  }
}

// ------------------------------------------------------------------ operand loads

// Eight bfloat16 values of a row from element `at`, zero past `width` or for no row (null):
// one 16-byte load where `whole` says the rows are 16-byte aligned with width % 8 == 0.
__device__ __forceinline__ uint4 load8(const __nv_bfloat16* row, int64_t at, int64_t width, bool whole) {
  if (row == nullptr || at >= width) return uint4{0, 0, 0, 0};
  if (whole) return *reinterpret_cast<const uint4*>(row + at);
  uint16_t bits[8];
  for (int i = 0; i < 8; ++i) bits[i] = at + i < width ? reinterpret_cast<const uint16_t*>(row)[at + i] : 0;
  return uint4{bits[0] | (uint32_t{bits[1]} << 16), bits[2] | (uint32_t{bits[3]} << 16),
               bits[4] | (uint32_t{bits[5]} << 16), bits[6] | (uint32_t{bits[7]} << 16)};
}

// A word of two bfloat16 weights with an inf or NaN half made 0 (for the second and third
// pieces of the activations, which are 0 where the first is inf or NaN).
__device__ __forceinline__ uint32_t finite_halves(uint32_t word) {
  const uint32_t low = (word & 0x7F80u) == 0x7F80u ? 0xFFFFu : 0u;
  const uint32_t high = (word & 0x7F800000u) == 0x7F800000u ? 0xFFFF0000u : 0u;
  return word & ~(low | high);
}
__device__ __forceinline__ uint4 finite_halves(const uint4& v) {
  return uint4{finite_halves(v.x), finite_halves(v.y), finite_halves(v.z), finite_halves(v.w)};
}

// c += (rows a, b) x (token column) over one load step: two mmas (the permutation above).
__device__ __forceinline__ void mma_step(float (&c)[4], const uint4& a, const uint4& b, const uint4& token) {
  const uint32_t first[4] = {a.x, b.x, a.y, b.y}, second[4] = {a.z, b.z, a.w, b.w};
  mma(c, first, token.x, token.y, __nv_bfloat16{});
  mma(c, second, token.z, token.w, __nv_bfloat16{});
}

// A float32 as three bfloat16 pieces, each truncated from what the ones before left: the
// first holds 8 significant bits, the second the next 8 (an exact remainder), the third
// the rest (at most 8 bits, exact). NaN and inf are the first piece alone (a truncated
// NaN could read as inf, so it is made a quiet NaN).
struct Pieces {
  uint16_t bits[3];
};
__device__ __forceinline__ Pieces split3(float v) {
  const uint32_t bits = __float_as_uint(v);
  if ((bits & 0x7F800000u) == 0x7F800000u) {
    const uint16_t first = (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0 : static_cast<uint16_t>(bits >> 16);
    return Pieces{{first, 0, 0}};
  }
  const float rest = v - __uint_as_float(bits & 0xFFFF0000u);
  const uint32_t rest_bits = __float_as_uint(rest);
  const float last = rest - __uint_as_float(rest_bits & 0xFFFF0000u);
  return Pieces{{static_cast<uint16_t>(bits >> 16), static_cast<uint16_t>(rest_bits >> 16),
                 static_cast<uint16_t>(__float_as_uint(last) >> 16)}};
}

// ------------------------------------------------------------------ what a block of stages 2 and 3 works on

// Block (tile, blockIdx.y)'s part: the tile's expert and slots, and this lane's place in
// its warp's mma (g: its A row and B column, c: its 8 inputs of a load step), with the
// first of its two weight rows (row and row + 8 of the block's 64).
struct TileWork {
  int64_t expert;
  int begin, end;
  int g, c;
  int64_t row;
  bool second_block;  // warp-uniform: the tile's tokens 8..15 exist
};

// False for a block past the tiles the route made.
__device__ __forceinline__ bool tile_work(const Layout& w, TileWork* t) {
  const int tile = blockIdx.x;
  if (tile >= *w.tiles_used) return false;
  t->expert = w.tile_expert[tile];
  t->begin = w.tile_begin[tile];
  t->end = w.tile_end[tile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  t->g = lane >> 2;
  t->c = lane & 3;
  t->row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + warp * 16 + t->g;
  t->second_block = t->end - t->begin > 8;
  return true;
}

// The lane's two rows (row, row + 8) of a [rows, width] matrix; null past its end.
__device__ __forceinline__ void row_pair(const __nv_bfloat16* matrix, int64_t row, int64_t rows, int64_t width,
                                         const __nv_bfloat16* (&out)[2]) {
  out[0] = row < rows ? matrix + row * width : nullptr;
  out[1] = row + 8 < rows ? matrix + (row + 8) * width : nullptr;
}

// ------------------------------------------------------------------ 2. gate and up

__device__ __forceinline__ float swiglu(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// Grid (max_tiles, hidden_stride / 64). whole_x, whole_w: x's rows and the gate and up
// rows take 16-byte loads.
__global__ void __launch_bounds__(kThreads) gate_up_kernel(MoeParams p, Layout w, bool whole_x, bool whole_w) {
  TileWork t;
  if (!tile_work(w, &t)) return;
  const int begin = t.begin, end = t.end, g = t.g, c = t.c;
  const int64_t row = t.row;
  const bool second_block = t.second_block;
  const int64_t offset = t.expert * p.hidden * p.dim;
  const __nv_bfloat16 *gate_rows[2], *up_rows[2];
  row_pair(static_cast<const __nv_bfloat16*>(p.gate) + offset, row, p.hidden, p.dim, gate_rows);
  row_pair(static_cast<const __nv_bfloat16*>(p.up) + offset, row, p.hidden, p.dim, up_rows);
  const __nv_bfloat16* tokens[2];  // this lane's token (B column g) of each 8-token block
  for (int b = 0; b < 2; ++b) {
    const int slot = begin + b * 8 + g;
    tokens[b] = slot < end ? static_cast<const __nv_bfloat16*>(p.x) + w.slot_pair[slot] / p.per_token * p.x_row_stride
                           : nullptr;
  }

  float gate_sum[2][4] = {}, up_sum[2][4] = {};
#pragma unroll 4
  for (int64_t k = 0; k < p.dim; k += kStep) {
    const int64_t at = k + 8 * c;
    const uint4 gate_a = load8(gate_rows[0], at, p.dim, whole_w), gate_b = load8(gate_rows[1], at, p.dim, whole_w);
    const uint4 up_a = load8(up_rows[0], at, p.dim, whole_w), up_b = load8(up_rows[1], at, p.dim, whole_w);
    const uint4 x0 = load8(tokens[0], at, p.dim, whole_x);
    mma_step(gate_sum[0], gate_a, gate_b, x0);
    mma_step(up_sum[0], up_a, up_b, x0);
    if (second_block) {
      const uint4 x1 = load8(tokens[1], at, p.dim, whole_x);
      mma_step(gate_sum[1], gate_a, gate_b, x1);
      mma_step(up_sum[1], up_a, up_b, x1);
    }
  }

  // C element i of block b: hidden unit row (+8 for i >= 2), slot begin + 8b + 2c + (i & 1).
  for (int b = 0; b < 2; ++b) {
    for (int i = 0; i < 4; ++i) {
      const int slot = begin + b * 8 + 2 * c + (i & 1);
      const int64_t unit = row + (i >= 2 ? 8 : 0);
      if (slot >= end) continue;
      // Units past hidden are the down product's zero padding (their sums may be NaN from
      // an inf input times a zero row).
      const Pieces pieces = split3(unit < p.hidden ? swiglu(gate_sum[b][i], up_sum[b][i]) : 0.0f);
      uint16_t* at = w.pieces + slot * 3 * w.hidden_stride + unit;
      for (int piece = 0; piece < 3; ++piece) at[piece * w.hidden_stride] = pieces.bits[piece];
    }
  }
}

// ------------------------------------------------------------------ 3. down

// Grid (max_tiles, ceil(dim / 64)). whole_w: the down rows take 16-byte loads.
__global__ void __launch_bounds__(kThreads) down_kernel(MoeParams p, Layout w, bool whole_w) {
  TileWork t;
  if (!tile_work(w, &t)) return;
  const int begin = t.begin, end = t.end, g = t.g, c = t.c;
  const int64_t row = t.row;  // output dims row and row + 8
  const bool second_block = t.second_block;
  const __nv_bfloat16* rows[2];
  row_pair(static_cast<const __nv_bfloat16*>(p.down) + t.expert * p.dim * p.hidden, row, p.dim, p.hidden, rows);
  const uint16_t* activations[2];  // this lane's slot (B column g) of each 8-token block: its pieces
  for (int b = 0; b < 2; ++b) {
    const int slot = begin + b * 8 + g;
    activations[b] = slot < end ? w.pieces + slot * 3 * w.hidden_stride : nullptr;
  }

  float sum[2][4] = {};
#pragma unroll 2
  for (int64_t k = 0; k < w.hidden_stride; k += kStep) {
    const int64_t at = k + 8 * c;  // < hidden_stride, a multiple of 64: whole 16-byte loads
    const uint4 a = load8(rows[0], at, p.hidden, whole_w), b = load8(rows[1], at, p.hidden, whole_w);
    const uint4 a_finite = finite_halves(a), b_finite = finite_halves(b);
    for (int block = 0; block < 2; ++block) {
      if (block == 1 && !second_block) break;
      for (int piece = 0; piece < 3; ++piece) {
        const uint4 token = activations[block] == nullptr ? uint4{0, 0, 0, 0}
            : *reinterpret_cast<const uint4*>(activations[block] + piece * w.hidden_stride + at);
        mma_step(sum[block], piece == 0 ? a : a_finite, piece == 0 ? b : b_finite, token);
      }
    }
  }

  for (int block = 0; block < 2; ++block) {
    for (int i = 0; i < 4; ++i) {
      const int slot = begin + block * 8 + 2 * c + (i & 1);
      const int64_t out_row = row + (i >= 2 ? 8 : 0);
      if (slot < end && out_row < p.dim) w.routed[static_cast<int64_t>(w.slot_pair[slot]) * p.dim + out_row] = sum[block][i];
    }
  }
}

// ------------------------------------------------------------------ 4. combine

// Grid (ceil(tokens / 8)), a warp per token: out[t] = sum over j in j order of
// weights[t, j] * routed[t * k + j]; NaN for a token with an expert id out of range (the
// route skipped its pairs).
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(MoeParams p, Layout w) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kCombineWarps + (threadIdx.x >> 5);
  if (t >= p.tokens) return;
  bool valid = true;
  for (int64_t j = 0; j < p.per_token; ++j) valid = valid && valid_expert(p, p.experts[t * p.per_token + j]);
  for (int64_t d = threadIdx.x & 31; d < p.dim; d += 32) {
    float sum = 0.0f;
    if (valid) {
      for (int64_t j = 0; j < p.per_token; ++j) {
        const int64_t q = t * p.per_token + j;
        const float term = p.weights[q] * w.routed[q * p.dim + d];
        sum = j == 0 ? term : sum + term;
      }
    }
    p.out[t * p.dim + d] = valid ? sum : NAN;
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// The params of tokens [first, first + count).
MoeParams token_range(const MoeParams& p, int64_t first, int64_t count) {
  MoeParams q = p;
  q.x = static_cast<const __nv_bfloat16*>(p.x) + first * p.x_row_stride;
  q.experts = p.experts + first * p.per_token;
  q.weights = p.weights + first * p.per_token;
  q.out = p.out + first * p.dim;
  q.tokens = count;
  return q;
}

}  // namespace

int64_t moe_swiglu_cuda_workspace_bytes(const MoeParams& params) {
  if (!check_moe_params(params).ok()) return 0;
  int64_t bytes = 0;
  layout_of(token_range(params, 0, params.tokens < kTokensPerLaunch ? params.tokens : kTokensPerLaunch), nullptr,
            &bytes);
  return bytes;
}

Status moe_swiglu_cuda(const MoeParams& p, void* workspace, int64_t workspace_bytes, void* stream) {
  const Status status = check_moe_params(p);
  if (!status.ok()) return status;
  if (p.dtype != ScalarType::kBFloat16) {
    return unsupported("dtype", static_cast<double>(static_cast<int>(p.dtype)), "the CUDA kernel runs bfloat16");
  }
  if (p.n_experts > kMaxExperts) return unsupported("n_experts", static_cast<double>(p.n_experts), "must be <= 1024 on CUDA");
  if (p.dim > 65535 * int64_t{kRowsPerBlock} || p.hidden > 65535 * int64_t{kRowsPerBlock}) {
    return unsupported("dim", static_cast<double>(p.dim > p.hidden ? p.dim : p.hidden),
                       "dim and hidden must be <= 65535 * 64 on CUDA");
  }
  if (p.tokens == 0) return ok_status();
  if (workspace == nullptr || !aligned16(workspace)) return invalid_argument("workspace", 0, "must be 16-byte aligned");
  if (workspace_bytes < moe_swiglu_cuda_workspace_bytes(p)) {
    return invalid_argument("workspace_bytes", static_cast<double>(workspace_bytes), "is less than the launch needs");
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool whole_x = aligned16(p.x) && p.dim % 8 == 0 && (p.tokens == 1 || p.x_row_stride % 8 == 0);
  const bool whole_gate_up = aligned16(p.gate) && aligned16(p.up) && p.dim % 8 == 0;
  const bool whole_down = aligned16(p.down) && p.hidden % 8 == 0;
  // One stream: each range's launches finish with the workspace before the next range's start.
  for (int64_t first = 0; first < p.tokens; first += kTokensPerLaunch) {
    const MoeParams q = token_range(p, first, p.tokens - first < kTokensPerLaunch ? p.tokens - first : kTokensPerLaunch);
    int64_t bytes = 0;
    const Layout w = layout_of(q, workspace, &bytes);
    const unsigned tiles = static_cast<unsigned>(w.max_tiles);
    launch_kernel("moe_route", route_kernel, dim3(1), dim3(kMaxExperts), 0, s, q, w);
    launch_kernel("moe_gate_up", gate_up_kernel, dim3(tiles, static_cast<unsigned>(w.hidden_stride / kRowsPerBlock)),
                  dim3(kThreads), 0, s, q, w, whole_x, whole_gate_up);
    launch_kernel("moe_down", down_kernel,
                  dim3(tiles, static_cast<unsigned>((q.dim + kRowsPerBlock - 1) / kRowsPerBlock)), dim3(kThreads), 0, s,
                  q, w, whole_down);
    launch_kernel("moe_combine", combine_kernel, dim3(static_cast<unsigned>((q.tokens + kCombineWarps - 1) / kCombineWarps)),
                  dim3(kCombineWarps * 32), 0, s, q, w);
    const Status launched = check_launch();
    if (!launched.ok()) return launched;
  }
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END
}  // namespace unmask
