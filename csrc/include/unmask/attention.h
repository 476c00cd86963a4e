// attention: fused masked bidirectional attention (DESIGN.md, attention).
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
  const int64_t* kv_len;   // [batch] or nullptr: keys j >= kv_len[b] are invisible
  const bool* key_valid;   // [batch, k_len] contiguous, or nullptr
  int64_t block_size;      // 0: no block-causal mask
  int64_t q_offset;        // absolute position of query 0 (block-causal mask)
  float scale;
};

Status attention_cpu(const AttentionParams& params);

}  // namespace unmask
