// attention: fused masked bidirectional attention (docs/design.md, attention).
#pragma once

#include <cstdint>

#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

// q, out [batch, q_len, q_heads, head_dim]; k, v [batch, k_len, kv_heads, head_dim].
// Strides are in elements for (batch, position, head); head_dim is contiguous.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  ScalarType dtype;
  int64_t batch, q_len, k_len, q_heads, kv_heads, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];
  const int64_t* kv_len;   // [batch] or nullptr: keys j >= kv_len[b] are invisible (any value is safe)
  const bool* key_valid;   // [batch, k_len] contiguous, or nullptr
  int64_t block_size;      // 0: no block-causal mask
  int64_t q_offset;        // absolute position of query 0 (block-causal mask)
  float scale;
};

UNMASK_BUILD_NAMESPACE_BEGIN

// The rules every attention launcher applies to its params.
inline Status check_attention_params(const AttentionParams& p) {
  const int dtype = static_cast<int>(p.dtype);
  if (dtype < 0 || dtype > 2) return invalid_argument("dtype", dtype, "must be a ScalarType");
  if (p.batch < 0) return invalid_argument("batch", static_cast<double>(p.batch), "must be >= 0");
  if (p.q_len < 0) return invalid_argument("q_len", static_cast<double>(p.q_len), "must be >= 0");
  if (p.k_len < 0) return invalid_argument("k_len", static_cast<double>(p.k_len), "must be >= 0");
  if (p.kv_heads < 1) return invalid_argument("kv_heads", static_cast<double>(p.kv_heads), "must be >= 1");
  if (p.q_heads < 1 || p.q_heads % p.kv_heads != 0) {
    return invalid_argument("q_heads", static_cast<double>(p.q_heads), "must be a positive multiple of kv_heads");
  }
  if (p.head_dim < 1) return invalid_argument("head_dim", static_cast<double>(p.head_dim), "must be >= 1");
  if (p.block_size < 0) return invalid_argument("block_size", static_cast<double>(p.block_size), "must be >= 0");
  if (p.q_offset < 0) return invalid_argument("q_offset", static_cast<double>(p.q_offset), "must be >= 0");
  if (p.batch * p.q_len > 0) {
    if (p.q == nullptr) return invalid_argument("q", 0, "must not be null");
    if (p.out == nullptr) return invalid_argument("out", 0, "must not be null");
    if (p.k_len > 0 && p.k == nullptr) return invalid_argument("k", 0, "must not be null when k_len > 0");
    if (p.k_len > 0 && p.v == nullptr) return invalid_argument("v", 0, "must not be null when k_len > 0");
  }
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status attention_cpu(const AttentionParams& params);

}  // namespace unmask
