// moe_swiglu: the routed sum of a mixture-of-experts MLP (LLaDA 2.0's), for tokens x and
// each token's chosen experts and weights:
//   out[t] = sum over j of weights[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]),
//   e = experts[t, j], the sum in j order, all in float32 arithmetic.
// Each expert's three weight matrices are read once per call whatever number of tokens
// chose it (its rows run against all of them together): at a denoising step's few
// tokens per expert the weights are nearly all the traffic, so the call's floor is one
// read of the chosen experts.
#pragma once

#include <cstdint>

#include "unmask/status.h"
#include "unmask/types.h"

namespace unmask {

struct MoeParams {
  const void* x;            // [tokens, dim], rows x_row_stride elements apart, dim contiguous
  const int64_t* experts;   // [tokens, per_token], contiguous: ids in [0, n_experts)
  const float* weights;     // [tokens, per_token], contiguous, float32
  const void* gate;         // [n_experts, hidden, dim], contiguous: each expert's [out, in]
  const void* up;           // [n_experts, hidden, dim], contiguous
  const void* down;         // [n_experts, dim, hidden], contiguous
  float* out;               // [tokens, dim], contiguous, float32
  ScalarType dtype;         // of x, gate, up and down
  int64_t tokens, per_token, n_experts, dim, hidden, x_row_stride;
};

UNMASK_BUILD_NAMESPACE_BEGIN

// The fields alone; the kernel checks the expert ids as it counts them.
inline Status check_moe_params(const MoeParams& p) {
  const int dtype = static_cast<int>(p.dtype);
  if (dtype < 0 || dtype > 2) return invalid_argument("dtype", dtype, "must be a ScalarType");
  if (p.tokens < 0) return invalid_argument("tokens", static_cast<double>(p.tokens), "must be >= 0");
  if (p.n_experts < 1) return invalid_argument("n_experts", static_cast<double>(p.n_experts), "must be >= 1");
  if (p.per_token < 1 || p.per_token > p.n_experts) {
    return invalid_argument("per_token", static_cast<double>(p.per_token), "must be in [1, n_experts]");
  }
  if (p.dim < 1) return invalid_argument("dim", static_cast<double>(p.dim), "must be >= 1");
  if (p.hidden < 1) return invalid_argument("hidden", static_cast<double>(p.hidden), "must be >= 1");
  if (p.x_row_stride < p.dim) return invalid_argument("x_row_stride", static_cast<double>(p.x_row_stride), "must be >= dim");
  if (p.tokens > 0) {
    if (p.x == nullptr) return invalid_argument("x", 0, "must not be null");
    if (p.experts == nullptr) return invalid_argument("experts", 0, "must not be null");
    if (p.weights == nullptr) return invalid_argument("weights", 0, "must not be null");
    if (p.gate == nullptr) return invalid_argument("gate", 0, "must not be null");
    if (p.up == nullptr) return invalid_argument("up", 0, "must not be null");
    if (p.down == nullptr) return invalid_argument("down", 0, "must not be null");
    if (p.out == nullptr) return invalid_argument("out", 0, "must not be null");
  }
  return ok_status();
}

UNMASK_BUILD_NAMESPACE_END

Status moe_swiglu_cpu(const MoeParams& params);

}  // namespace unmask
